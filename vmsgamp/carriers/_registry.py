"""One URI grammar for every place shared memory and a doorbell come from.

Grammar::

    SCHEME:TARGET[#KEY=VALUE[&KEY=VALUE...]]     e.g. shm:vmsgamp#size=64K&create=1
    /absolute/path, ./relative, ../up, ~/home   (a bare path = file:PATH)

Options in the ``#`` fragment and keyword arguments of :func:`open_carrier`
are the same thing; a keyword argument overrides the URI.  A bare flag
(``#create``) means ``create=1``.  Each scheme is one small opener function
registered with :func:`register_scheme`; later carriers (UIO, PCI BAR, VFIO)
plug in the same way.

Options every scheme accepts:

* ``bus_base`` -- the address the peer uses for offset 0 of the region;
* ``memtype`` -- ``normal`` (RAM) or ``device`` (uncached device memory);
* ``offset`` -- where the AMP layout starts inside the region (a carrier
  attribute, not a mapping offset);
* ``readonly`` -- map read-only;
* ``timeout`` -- how long to wait for the other side (the object to appear,
  the server to answer, a peer to connect), in seconds.
"""
from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from vmsgamp._core.doorbell import Doorbell, PollingDoorbell
from vmsgamp._core.region import Region

COMMON_OPTIONS = frozenset({"bus_base", "memtype", "offset", "readonly", "timeout"})

_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


# ---- option coercion ----------------------------------------------------------

def parse_size(value: int | str) -> int:
    """``4096``, ``0x1000``, ``64K``, ``4M``, ``1G`` (also ``4MiB``/``4MB``).
    Suffixes are binary (K = 1024), as QEMU's ``-l 4M`` is 4 MiB."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 4096, 0x1000, 64K, 4M, 1G)")
    return int(m.group(1), 0) << _SIZE_SHIFT[m.group(2).lower()]


def parse_int(value: int | str, what: str = "value") -> int:
    """An integer in any base Python accepts (``12``, ``0x1000``)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip(), 0)
    except ValueError:
        raise ValueError(f"{what} must be an integer, not {value!r}") from None


def parse_bool(value: bool | int | str, what: str = "flag") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on", "y"):
        return True
    if s in ("0", "false", "no", "off", "n"):
        return False
    raise ValueError(f"{what} must be a boolean (1/0, true/false, yes/no), not {value!r}")


