"""The layering holds: imports only run downwards.

    protocol/   sans-I/O: neither vmsgamp._core nor any I/O module
    _core/      mechanism: nothing of vmsgamp above it
    devices/    models and clients: never the bus that carries them

Every import statement counts, also the ones inside functions (a lazy
upward import is still an upward dependency).  Cython sources are read
line by line, since ``ast`` cannot parse them.
"""
from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "vmsgamp"

IO_MODULES = {"os", "io", "select", "selectors", "socket", "asyncio", "mmap", "fcntl", "subprocess",
              "signal", "threading", "multiprocessing", "ctypes", "time", "shutil", "tempfile"}

_CY_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))")


def _absolute(module: str, level: int, path: pathlib.Path) -> str:
    """Resolve a relative ``from .x import y`` against the file's package."""
    if not level:
        return module
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    base = parts[:-level]
    return ".".join(base + ([module] if module else []))


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module name a source file imports (absolute dotted names)."""
    text = path.read_text()
    found: set[str] = set()
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = _absolute(node.module or "", node.level, path)
                found.add(mod)
                # `from vmsgamp import bus` imports vmsgamp.bus
                found.update(f"{mod}.{alias.name}" for alias in node.names)
    else:
        for line in text.splitlines():
            m = _CY_IMPORT.match(line)
            if m:
                found.add(m.group(1) or m.group(2))
    return found


def sources(sub: str) -> list[pathlib.Path]:
    root = PKG / sub
    return sorted(p for ext in ("*.py", "*.pyx", "*.pxd") for p in root.rglob(ext))


def _top(name: str) -> str:
    return name.split(".")[0]


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_layers_are_where_the_rules_expect():
    for sub in ("protocol", "_core", "devices", "bus"):
        assert sources(sub), f"no sources under vmsgamp/{sub}"


@pytest.mark.parametrize("path", sources("protocol"), ids=lambda p: p.name)
def test_protocol_is_sans_io(path):
    names = imports_of(path)
    io = sorted(n for n in names if _top(n) in IO_MODULES)
    assert not io, f"{path.name} imports I/O modules {io}"
    vmsg = sorted(n for n in names if _under(n, "vmsgamp")
                  and not (_under(n, "vmsgamp.protocol") or _under(n, "vmsgamp.errors")))
    assert not vmsg, f"{path.name} imports {vmsg} (protocol/ may use only itself and vmsgamp.errors)"


@pytest.mark.parametrize("path", sources("_core"), ids=lambda p: p.name)
def test_core_imports_nothing_above_it(path):
    names = imports_of(path)
    up = sorted(n for n in names if _under(n, "vmsgamp")
                and not (_under(n, "vmsgamp._core") or _under(n, "vmsgamp.errors")))
    assert not up, f"{path.name} imports {up} from above vmsgamp._core"


@pytest.mark.parametrize("path", sources("devices"), ids=lambda p: p.name)
def test_devices_do_not_import_the_bus(path):
    names = imports_of(path)
    up = sorted(n for n in names if any(_under(n, f"vmsgamp.{layer}")
                                        for layer in ("bus", "vhost_user", "_cmd")))
    assert not up, f"{path.name} imports {up}: device models sit below the transports"


def test_the_checker_sees_upward_imports(tmp_path, monkeypatch):
    """The rules above must be able to fail: feed them offending sources."""
    pkg = tmp_path / "vmsgamp"
    (pkg / "devices").mkdir(parents=True)
    (pkg / "_core").mkdir()
    lazy = pkg / "devices" / "lazy.py"
    lazy.write_text("def f():\n    from vmsgamp.bus import AmpDriver\n    return AmpDriver\n")
    rel = pkg / "devices" / "rel.py"
    rel.write_text("from ..bus import _amp\n")
    cy = pkg / "_core" / "x.pyx"
    cy.write_text("from vmsgamp.protocol import decode\ncimport vmsgamp._core.io\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert "vmsgamp.bus" in imports_of(lazy)
    assert "vmsgamp.bus._amp" in imports_of(rel)
    assert imports_of(cy) == {"vmsgamp.protocol", "vmsgamp._core.io"}
