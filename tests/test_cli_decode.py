"""``vmsgamp decode``: in-process through cli.main and as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmsgamp.cli import main

VECTORS = Path(__file__).resolve().parent / "data" / "virtio-msg-g2-examples.json"
KEYS = {"kind", "response", "msg_id", "name", "dev_num", "token", "msg_size", "payload"}

GDI_REQ = "00 02 00 00 05 00 08 00"
GDI_RESP = "01020000050020000100000051454d55400000000c0000000300000000000000"
QEMU_GET_DEVICES = "03:02:00:00:00:00:12:00:00:00:20:00:20:00:01:00:00:00"


def one_object(out: str) -> dict:
    """stdout with --json: exactly one JSON object."""
    assert out.count("\n") == 1 and out.endswith("\n"), out
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


def messages(out: str) -> list[dict]:
    return one_object(out)["messages"]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["decode", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_one_object_holding_every_message(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, GDI_REQ, GDI_RESP, QEMU_GET_DEVICES, "--json")
    assert rc == 0 and err == ""
    assert set(one_object(out)) == {"messages"}
    msgs = messages(out)
    assert [set(m) for m in msgs] == [KEYS] * 3
    assert msgs[0] == {"kind": "transport", "response": False, "msg_id": 2, "name": "GET_DEVICE_INFO",
                       "dev_num": 0, "token": 5, "msg_size": 8, "payload": {}}
    assert msgs[1]["response"] is True and msgs[1]["payload"]["vendor_id"] == 0x554D4551
    assert msgs[2]["kind"] == "bus" and msgs[2]["token"] == 0
    assert msgs[2]["payload"] == {"offset": 0, "count": 32, "next_offset": 32, "bitmap": "01000000"}


def test_malformed_entry_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "--json", GDI_REQ, "00 02 00", "zz", "0099000001000800")
    assert rc == 1
    obj = one_object(out)
    assert obj["error"] == "messages 1, 2, 3 could not be decoded"
    msgs = obj["messages"]
    assert set(msgs[0]) == KEYS
    for m in msgs[1:]:
        assert set(m) == {"hex", "error"} and m["error"]
    assert msgs[1]["hex"] == "000200"
    assert "too short" in msgs[1]["error"] and "bad hex" in msgs[2]["error"] and "0x99" in msgs[3]["error"]
    assert err == "vmsgamp decode: error: messages 1, 2, 3 could not be decoded\n"


def test_human_output_says_each_error_once(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, GDI_REQ, "00 02 00")
    assert rc == 1
    assert out.splitlines()[1] == "[1] ERROR message too short: 3 bytes, header is 8  (000200)"
    assert "too short" not in err and err.count("\n") == 1


def test_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, GDI_RESP, "0x0203000001010c00efbeadde")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert "GET_DEVICE_INFO response" in lines[0] and "vendor_id=0x554d4551" in lines[0]
    assert "bus PING request" in lines[1] and "token=257" in lines[1] and "data=0xdeadbeef" in lines[1]


def test_g1_profile(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "--profile", "g1", "--json", "00 02 00 00 06 00")
    assert rc == 0
    [m] = messages(out)
    assert m["name"] == "GET_DEVICE_INFO" and m["msg_size"] == 6 and m["token"] == 0
    # The same bytes are too short for a g2 header.
    rc, out, _ = run_main(capsys, "--json", "00 02 00 00 06 00")
    assert rc == 1 and "error" in json.loads(out)


def test_max_msg_size_option(capsys: pytest.CaptureFixture[str]) -> None:
    set_vq = "000a00000700300000000000000000000001000000000000000034120000000000103412000000000020341200000000"
    assert run_main(capsys, set_vq)[0] == 0
    rc, out, err = run_main(capsys, "--max-msg-size", "44", set_vq)
    assert rc == 1 and "outside" in out and "message 0 could not be decoded" in err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_msg_size_must_be_positive(capsys: pytest.CaptureFixture[str], value: str) -> None:
    # argparse's usage errors are returned like every other exit code
    assert main(["decode", "--max-msg-size", value, GDI_REQ]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_every_golden_vector_decodes(capsys: pytest.CaptureFixture[str]) -> None:
    vectors = json.loads(VECTORS.read_text())["messages"]
    rc, out, _ = run_main(capsys, "--json", *[v["hex"] for v in vectors])
    assert rc == 0
    for got, vec in zip(messages(out), vectors, strict=True):
        assert got["name"] == vec["name"] and got["payload"] == vec["fields"]
        assert got["kind"] == ("bus" if vec["bus"] else "transport")


def _run_subprocess(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsgamp", "decode", *argv],
                          capture_output=True, text=True, timeout=60)


def test_subprocess_json() -> None:
    proc = _run_subprocess("--json", GDI_REQ, QEMU_GET_DEVICES)
    assert proc.returncode == 0, proc.stderr
    msgs = messages(proc.stdout)
    assert [m["name"] for m in msgs] == ["GET_DEVICE_INFO", "GET_DEVICES"]
    assert all(set(m) == KEYS for m in msgs)


def test_subprocess_error() -> None:
    proc = _run_subprocess("0042000000000b0001000000")  # EVENT_USED with msg_size 11
    assert proc.returncode == 1
    assert "ERROR" in proc.stdout and "below its minimum" in proc.stdout
    assert proc.stderr == "vmsgamp decode: error: message 0 could not be decoded\n"


def test_usage_error_exit_2() -> None:
    proc = _run_subprocess()  # no HEX
    assert proc.returncode == 2
