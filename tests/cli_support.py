"""Running the installed CLI from tests: one way, shared by the CLI test files."""
from __future__ import annotations

import subprocess
import sys


def run_vmsgamp(*args: str, input: str | None = None, timeout: float = 120,
                check: bool = False) -> subprocess.CompletedProcess[str]:
    """`vmsgamp ARGS` to its end; with ``check``, a non-zero exit fails the
    test with both outputs in the message."""
    p = subprocess.run([sys.executable, "-m", "vmsgamp", *args], capture_output=True, text=True,
                       input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"vmsgamp {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def spawn(*args: str) -> subprocess.Popen[str]:
    """`vmsgamp ARGS` in the background, stdout and stderr piped as text."""
    return subprocess.Popen([sys.executable, "-m", "vmsgamp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
