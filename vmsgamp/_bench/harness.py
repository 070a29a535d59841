"""Helpers for two-process benchmarks with each process pinned to its own CPU.

Every mechanism the FIFO is compared with (and the FIFO itself) is measured
the same way: the parent process is pinned to CPU A, a forked child to CPU B,
the child says when it is ready, the parent starts the clock, and the child
sends back a small JSON result dict.  Timestamps are ``CLOCK_MONOTONIC``
(``time.monotonic_ns``), which is one clock for every process on Linux, so a
start taken in the parent and an end taken in the child can be subtracted.

Only the standard library; Linux only (``sched_setaffinity``, ``fork``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "BenchError",
    "PinnedChild",
    "compile_c",
    "default_cache_dir",
    "fork_pinned",
    "median",
    "median_dicts",
    "median_of_n",
    "now_ns",
    "one_way",
    "percentiles",
    "pick_cpus",
    "pinned",
    "round_trips",
    "run_pair",
    "spawn_pinned",
]

# One system-wide clock, so parent and child timestamps are comparable.
now_ns = time.monotonic_ns

ResultDict = dict[str, Any]
ReadyFn = Callable[[], None]


class BenchError(RuntimeError):
    """A benchmark could not run (no second CPU, child failed, timeout...)."""


# ---- CPUs -------------------------------------------------------------------


def pick_cpus(cpus: Sequence[int] | None = None) -> tuple[int, int]:
    """Two distinct CPUs this process may use: ``cpus`` if given, else the
    first two of ``os.sched_getaffinity(0)``.

    Busy-polling peers sharing one CPU would measure the scheduler, not the
    mechanism, so fewer than two CPUs is an error rather than a fallback.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if cpus is not None:
        a, b = (int(c) for c in cpus)
        if a == b:
            raise BenchError(f"the two processes need different CPUs, got {a} twice")
        missing = {a, b} - set(allowed)
        if missing:
            raise BenchError(f"CPU(s) {sorted(missing)} not in this process's affinity {allowed}")
        return a, b
    if len(allowed) < 2:
        raise BenchError(f"two-process benchmarks need two CPUs; affinity allows only {allowed}")
    return allowed[0], allowed[1]


@contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Pin the calling process to ``cpu`` for the block, then restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---- forked, pinned child ---------------------------------------------------

_READY = b"R"


class PinnedChild:
    """A forked child pinned to one CPU that reports readiness then a result.

    Protocol on a private pipe: one ``R`` byte when the child is ready, then
    the JSON result, then EOF.  A child that raises sends
    ``{"__error__": traceback}`` instead, re-raised here as BenchError.
    """

    def __init__(self, pid: int, rfd: int, cpu: int) -> None:
        self.pid = pid
        self.cpu = cpu
        self._rfd = rfd
        self._pending = b""  # bytes read past the ready byte
        self._reaped = False

    def _read_some(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self._rfd], [], [], left)[0]:
            raise BenchError(f"benchmark child {self.pid} on CPU {self.cpu} timed out")
        return os.read(self._rfd, 65536)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        chunk = self._read_some(deadline)
        if chunk[:1] != _READY:
            # Died or raised before calling ready(): report that instead.
            self._pending = chunk
            self.result(timeout)
            raise BenchError(f"benchmark child {self.pid} exited before it was ready")
        self._pending = chunk[1:]

    def result(self, timeout: float = 60.0) -> ResultDict:
        deadline = time.monotonic() + timeout
        data = bytearray(self._pending)
        try:
            while True:
                chunk = self._read_some(deadline)
                if not chunk:
                    break
                data += chunk
        except BenchError:
            self.kill()
            raise
        finally:
            if self._rfd >= 0:  # kill() may have closed it already
                os.close(self._rfd)
                self._rfd = -1
        status = self._reap()
        if data.startswith(_READY):
            data = data[1:]
        if not data:
            raise BenchError(
                f"benchmark child {self.pid} died without a result (status {status:#x})"
            )
        result = json.loads(data)
        if "__error__" in result:
            raise BenchError(f"benchmark child failed:\n{result['__error__']}")
        return result

    def _reap(self) -> int:
        if self._reaped:
            return 0
        _, status = os.waitpid(self.pid, 0)
        self._reaped = True
        return status

    def kill(self) -> None:
        """Kill and reap this child (only this pid); safe to call twice."""
        if self._reaped:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap()
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1


