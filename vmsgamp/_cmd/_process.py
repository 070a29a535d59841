"""Child processes that vmsgamp starts itself (``emulate``'s device process,
``bench vhost-user``'s back-end).

``python -m vmsgamp`` would put the current directory first on ``sys.path``,
so run from a source checkout it imports the uncompiled ``./vmsgamp`` tree
instead of the installed package (``No module named
'vmsgamp._core.addrspace'``).  A child therefore starts through a small
``-c`` bootstrap that drops that entry before importing anything (``-P``
does the same but only exists from Python 3.11; requires-python is 3.10).

The bootstrap also asks the kernel to send the child SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed parent leaves no
device process behind, and each child gets its own session: Ctrl-C in the
terminal reaches the parent only, which then stops its children in order.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from vmsgamp.cli import cleanup_shield

_PARENT_ENV = "VMSGAMP_PARENT_PID"

# One line: visible as-is in `ps`.  sys.path[0] is '' for -c (absent with
# PYTHONSAFEPATH): the current directory, which must not shadow the package.
_BOOTSTRAP = ("import sys; sys.path[:1] = [p for p in sys.path[:1] if p]; "
              "from vmsgamp._cmd._process import child_main; child_main()")


def vmsgamp_argv(*args: str) -> list[str]:
    """argv running ``vmsgamp ARGS...`` with this interpreter and the
    installed package, whatever the current directory."""
    return [sys.executable, "-c", _BOOTSTRAP, *args]


def child_main() -> None:
    """Entry point of a child started with :func:`vmsgamp_argv`."""
    parent = os.environ.pop(_PARENT_ENV, None)
    if parent is not None:
        _exit_with_parent(int(parent))
    from vmsgamp.cli import main

    sys.exit(main(sys.argv[1:]))


def _exit_with_parent(parent: int) -> None:
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:       # the parent died before prctl: stop now
        sys.exit(143)


def start_child(args: list[str], **popen_kw: Any) -> subprocess.Popen[str]:
    """Start ``vmsgamp ARGS...`` as a child (text mode, own session)."""
    env = dict(popen_kw.pop("env", None) or os.environ)
    env[_PARENT_ENV] = str(os.getpid())
    return subprocess.Popen(vmsgamp_argv(*args), env=env, text=True, start_new_session=True,
                            **popen_kw)


def stop_child(child: subprocess.Popen[Any], timeout: float = 10.0) -> tuple[str, str]:
    """SIGTERM, wait up to ``timeout`` (then SIGKILL); returns what is left
    of its (stdout, stderr).  Signals arriving meanwhile wait until the
    child is gone."""
    with cleanup_shield():
        if child.returncode is not None and all(f is None or f.closed for f in (child.stdout, child.stderr)):
            return "", ""            # stopped and collected already
        if child.poll() is None:
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
    return out or "", err or ""
