import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_two_processes_example_runs():
    p = subprocess.run([sys.executable, str(EXAMPLES / "two_processes.py")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "devices: [0]" in p.stdout and "32 random bytes:" in p.stdout