def fork_pinned(
    child_fn: Callable[[ReadyFn], ResultDict | None], cpu: int, *, timeout: float = 120.0
) -> PinnedChild:
    """Fork a child pinned to ``cpu`` running ``child_fn(ready)``.

    Fork (not spawn) so the child inherits pipes, sockets, mmaps and queues
    created just before; ``child_fn`` calls ``ready()`` once set up and
    returns a JSON-serialisable dict.  The child never returns into the
    caller's code (``os._exit``) and kills itself after ``timeout`` seconds
    (SIGALRM, default action) so a hung peer never outlives the run.
    """
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            # Ctrl-C reaches the whole process group; the parent handles it
            # and kills this child.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(max(1, math.ceil(timeout)))
            os.sched_setaffinity(0, {cpu})

            def ready() -> None:
                os.write(wfd, _READY)

            result = child_fn(ready) or {}
            payload = json.dumps(result).encode()
        except BaseException:  # report everything, even KeyboardInterrupt
            payload = json.dumps({"__error__": traceback.format_exc()}).encode()
            code = 1
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(wfd, view) :]
        finally:
            os._exit(code)
    os.close(wfd)
    return PinnedChild(pid, rfd, cpu)


@contextmanager
def _parent_deadline(timeout: float) -> Iterator[None]:
    """Raise BenchError in the parent if the measured block overruns.

    The parent may be blocked in a recv() on a mechanism whose peer died;
    SIGALRM interrupts it (Python runs the handler between bytecodes and
    retries EINTR only when the handler returns).  Main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise BenchError(f"benchmark parent timed out after {timeout:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_pair(
    parent_fn: Callable[[], ResultDict | None],
    child_fn: Callable[[ReadyFn], ResultDict | None],
    cpus: Sequence[int] | None = None,
    *,
    timeout: float = 120.0,
) -> tuple[ResultDict, ResultDict]:
    """Run ``parent_fn`` on CPU A and ``child_fn`` on CPU B, concurrently.

    ``parent_fn`` starts only after the child called ``ready()``.  Returns
    ``(parent_result, child_result)``.  The parent's affinity is restored.
    """
    cpu_a, cpu_b = pick_cpus(cpus)
    with pinned(cpu_a):
        child = fork_pinned(child_fn, cpu_b, timeout=timeout)
        try:
            with _parent_deadline(timeout):
                child.wait_ready(timeout)
                parent_result = parent_fn() or {}
            child_result = child.result(timeout)
        except BaseException:
            child.kill()
            raise
    return parent_result, child_result


def spawn_pinned(
    argv: Sequence[str], cpu: int, *, pass_fds: Iterable[int] = (), **popen_kw: Any
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (e.g. a peer that is not Python) pinned to ``cpu``.

    The pin is applied right after exec starts, not before; benchmarks wait
    for the peer to say it is ready anyway, so the few microseconds it may
    run elsewhere do not matter.  (A preexec_fn would pin earlier but is
    unsafe in a threaded parent.)
    """
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        list(argv), pass_fds=tuple(pass_fds), **popen_kw
    )
    try:
        os.sched_setaffinity(proc.pid, {cpu})
    except ProcessLookupError:
        pass  # already gone; the caller sees its exit status
    return proc


# ---- common measurements ----------------------------------------------------


def one_way(
    producer: Callable[[], None],
    consumer: Callable[[], ResultDict | None],
    msgs: int,
    cpus: Sequence[int] | None = None,
    *,
    timeout: float = 120.0,
) -> ResultDict:
    """One-way throughput: the parent runs ``producer()`` (sends ``msgs``
    messages), the child ``consumer()`` (receives them all, checking order).

    Time runs from just before the first send to just after the last
    receive, so the producer cannot look fast by filling a buffer.
    """

    def child(ready: ReadyFn) -> ResultDict:
        ready()
        extra = consumer() or {}
        return {"end_ns": now_ns(), **extra}

    def parent() -> ResultDict:
        start = now_ns()
        producer()
        return {"start_ns": start}

    p, c = run_pair(parent, child, cpus, timeout=timeout)
    seconds = (c["end_ns"] - p["start_ns"]) / 1e9
    extra = {k: v for k, v in c.items() if k != "end_ns"}
    return {"msgs": msgs, "seconds": seconds, "msgs_per_s": msgs / seconds, **extra}


