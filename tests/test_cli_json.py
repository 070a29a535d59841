"""The ``--json`` contract of every command, as a script sees it.

stdout holds exactly one JSON object and nothing else: on success, on a
runtime error (exit 1) and on a usage error (exit 2, argparse's own
included), with the same exit code as without ``--json``.  The documented
exception is ``vmsgamp trace`` on a live bus: JSON Lines, one object per
record.  Also here: the command line imports only the command it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from cli_support import run_vmsgamp, spawn

from vmsgamp.cli import COMMANDS, build_parser, main


vm = run_vmsgamp


def one_object(stdout: str) -> dict:
    """stdout is one JSON object on one line, nothing before or after it."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, repr(stdout[:500])
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


def json_commands() -> list[list[str]]:
    """Every (sub)command that takes --json, as its argv prefix."""
    found = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
            elif "--json" in action.option_strings:
                found.append(prefix)

    walk(build_parser(), [])
    return found


JSON_COMMANDS = json_commands()


def test_every_command_with_output_takes_json():
    names = {" ".join(c) for c in JSON_COMMANDS}
    assert {"serve", "devices", "ping", "console", "emulate", "decode", "dump", "ivshmem-server",
            "vhost-user", "doctor", "trace", "bench fifo", "bench codec", "bench devices"} <= names


# ---- usage errors: exit 2 and the error object -------------------------------------------------

@pytest.mark.parametrize("cmd", JSON_COMMANDS, ids=" ".join)
def test_usage_error_is_one_object_exit_2(cmd, capsys):
    rc = main([*cmd, "--json", "--no-such-option"])
    out, err = capsys.readouterr()
    assert rc == 2
    obj = one_object(out)
    assert obj["exit_code"] == 2 and obj["error"] and obj["command"] == cmd[0]
    assert err.splitlines()[-1].endswith(f"error: {obj['error']}")
    # The same code without --json, and then nothing on stdout.
    rc = main([*cmd, "--no-such-option"])
    out, _ = capsys.readouterr()
    assert rc == 2 and out == ""