def parse_timeout(value: float | int | str | None) -> float | None:
    """Seconds; ``None``/``none``/``inf`` means wait forever."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("none", "inf", "forever"):
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number of seconds, not {value!r}") from None
    if t < 0:
        raise ValueError(f"timeout cannot be negative: {value!r}")
    return None if t == float("inf") else t


# ---- the carrier ----------------------------------------------------------------

class Carrier:
    """What an opened URI gives: a mapped :class:`Region`, a :class:`Doorbell`
    towards the other side, and where the AMP layout sits (``offset``).

    ``own_id`` / ``peer_id`` are the ivshmem peer numbers where that means
    something (``None`` otherwise).  ``close()`` is idempotent and releases
    everything the carrier opened; the region's unmap is deferred while a
    FIFO still uses it.
    """

    def __init__(self, region: Region, doorbell: Doorbell, *, uri: str, offset: int = 0,
                 own_id: int | None = None, peer_id: int | None = None,
                 closers: Iterable[Callable[[], Any]] = ()) -> None:
        self._region: Region | None = region
        self.doorbell: Doorbell = doorbell
        self.uri = uri
        self.offset = offset
        self.own_id = own_id
        self._peer_id = peer_id
        self._closers = list(closers)
        self.closed = False
        if offset < 0 or offset >= region.size:
            raise ValueError(f"{uri}: offset {offset:#x} is outside the region "
                             f"(size {region.size:#x})")

    @property
    def region(self) -> Region:
        """The mapped region (still there after close(), then closed itself).
        Raises ValueError once :meth:`detach_region` handed it over."""
        if self._region is None:
            raise ValueError(f"{self.uri}: the region was detached from this carrier")
        return self._region

    @property
    def peer_id(self) -> int | None:
        return self._peer_id

    def fileno(self) -> int:
        """An fd that becomes readable when the carrier has events for
        :meth:`poll_events` (e.g. ivshmem peers coming and going)."""
        raise ValueError(f"{type(self).__name__} has no event source")

    def poll_events(self) -> list[tuple[str, int]]:
        """Carrier events since the last call, without blocking."""
        return []

    def detach_region(self) -> Region:
        """Hand the region over to the caller and close everything else;
        the caller then owns the region (and must close it)."""
        region, self._region = self.region, None
        self.close()
        return region

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.doorbell.close()
        if self._region is not None:
            self._region.close()
        closers, self._closers = self._closers, []
        for fn in reversed(closers):
            fn()

    def __enter__(self) -> "Carrier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ids = ""
        if self.own_id is not None:
            ids = f" own_id={self.own_id} peer_id={self.peer_id}"
        size = f" size={self._region.size:#x}" if self._region is not None else ""
        return (f"<{type(self).__name__} {self.uri}{size} offset={self.offset:#x}{ids}"
                f"{' closed' if self.closed else ''}>")


# ---- the registry ----------------------------------------------------------------

Opener = Callable[..., Carrier]


@dataclass(frozen=True)
class Scheme:
    name: str
    opener: Opener
    options: frozenset[str]
    summary: str


_SCHEMES: dict[str, Scheme] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")
_PATH_PREFIXES = ("/", "./", "../", "~")


def register_scheme(name: str, opener: Opener, *, options: Iterable[str] = (),
                    summary: str = "", replace: bool = False) -> None:
    """Make ``NAME:TARGET`` URIs open with ``opener(target, uri=..., **options)``.

    ``options`` lists the scheme's own option names (the common ones are
    always accepted); the opener gets every option the caller gave, as a
    string when it came from the URI.
    """
    name = name.lower()
    if not _NAME_RE.match(name):
        raise ValueError(f"bad scheme name {name!r}")
    if name in _SCHEMES and not replace:
        raise ValueError(f"scheme {name!r} is already registered")
    _SCHEMES[name] = Scheme(name, opener, frozenset(options) | COMMON_OPTIONS, summary)


def schemes() -> dict[str, str]:
    """Registered scheme names and their one-line summaries."""
    return {n: s.summary for n, s in sorted(_SCHEMES.items())}


# Bare paths that belong to a scheme other than file: (e.g. /dev/uio3 -> uio:).
_BARE_PATHS: list[tuple["re.Pattern[str]", str]] = []


def register_bare_path(pattern: str, scheme: str) -> None:
    """Send bare paths matching ``pattern`` (a full-match regex) to ``scheme``
    instead of ``file:``."""
    _BARE_PATHS.append((re.compile(pattern), scheme))


def parse_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """``(scheme, target, options)``; options are raw strings."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"empty region URI {uri!r}")
    uri = uri.strip()
    body, sep, frag = uri.partition("#")
    options = _parse_fragment(uri, frag) if sep else {}
    if body.startswith(_PATH_PREFIXES):
        path = os.path.expanduser(body)
        for pattern, scheme in _BARE_PATHS:
            if pattern.fullmatch(path):
                return scheme, path, options
        return "file", path, options
    scheme, colon, target = body.partition(":")
    if not colon or not scheme:
        raise ValueError(f"{uri!r} is not a region URI: use SCHEME:TARGET "
                         f"(schemes: {', '.join(sorted(_SCHEMES))}) or a path "
                         f"starting with /, ./ or ../")
    return scheme.lower(), target, options


