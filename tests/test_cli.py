"""The command line's shared contract: help, --version, exit codes, --json on
failure, one-line errors, children that import the installed package."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmsgamp._cmd._process import vmsgamp_argv
from vmsgamp.cli import build_parser, main


def _run(*args: str, cwd: str | os.PathLike[str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsgamp", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, **kw)


def _subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def test_every_command_and_option_is_described():
    commands = dict(_subparsers(build_parser()))
    assert {"serve", "devices", "ping", "console", "emulate", "bench", "decode", "dump",
            "ivshmem-server", "vhost-user", "doctor", "bench devices"} <= set(commands)
    for name, p in commands.items():
        assert p.description and len(p.description) > 20, f"{name}: no description"
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"vmsgamp {name} {'/'.join(action.option_strings) or action.dest}: no help"
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and not isinstance(action, argparse._HelpAction):
                assert "default" in (action.help or "") or "(default: " in text, (name, action.dest)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from vmsgamp import __version__

    assert capsys.readouterr().out == f"vmsgamp {__version__}\n"


def test_usage_errors_exit_2_and_the_help_says_so():
    p = _run("serve", "--region")
    assert p.returncode == 2 and "usage:" in p.stderr
    assert "2 usage error" in _run("--help").stdout
    assert _run().returncode == 2                      # no command: the help, exit 2


@pytest.mark.parametrize("args,needle", [
    (["emulate", "--duration", "-1"], "--duration: must be greater than 0"),
    (["emulate", "--duration", "nan"], "not a finite number"),
    (["decode", "--max-msg-size", "-4", "00"], "--max-msg-size: must be at least 1"),
    (["ping", "--region", "x", "-n", "0"], "--count: must be at least 1"),
    (["bench", "devices", "--duration", "-2"], "--duration: must be greater than 0"),
    (["ivshmem-server", "/tmp/x", "--vectors", "65"], "must be 1..64"),
    (["console", "--region", "x", "--escape", "q"], "not a control key"),
])
def test_bad_values_are_usage_errors(args, needle):
    p = _run(*args)
    assert p.returncode == 2 and needle in p.stderr, p.stderr


@pytest.mark.parametrize("spec,needle", [
    ("gpio:lines=abc", "gpio: lines=abc: not an integer: 'abc'"),
    ("rng:source=/nonexistent", "rng: source=/nonexistent: no such file or directory"),
    ("rng:/nonexistent", "rng: source=/nonexistent: no such file or directory"),
    ("blk:/nonexistent.img", "blk: file=/nonexistent.img: no such file or directory"),
    ("console:size_order=sideways", "console: size_order=sideways:"),
    ("console:rows=x;cols=80", "console: rows=x: not an integer"),
    ("toaster", "unknown device type 'toaster'"),
])
def test_device_errors_name_the_device_and_option(spec, needle):
    p = _run("serve", "--region", "shm:vmsgamp-never-created", "--devices", spec)
    assert p.returncode == 1 and needle in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "[Errno" not in p.stderr


def test_bare_path_shorthand_is_the_same_grammar_everywhere(tmp_path):
    from vmsgamp.devices._base import parse_device_spec

    assert parse_device_spec("blk:disk.img") == ("blk", {"file": "disk.img"})
    assert parse_device_spec("blk:disk.img;readonly") == ("blk", {"file": "disk.img", "readonly": "1"})
    assert parse_device_spec("rng:/dev/hwrng") == ("rng", {"source": "/dev/hwrng"})
    assert parse_device_spec("console:pty") == ("console", {"pty": "1"})
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    shm = "shm:vmsgamp-test-bare-" + os.urandom(4).hex()
    serve = subprocess.Popen([sys.executable, "-m", "vmsgamp", "serve", "--region",
                              f"{shm}#create=1&size=1M&unlink=1", "--devices", f"blk:{img}", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(serve.stdout.readline())
        assert info["devices"][0]["name"] == "blk"
        assert "BLK_FLUSH" in info["devices"][0]["features"]
    finally:
        serve.terminate()
        assert serve.wait(20) == 0


def test_small_region_and_directory_socket_say_so(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1221))
    p = _run("devices", "--region", str(small))
    assert p.returncode == 1 and "region too small: 1221 bytes" in p.stderr, p.stderr
    p = _run("devices", "--region", f"ivshmem:{tmp_path}")
    assert p.returncode == 1 and "is a directory, not an ivshmem server socket" in p.stderr, p.stderr


@pytest.mark.parametrize("args", [
    ["devices", "--region", "bogus:x"],
    ["ping", "--region", "shm:vmsgamp-surely-missing"],
    ["dump", "--region", "shm:vmsgamp-surely-missing"],
    ["serve", "--region", "shm:x", "--devices", "toaster"],
    ["vhost-user", "--socket", "/tmp/x.sock", "--device", "gpio"],
    ["doctor", "ivshmem:/nonexistent.sock"],
    ["decode", "0002"],
    ["emulate", "--devices", "toaster"],
    ["console", "--region", "shm:vmsgamp-surely-missing"],
    ["ivshmem-server", "/nonexistent-dir/x.sock"],
])
def test_json_failure_is_one_object_and_one_stderr_line(args):
    p = _run(*args, "--json")
    assert p.returncode == 1, p.stderr
    assert p.stdout.count("\n") == 1
    obj = json.loads(p.stdout)
    assert isinstance(obj, dict) and obj["error"]
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"vmsgamp {args[0]}: error: ")
    assert obj["error"] in p.stderr or p.stderr.split("error: ", 1)[1].strip() in json.dumps(obj)


def test_broken_pipe_is_silent(tmp_path):
    sh = subprocess.run(f"{sys.executable} -m vmsgamp decode {' '.join(['0002000005000800'] * 3000)} "
                        f"| head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert sh.stdout.startswith("[0] transport GET_DEVICE_INFO")
    assert sh.stderr == "", sh.stderr


def _fake_package(where: Path) -> None:
    """A source tree without compiled modules, as in a fresh checkout: it
    must never be what a child imports."""
    pkg = where / "vmsgamp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('the uncompiled tree in the cwd was imported')\n")
    (pkg / "__main__.py").write_text("raise SystemExit('the uncompiled tree in the cwd was imported')\n")


def test_children_import_the_installed_package_whatever_the_cwd(tmp_path):
    _fake_package(tmp_path)
    p = subprocess.run(vmsgamp_argv("--version"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("vmsgamp "), p.stderr


def test_emulate_from_a_source_tree_cwd(tmp_path):
    """The README's first command runs from the clone's root, where
    ``python -m vmsgamp`` in the child used to import ./vmsgamp."""
    _fake_package(tmp_path)
    p = subprocess.run(vmsgamp_argv("emulate", "--devices", "rng", "--duration", "0.1", "--json"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["device_process"]["exit_code"] == 0