@pytest.mark.parametrize("argv", [
    ["decode", "--max-msg-size", "-4", "00", "--json"],             # a bad value (argparse)
    ["decode", "--json"],                                           # UsageError raised by the command
    ["trace", "--region", "shm:x", "-c", "0", "--json"],
    ["nonsense", "--json"],                                          # not a command
])
def test_other_usage_errors_are_one_object(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and one_object(out)["exit_code"] == 2
    assert err.count("error: ") == 1


def test_words_after_double_dash_do_not_ask_for_json(capsys):
    assert main(["decode", "--", "--json"]) == 1       # "--json" is a message here: bad hex
    out, _ = capsys.readouterr()
    assert "ERROR bad hex" in out and not out.startswith("{")


# ---- success and runtime errors: one object --------------------------------------------------

def test_decode(capsys):
    assert main(["decode", "0002000005000800", "--json"]) == 0
    obj = one_object(capsys.readouterr().out)
    assert obj["messages"][0]["name"] == "GET_DEVICE_INFO"
    assert main(["decode", "0002000005000800", "00", "--json"]) == 1
    obj = one_object(capsys.readouterr().out)
    assert obj["exit_code"] == 1 and "message 1" in obj["error"] and len(obj["messages"]) == 2


def _capture(path: str, n: int) -> None:
    from vmsgamp.trace import DIR_INBOUND, DIR_OUTBOUND, Tracer

    with Tracer(path) as t:
        iface = t.interface("shm:test", "g2", "test")
        for i in range(n):
            t.record(iface, DIR_OUTBOUND if i % 2 == 0 else DIR_INBOUND, bytes.fromhex("0002000005000800"),
                     1_000 + i)


def test_decode_pcap_is_one_object(tmp_path, capsys):
    cap = str(tmp_path / "x.pcapng")
    _capture(cap, 5)
    assert main(["decode", "--pcap", cap, "--json"]) == 0
    obj = one_object(capsys.readouterr().out)
    assert obj["count"] == len(obj["messages"]) == 5 and obj["file"] == cap
    assert [m["direction"] for m in obj["messages"][:2]] == ["driver_to_device", "device_to_driver"]
    assert all(m["name"] == "GET_DEVICE_INFO" and m["interface"] == "shm:test" for m in obj["messages"])
    # A capture cut short: the messages before the damage, the error, exit 1.
    data = open(cap, "rb").read()
    cut = str(tmp_path / "cut.pcapng")
    with open(cut, "wb") as f:
        f.write(data[:-10])
    assert main(["decode", "--pcap", cut, "--json"]) == 1
    out, err = capsys.readouterr()
    obj = one_object(out)
    assert obj["exit_code"] == 1 and obj["count"] == len(obj["messages"]) < 5 and obj["error"] in err
    assert main(["decode", "--pcap", str(tmp_path / "missing"), "--json"]) == 1
    obj = one_object(capsys.readouterr().out)
    assert obj["exit_code"] == 1 and "no such file" in obj["error"]


def test_trace_dissector_path_and_doctor(capsys):
    assert main(["trace", "--dissector-path", "--json"]) == 0
    assert one_object(capsys.readouterr().out)["dissector_path"].endswith("vmsg.lua")
    assert main(["doctor", "--json"]) == 0
    assert "iommu" in one_object(capsys.readouterr().out)


def test_bench_codec():
    p = vm("bench", "codec", "--json", "--iters", "20", "--repeat", "1")
    assert p.returncode == 0, p.stderr
    assert one_object(p.stdout)


@pytest.fixture
def bus():
    """A device side with an rng and an echo console on a fresh shm object;
    its --json start-up object is the only thing serve prints."""
    name = f"vmsgamp-json-{uuid.uuid4().hex[:8]}"
    serve = spawn("serve", "--region", f"shm:{name}#create=1&size=1M", "--devices", "rng,console:echo",
                  "--json")
    try:
        assert serve.stdout is not None
        info = json.loads(serve.stdout.readline())
        assert [d["name"] for d in info["devices"]] == ["rng", "console"]
        yield f"shm:{name}"
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    assert serve.returncode == 0, err
    assert out == ""                     # nothing after the start-up object


def test_endpoint_commands_on_a_live_bus(bus, tmp_path):
    for argv, key in ((["devices"], "devices"), (["ping", "-n", "3"], "count"), (["dump"], "valid")):
        p = vm(*argv, "--region", bus, "--json")
        assert p.returncode == 0, p.stderr
        assert key in one_object(p.stdout)
    p = vm("console", "--region", bus, "--json", "--linger", "0.5", input="hello\n")
    assert p.returncode == 0, p.stderr
    obj = one_object(p.stdout)
    assert obj["sent"] == 6 and "hello" in obj["output"]
    # trace bounded by -c: JSON Lines (the documented exception), ending with the end record.
    trace = spawn("trace", "--region", bus, "-c", "2", "--json", "--duration", "60")
    wrote = spawn("trace", "--region", bus, "-w", str(tmp_path / "t.pcapng"), "-c", "2", "--json",
                  "--duration", "60")
    try:
        # A passive observer may miss a whole short session on a busy machine
        # (it says so): ping again until both have seen their two messages.
        for _ in range(20):
            ping = vm("ping", "--region", bus, "-n", "3", "--json")
            assert ping.returncode == 0, ping.stderr
            if trace.poll() is not None and wrote.poll() is not None:
                break
            time.sleep(0.2)
        out, err = trace.communicate(timeout=60)
        out_w, err_w = wrote.communicate(timeout=60)
    finally:
        for p in (trace, wrote):
            if p.returncode is None:
                p.kill()
                p.wait()
    assert trace.returncode == 0 and wrote.returncode == 0, (err, err_w)
    records = [json.loads(line) for line in out.splitlines()]
    assert records[-1]["record"] == "end" and records[-1]["messages"] == 2
    assert [r["record"] for r in records].count("message") == 2
    # -w without --print: only the end record, so one object.
    end = one_object(out_w)
    assert end["record"] == "end" and end["messages"] == 2


@pytest.mark.parametrize("argv", [
    ["devices", "--region", "shm:vmsgamp-json-surely-missing"],
    ["trace", "--region", "shm:vmsgamp-json-surely-missing", "--timeout", "0.1"],
    ["bench", "fifo", "--cpus", "98,99", "--msgs", "100"],
    ["doctor", "ivshmem:/nonexistent-dir/x.sock"],                  # the report, with the error
])
def test_runtime_errors_are_one_object_exit_1(argv):
    p = vm(*argv, "--json")
    assert p.returncode == 1, p.stderr
    obj = one_object(p.stdout)
    assert obj["exit_code"] == 1 and obj["error"] in p.stderr


@pytest.mark.parametrize("argv", [["ivshmem-server", "{tmp}/ivs.sock", "--size", "1M"],
                                  ["vhost-user", "--socket", "{tmp}/vu.sock", "--device", "rng"]])
def test_servers_print_one_start_up_object(argv, tmp_path):
    p = spawn(*[a.replace("{tmp}", str(tmp_path)) for a in argv], "--json")
    try:
        assert p.stdout is not None
        obj = json.loads(p.stdout.readline())
        assert isinstance(obj, dict) and "error" not in obj
    finally:
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert rest == ""


def test_emulate():
    p = vm("emulate", "--devices", "rng", "--duration", "0.1", "--json")
    assert p.returncode == 0, p.stderr
    assert one_object(p.stdout)


def test_help_says_where_json_is_json_lines():
    epilog = build_parser().format_help()
    assert "exactly one JSON object" in epilog and "trace" in epilog and "JSON Lines" in epilog
    trace = dict((" ".join(c), c) for c in JSON_COMMANDS)
    assert trace["trace"]
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert "JSON Lines" in sub.choices["trace"].format_help()
    assert "JSON Lines" not in sub.choices["decode"].format_help()


# ---- lazy imports ------------------------------------------------------------------------------

def test_the_help_lines_are_the_commands_own():
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    helps = {ca.dest: ca.help for ca in sub._choices_actions}
    assert helps == {name: line for name, (_mod, line) in COMMANDS.items()}


def _modules_after(code: str) -> set[str]:
    p = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.splitlines()[-1].split())