def _parse_fragment(uri: str, frag: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in frag.split("&"):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(f"{uri!r}: empty option name in {item!r}")
        if key in options:
            raise ValueError(f"{uri!r}: option {key!r} given twice")
        options[key] = value if eq else "1"
    return options


def open_carrier(uri: str, **opts: Any) -> Carrier:
    """Open ``uri`` and return a :class:`Carrier` (region + doorbell)."""
    scheme, target, options = parse_uri(uri)
    entry = _SCHEMES.get(scheme)
    if entry is None:
        raise ValueError(f"unknown region scheme {scheme!r} in {uri!r}; known schemes: "
                         f"{', '.join(sorted(_SCHEMES))} (or a bare path)")
    options.update(opts)
    unknown = sorted(set(options) - entry.options)
    if unknown:
        raise ValueError(f"{uri!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} for {scheme}: URIs; known: "
                         f"{', '.join(sorted(entry.options))}")
    return entry.opener(target, uri=uri, **options)


def open_region(uri: str, **opts: Any) -> Region:
    """Open ``uri`` and keep only its region (the doorbell and any
    connection are released; the caller closes the region)."""
    return open_carrier(uri, **opts).detach_region()


def region_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The common mapping options as ``Region.from_fd`` keywords."""
    out: dict[str, Any] = {}
    if opts.get("bus_base") is not None:
        out["bus_base"] = parse_int(opts["bus_base"], "bus_base")
    if opts.get("memtype") is not None:
        out["memtype"] = opts["memtype"]
    if opts.get("readonly") is not None:
        out["readonly"] = parse_bool(opts["readonly"], "readonly")
    return out


# ---- file-like schemes: shm, file, bare path, fd -------------------------------

def _fail(exc_type: type[OSError], err: OSError, message: str) -> OSError:
    return exc_type(err.errno, message)


def _open_path(path: str, *, uri: str, label: str, create_hint: str, size: Any = None,
               create: Any = False, mode: Any = 0o600, unlink: Any = False,
               offset: Any = 0, timeout: Any = 0, **opts: Any) -> Carrier:
    """Shared by ``shm:`` and ``file:``: open (or create) ``path`` and map it."""
    ropts = region_options(opts)
    readonly = ropts.get("readonly", False)
    want = parse_size(size) if size is not None else None
    create = parse_bool(create, "create")
    unlink = parse_bool(unlink, "unlink")
    wait = parse_timeout(timeout)
    deadline = None if wait is None else time.monotonic() + wait
    if create:
        if not want:
            raise ValueError(f"{uri}: create=1 needs a non-zero size= (e.g. size=64K)")
        if readonly:
            raise ValueError(f"{uri}: cannot create a read-only object")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         _parse_mode(mode))
        except FileExistsError as e:
            raise _fail(FileExistsError, e, f"{label} already exists ({path}); open it without "
                        f"create=1, or remove it first") from None
        except OSError as e:
            raise _fail(type(e), e, f"cannot create {label} ({path}): {e.strerror}") from None
        try:
            os.ftruncate(fd, want)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise _fail(type(e), e, f"cannot size {label} to {want} bytes: {e.strerror}") from None
        actual = want
    else:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        while True:
            try:
                fd = os.open(path, flags)
            except FileNotFoundError as e:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _fail(FileNotFoundError, e, f"no {label} ({path}): {create_hint}") from None
                time.sleep(0.01)
                continue
            except IsADirectoryError as e:
                raise _fail(IsADirectoryError, e, f"{label} ({path}) is a directory") from None
            except OSError as e:
                raise _fail(type(e), e, f"cannot open {label} ({path}): {e.strerror}") from None
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                os.close(fd)
                raise ValueError(f"{label} ({path}) is not a regular file or device")
            actual = st.st_size
            # A creator sizes the object just after creating it: wait for that.
            if actual == 0 and (deadline is None or time.monotonic() < deadline):
                os.close(fd)
                time.sleep(0.01)
                continue
            break
        if actual == 0:
            os.close(fd)
            raise ValueError(f"{label} ({path}) is empty (size 0)")
        if want is not None and actual < want:
            os.close(fd)
            raise ValueError(f"{label} ({path}) is too small: {actual} bytes, {want} wanted")
    try:
        region = Region.from_fd(fd, want or actual, own_fd=True, uri=uri, **ropts)
    except BaseException:
        os.close(fd)
        raise
    closers = [lambda: _unlink_quietly(path)] if unlink else []
    try:
        return Carrier(region, PollingDoorbell(), uri=uri, offset=parse_int(offset, "offset"),
                       closers=closers)
    except BaseException:
        region.close()
        raise


def _parse_mode(mode: int | str) -> int:
    # Permission bits are octal whether or not they are written as 0o600.
    if isinstance(mode, int) and not isinstance(mode, bool):
        return mode
    try:
        return int(str(mode).strip().removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"mode must be octal permission bits like 600, not {mode!r}") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_path(name: str) -> str:
    """``/dev/shm/NAME`` for a POSIX shared-memory name (leading ``/`` optional)."""
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or bare in (".", "..") or len(bare) > 255 or "\0" in bare:
        raise ValueError(f"bad POSIX shared-memory name {name!r}: one path component, "
                         f"e.g. shm:vmsgamp or shm:/vmsgamp")
    return "/dev/shm/" + bare


def _open_shm(target: str, *, uri: str, **opts: Any) -> Carrier:
    # shm_open(3) on Linux is open(2) under /dev/shm; going through os.open
    # needs no posix_ipc and gives the same object another process can open.
    path = shm_path(target)
    return _open_path(path, uri=uri, label=f"shared-memory object shm:{target}",
                      create_hint="create it with create=1 and size=, or start the side "
                                  "that creates it first", **opts)


def _open_file(target: str, *, uri: str, **opts: Any) -> Carrier:
    if target.startswith("//"):          # file:///abs/path
        target = target[2:]
    if not target:
        raise ValueError(f"{uri!r}: no path")
    return _open_path(target, uri=uri, label=f"file {target}",
                      create_hint="check the path, or create it with create=1 and size=", **opts)


def _open_fd(target: str, *, uri: str, size: Any = None, offset: Any = 0,
             timeout: Any = None, **opts: Any) -> Carrier:
    try:
        fd = int(target, 10)
    except ValueError:
        raise ValueError(f"{uri!r}: memfd:/fd: take an inherited file-descriptor number, "
                         f"e.g. fd:3") from None
    if fd < 0:
        raise ValueError(f"{uri!r}: negative fd number")
    ropts = region_options(opts)
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise _fail(type(e), e, f"{uri}: fd {fd} is not open: {e.strerror}") from None
    actual = st.st_size
    want = parse_size(size) if size is not None else actual
    if want == 0:
        raise ValueError(f"{uri}: fd {fd} has size 0")
    if want > actual:
        raise ValueError(f"{uri}: fd {fd} is too small: {actual} bytes, {want} wanted")
    # Our own duplicate: closing the carrier must not close the caller's fd.
    mine = os.dup(fd)
    try:
        region = Region.from_fd(mine, want, own_fd=True, uri=uri, **ropts)
    except BaseException:
        os.close(mine)
        raise
    try:
        return Carrier(region, PollingDoorbell(), uri=uri, offset=parse_int(offset, "offset"))
    except BaseException:
        region.close()
        raise


_FILE_OPTIONS = ("size", "create", "mode", "unlink")

register_scheme("shm", _open_shm, options=_FILE_OPTIONS,
                summary="shm:NAME  POSIX shared memory (/dev/shm/NAME), polling doorbell")
register_scheme("file", _open_file, options=_FILE_OPTIONS,
                summary="file:PATH or a bare path  a mappable file, polling doorbell")
register_scheme("fd", _open_fd, options=("size",),
                summary="fd:N  an inherited file descriptor (memfd, shm), polling doorbell")
register_scheme("memfd", _open_fd, options=("size",),
                summary="memfd:N  same as fd:N")
