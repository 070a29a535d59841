"""Build the device kit's programs: the Cortex-M4 firmware (arm-none-eabi-gcc)
and the host-side example and unit tests (the host C compiler).

The C sources ship inside the package (``vmsgamp/_csrc``, copied from the
repository's ``csrc/`` when the wheel is built); a source checkout uses
``csrc/`` directly.  Firmware images go to a per-user cache directory keyed
by a hash of the sources, the compiler and the flags, so they are built once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Firmware", "FIRMWARE_CFLAGS", "HOST_CFLAGS", "SANITIZE_CFLAGS", "build_firmware",
           "build_host_program", "cache_dir", "csrc_root", "elf_size", "missing_tools"]

# Debian packages that provide each tool (named in error messages).
PACKAGES = {"arm-none-eabi-gcc": "gcc-arm-none-eabi", "qemu-system-arm": "qemu-system-arm"}

FIRMWARE_BOARD = "mps2-an386"
FIRMWARE_CFLAGS = ["-mcpu=cortex-m4", "-mthumb", "-Os", "-ffreestanding", "-std=c11", "-Wall", "-Wextra",
                   "-Werror", "-ffunction-sections", "-fdata-sections", "-g"]
HOST_CFLAGS = ["-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-Werror"]
SANITIZE_CFLAGS = ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer"]


def csrc_root() -> Path:
    """The C sources: ``vmsgamp/_csrc`` in an installed package, else the
    ``csrc/`` directory of a source checkout."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg / "_csrc", pkg.parent / "csrc"):
        if (cand / "kit" / "vmk.h").is_file():
            return cand
    raise FileNotFoundError(f"the device kit's C sources are missing (looked in {pkg / '_csrc'} and "
                            f"{pkg.parent / 'csrc'}); reinstall vmsgamp")


def missing_tools(*tools: str) -> list[str]:
    """Debian packages to install for the tools not on PATH."""
    return [PACKAGES.get(t, t) for t in tools if shutil.which(t) is None]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmsgamp" / "firmware"


@dataclass(frozen=True)
class Firmware:
    path: Path
    text: int
    data: int
    bss: int
    cached: bool

    def as_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "board": FIRMWARE_BOARD, "text": self.text, "data": self.data,
                "bss": self.bss, "cached": self.cached}


def _firmware_inputs(root: Path) -> tuple[list[Path], list[Path], Path]:
    board = root / "firmware" / FIRMWARE_BOARD
    sources = sorted(board.glob("*.c")) + sorted((root / "kit").glob("vmk_*.c"))
    headers = sorted(board.glob("*.h")) + sorted((root / "kit").glob("*.h")) + sorted(root.glob("*.h"))
    return sources, headers, board / "link.ld"


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cc
    return out.splitlines()[0] if out else cc


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise RuntimeError(f"building {what} failed: {' '.join(cmd[:1])}: "
                           f"{err[0] if err else 'exit ' + str(p.returncode)}"
                           + ("" if len(err) < 2 else f" (+{len(err) - 1} more lines)"))


def build_firmware(out_dir: Path | None = None, *, cc: str = "arm-none-eabi-gcc",
                   force: bool = False) -> Firmware:
    """The firmware ELF for QEMU's mps2-an386, built if needed.  Raises
    FileNotFoundError naming the Debian package when the compiler is missing,
    RuntimeError with the compiler's first message when the build fails."""
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"{cc} is not installed (Debian package {PACKAGES.get(cc, cc)})")
    root = csrc_root()
    sources, headers, ld = _firmware_inputs(root)
    h = hashlib.sha256()
    h.update(_compiler_id(cc).encode())
    h.update(" ".join(FIRMWARE_CFLAGS).encode())
    for f in sources + headers + [ld]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    d = (out_dir or cache_dir()) / h.hexdigest()[:16]
    elf = d / f"vmsgamp-{FIRMWARE_BOARD}.elf"
    if elf.is_file() and not force:
        return Firmware(elf, *elf_size(elf), cached=True)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".elf.tmp")
    os.close(fd)
    try:
        _run([cc, *FIRMWARE_CFLAGS, "-I", str(root / "kit"), "-I", str(ld.parent), "-nostdlib",
              "-Wl,--gc-sections", "-T", str(ld), "-o", tmp, *map(str, sources), "-lgcc"], "the firmware")
        os.replace(tmp, elf)   # atomic: a concurrent build never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Firmware(elf, *elf_size(elf), cached=False)


def build_host_program(sources: Path | list[Path], out: Path, *, cc: str = "cc",
                       sanitize: bool = False) -> Path:
    """Compile ``sources`` with the kit for this machine (-Wall -Wextra -Werror;
    ``sanitize``: AddressSanitizer and UBSan)."""
    root = csrc_root()
    srcs = [sources] if isinstance(sources, Path) else list(sources)
    flags = HOST_CFLAGS + (SANITIZE_CFLAGS if sanitize else [])
    _run([cc, *flags, "-I", str(root / "kit"), "-o", str(out), *map(str, srcs),
          *map(str, sorted((root / "kit").glob("vmk_*.c")))], srcs[0].name)
    return out


def elf_size(path: Path) -> tuple[int, int, int]:
    """(text, data, bss) as ``size`` counts them (Berkeley format: text
    includes read-only data)."""
    import struct

    raw = path.read_bytes()
    if raw[:4] != b"\x7fELF" or raw[4] != 1:
        raise ValueError(f"{path} is not a 32-bit ELF file")
    shoff, = struct.unpack_from("<I", raw, 0x20)
    shentsize, shnum = struct.unpack_from("<HH", raw, 0x2E)
    text = data = bss = 0
    for i in range(shnum):
        _name, sh_type, flags, _addr, _off, size = struct.unpack_from("<IIIIII", raw, shoff + i * shentsize)
        if not flags & 0x2:      # SHF_ALLOC
            continue
        if sh_type == 8:         # SHT_NOBITS
            bss += size
        elif flags & 0x1:        # SHF_WRITE
            data += size
        else:
            text += size
    return text, data, bss