HEAVY = {"numpy", "asyncio", "vmsgamp.bus", "vmsgamp.carriers", "vmsgamp._core.virtq", "vmsgamp.trace"}


def test_import_and_help_load_nothing_heavy():
    assert not HEAVY & _modules_after("import vmsgamp")
    mods = _modules_after("from vmsgamp.cli import main\n"
                          "import contextlib, io\n"
                          "with contextlib.redirect_stdout(io.StringIO()):\n"
                          "    assert main(['decode', '0002000005000800']) == 0\n"
                          "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n")
    assert not HEAVY & mods
    assert "vmsgamp._cmd.decode" in mods
    assert not {m for m in mods if m.startswith("vmsgamp._cmd.") and m not in (
        "vmsgamp._cmd.decode", "vmsgamp._cmd._args", "vmsgamp._cmd._output")}


def test_the_public_api_is_all_there():
    code = "import vmsgamp\nfor n in vmsgamp.__all__:\n    getattr(vmsgamp, n)\nfrom vmsgamp import *"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    import vmsgamp

    assert set(vmsgamp.__all__) <= set(dir(vmsgamp))
    assert vmsgamp.protocol.decode is not None          # a subpackage as an attribute, as before
    with pytest.raises(AttributeError):
        vmsgamp.no_such_name


def test_a_bug_still_gives_the_object_and_exit_1(monkeypatch, capsys):
    import vmsgamp._cmd.decode as decode

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(decode, "run", broken)
    with pytest.raises(RuntimeError):       # the traceback is kept: python exits 1 with it
        main(["decode", "00", "--json"])
    obj = one_object(capsys.readouterr().out)
    assert obj["exit_code"] == 1 and obj["error"] == "internal error: RuntimeError: boom"