def round_trips(
    ping: Callable[[int], None],
    echo: Callable[[int], None],
    iters: int,
    cpus: Sequence[int] | None = None,
    *,
    warmup: int = 100,
    timeout: float = 120.0,
) -> ResultDict:
    """Round-trip latency: the parent times ``ping(i)`` (send i, wait for
    the reply) ``warmup + iters`` times; the child runs ``echo(n)`` which
    answers ``n`` pings.  Returns :func:`percentiles` of the timed ones.
    """
    total = warmup + iters

    def child(ready: ReadyFn) -> None:
        ready()
        echo(total)

    def parent() -> ResultDict:
        samples = [0] * iters
        clock = now_ns
        for i in range(warmup):
            ping(i)
        for i in range(iters):
            t0 = clock()
            ping(warmup + i)
            samples[i] = clock() - t0
        return {"samples": samples}

    p, _ = run_pair(parent, child, cpus, timeout=timeout)
    return {"iters": iters, **percentiles(p["samples"])}


# ---- statistics -------------------------------------------------------------


def percentiles(
    samples_ns: Sequence[int], points: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Nearest-rank percentiles of nanosecond samples, in microseconds.

    Default keys ``p50_us``, ``p99_us``, ``p999_us`` plus ``min_us`` and
    ``mean_us``.  Nearest rank (no interpolation) so every reported value is
    a latency that was really observed; ``bench/c/spsc_ref.c`` uses the same
    rule.
    """
    if not samples_ns:
        raise ValueError("no samples")
    if points is None:
        points = {"p50_us": 50.0, "p99_us": 99.0, "p999_us": 99.9}
    ordered = sorted(samples_ns)
    n = len(ordered)
    out: dict[str, float] = {}
    for key, p in points.items():
        rank = min(n, max(1, math.ceil(p / 100.0 * n - 1e-9)))
        out[key] = ordered[rank - 1] / 1000.0
    out["min_us"] = ordered[0] / 1000.0
    out["mean_us"] = sum(ordered) / n / 1000.0
    return out


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_dicts(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-key median over result dicts, for numeric keys only.

    A key missing from some runs (a mechanism skipped once) takes the median
    of the runs that have it.
    """
    keys: dict[str, None] = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k)
    out: dict[str, float] = {}
    for k in keys:
        m = median(r.get(k) for r in results)
        if m is not None:
            out[k] = m
    return out


def median_of_n(
    fn: Callable[[], Mapping[str, Any]], n: int
) -> tuple[dict[str, float], list[Mapping[str, Any]]]:
    """Call ``fn`` ``n`` times; return (per-key medians, raw results)."""
    raw = [fn() for _ in range(n)]
    return median_dicts(raw), raw


# ---- compiling the C reference ---------------------------------------------

DEFAULT_CFLAGS: tuple[str, ...] = ("-O2", "-std=gnu11", "-Wall")


def default_cache_dir() -> Path:
    """``bench/out/`` of the source checkout this package is imported from,
    else ``$XDG_CACHE_HOME/vmsgamp`` (``~/.cache/vmsgamp``)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "bench").is_dir():
        return root / "bench" / "out"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vmsgamp"


def compile_c(
    source: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    cflags: Sequence[str] = DEFAULT_CFLAGS,
    cc: str | None = None,
) -> Path:
    """Compile one C file into an executable in ``out_dir``, only if needed.

    The binary's name carries a hash of the compiler and flags, so changing
    either gives a new binary instead of a stale one; within one name it is
    rebuilt when the source is newer.  Built under a temporary name and
    renamed, so a concurrent run never executes a half-written file.
    """
    src = Path(source).resolve()
    if not src.is_file():
        raise BenchError(f"C source not found: {src}")
    compiler = cc or os.environ.get("CC") or "gcc"
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise BenchError(f"C compiler {compiler!r} not found (set CC or install gcc)")
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256("\0".join([compiler_path, *cflags]).encode()).hexdigest()[:10]
    binary = out / f"{src.stem}-{tag}"
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return binary
    tmp = out / f".{binary.name}.{os.getpid()}.tmp"
    cmd = [compiler_path, *cflags, "-o", str(tmp), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"compiling {src.name} failed:\n$ {' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, binary)
    return binary
