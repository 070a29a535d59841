"""Type checkers see the installed package as users do: the examples pass
``mypy --strict`` (and pyright), wrong literal values are caught.

Run from a directory outside the repository so that the checkers find
vmsgamp through the installation (an editable install included), never
through the current directory."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
WRONG = Path(__file__).resolve().parent / "data" / "typing" / "wrong_literals.py"


def _copy(tmp_path: Path, files: list[Path]) -> list[str]:
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    return [f.name for f in files]


def _mypy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / ".mypy_cache"),
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_examples_pass_mypy_strict(tmp_path):
    assert EXAMPLES
    p = _mypy(tmp_path, "--strict", *_copy(tmp_path, EXAMPLES))
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_rejects_wrong_literals(tmp_path):
    names = _copy(tmp_path, [WRONG])
    p = _mypy(tmp_path, *names)
    assert p.returncode == 1, p.stdout
    lines = WRONG.read_text().splitlines()
    flagged = {int(m.group(1)) for m in re.finditer(r"wrong_literals\.py:(\d+): error", p.stdout)}
    wanted = {i + 1 for i, line in enumerate(lines) if "# expect:" in line}
    assert flagged == wanted, p.stdout


def _pyright(tmp_path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable, *files],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_pyright_agrees(tmp_path):
    p = _pyright(tmp_path, *_copy(tmp_path, EXAMPLES))
    assert p.returncode == 0, p.stdout + p.stderr
    p = _pyright(tmp_path, *_copy(tmp_path, [WRONG]))
    assert p.returncode == 1 and p.stdout.count("reportArgumentType") == 4, p.stdout
