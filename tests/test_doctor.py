"""vmsgamp doctor: the machine report and the per-URI checks, on fake trees."""
from __future__ import annotations

import json

import pytest

from fake_hw import FakeTree
from vmsgamp._cmd import doctor
from vmsgamp.carriers import _hw
from vmsgamp.cli import main

IVSHMEM = "0000:00:04.0"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    for m in ("uio", "uio_pdrv_genirq", "vfio", "vfio_pci"):
        (t.sys / "module" / m).mkdir(parents=True)
    t.add_uio(0, "vmsgamp-shm", [("shm", 0x7000_0000, 0x4000, 0)])
    t.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 256, 1: 4096, 2: 0x10000}, driver="vfio-pci",
              group=5, msix=True)
    t.add_pci("0000:00:05.0", 0x8086, 0x100E, {0: 0x20000}, driver="e1000")    # not listed
    t.add_pci("0000:00:06.0", 0x1AF4, 0x1110, {0: 256, 2: 0x10000}, driver="uio_pci_generic",
              uio=1)
    (t.dev / "vfio").mkdir()
    (t.dev / "vfio" / "vfio").write_bytes(b"")
    (t.dev / "vfio" / "5").write_bytes(b"")
    return t


def _run(capsys, *argv):
    rc = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_machine_report_json(tree, capsys):
    rc, out, err = _run(capsys, "--json")
    assert rc == 0 and err == ""
    r = json.loads(out)
    assert r["modules"]["uio"] and r["modules"]["vfio_pci"] and not r["modules"]["uio_pci_generic"]
    assert r["iommu"] == {"enabled": True, "groups": 1, "units": []}
    assert [d["dev"] for d in r["uio"]] == ["uio0", "uio1"]
    assert r["uio"][0]["name"] == "vmsgamp-shm" and r["uio"][0]["driver"] == "uio_pdrv_genirq"
    assert r["uio"][0]["maps"][0] == {"index": 0, "name": "shm", "addr": "0x70000000",
                                      "size": 0x4000, "offset": 0}
    assert r["uio"][1]["driver"] == "uio_pci_generic" and r["uio"][1]["parent"] == "0000:00:06.0"
    pci = {d["bdf"]: d for d in r["pci"]}
    assert set(pci) == {IVSHMEM, "0000:00:06.0"}          # e1000 is not for user space
    assert pci[IVSHMEM]["driver"] == "vfio-pci" and pci[IVSHMEM]["iommu_group"] == 5
    assert pci["0000:00:06.0"]["uio"] == ["uio1"]
    paths = [p["path"].rsplit("/", 2)[-2:] for p in r["permissions"]]
    assert paths == [["dev", "uio0"], ["dev", "uio1"], ["vfio", "5"], ["vfio", "vfio"]]
    assert r["kernel"]["release"]
    assert "checks" not in r


def test_machine_report_human(tree, capsys):
    rc, out, _ = _run(capsys)
    assert rc == 0
    assert "UIO devices:" in out and "uio0    vmsgamp-shm" in out
    assert "map0 shm" in out and "addr 0x70000000 size 0x4000" in out
    assert f"{IVSHMEM} 1af4:1110 ivshmem  driver vfio-pci  IOMMU group 5" in out
    assert "IOMMU: on (1 groups)" in out


def test_uio_uri_all_ok_and_opened(tree, capsys):
    rc, out, err = _run(capsys, "uio:vmsgamp-shm", "--json")
    r = json.loads(out)
    assert rc == 0 and r["ok"], r["checks"]
    checks = {c["check"]: c for c in r["checks"]}
    assert checks["device"]["status"] == "ok"
    assert checks["map"]["why"].startswith("map0 (shm) addr 0x70000000")
    assert checks["interrupt"]["status"] == "info"
    assert checks["open"]["status"] == "ok" and "0x4000 bytes" in checks["open"]["why"]


def test_uio_uri_missing_device(tree, capsys):
    rc, out, err = _run(capsys, "uio:nope")
    assert rc == 1
    assert "missing  device" in out and "uio0 (vmsgamp-shm)" in out
    assert "not attempted" in out
    assert err.count("\n") == 1 and err.startswith("vmsgamp doctor: error: uio:nope: device:")


def test_uio_bad_map_and_ring(tree):
    r = doctor.collect("uio:uio0#map=3&ring=map0:0x3")
    st = {c["check"]: c["status"] for c in r["checks"]}
    assert st["map"] == "missing" and st["ring"] == "fail" and not r["ok"]


def test_dev_uio_bare_path(tree):
    r = doctor.collect("/dev/uio0", try_open=False)
    assert r["checks"][0]["why"] == "uio: is registered" and r["ok"]


def test_no_uio_at_all(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    (t.sys / "class" / "uio").rmdir()
    r = doctor.collect("uio:x")
    assert r["checks"][1]["status"] == "missing" and "modprobe uio" in r["checks"][1]["why"]


def test_vfio_uri_ready(tree):
    r = doctor.collect(f"vfio:{IVSHMEM}", try_open=False)
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert r["ok"], r["checks"]
    assert st["driver"] == ("ok", "vfio-pci")
    assert st["iommu group"] == ("ok", "group 5 (alone)")
    assert st["container"][0] == "ok" and st["group node"][0] == "ok"
    assert st["modules"][0] == "info" and "vfio_iommu_type1" in st["modules"][1]
    assert st["bar"] == ("ok", "BAR2: 0x10000 bytes, mem")


def test_vfio_uri_problems(tree):
    tree.add_pci("0000:00:04.1", 0x1AF4, 0x1111, {0: 256}, driver="snd_hda_intel", group=5)
    (tree.dev / "vfio" / "5").unlink()
    r = doctor.collect("vfio:00:04.0")
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert st["iommu group"][0] == "fail" and "0000:00:04.1 (snd_hda_intel)" in st["iommu group"][1]
    assert st["group node"][0] == "missing"
    assert st["open"][0] == "missing"
    tree.set_driver(IVSHMEM, "uio_pci_generic")
    r = doctor.collect("vfio:00:04.0")
    assert r["checks"][2]["check"] == "driver" and "driver_override" in r["checks"][2]["why"]


def test_vfio_no_iommu_group(tmp_path, monkeypatch):
    t = FakeTree(tmp_path)
    t.env(monkeypatch)
    t.add_pci(IVSHMEM, 0x1AF4, 0x1110, {0: 256, 2: 0x10000}, driver="vfio-pci")
    r = doctor.collect(f"vfio:{IVSHMEM}")
    st = {c["check"]: c for c in r["checks"]}
    assert st["iommu group"]["status"] == "missing" and "intel_iommu=on" in st["iommu group"]["why"]


def test_pci_uri(tree):
    r = doctor.collect("pci:00:06.0", try_open=True)
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert st["driver"] == ("ok", "uio_pci_generic")
    assert st["resource file"][0] == "ok"
    assert st["interrupt"] == ("ok", "INTx through /dev/uio1")
    # the open uses the uio interrupt; the fake node is a regular file, so it
    # fails -- reported as a check, not raised
    assert st["open"][0] == "fail" and "not a character device" in st["open"][1]
    r = doctor.collect("pci:00:05.0#bar=0")
    st = {c["check"]: c["status"] for c in r["checks"]}
    assert st["driver"] == "fail"
    r = doctor.collect("pci:00:05.0#bar=0&force=1", try_open=False)
    assert r["ok"], r["checks"]
    r = doctor.collect("pci:00:09.0")
    assert r["checks"][1] == {"check": "device", "status": "missing",
                              "why": r["checks"][1]["why"]} and "lspci" in r["checks"][1]["why"]
    r = doctor.collect("pci:zz")
    assert r["checks"][1]["check"] == "address" and r["checks"][1]["status"] == "fail"


def test_permission_problem_reported(tree, monkeypatch):
    monkeypatch.setattr(_hw.os, "access", lambda path, mode: False)
    r = doctor.collect("uio:uio0", try_open=False)
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert st["device node"][0] == "fail" and "no read/write access" in st["device node"][1]


def test_bad_and_foreign_uris(tree, capsys):
    r = doctor.collect("nonsense")
    assert r["checks"][0]["check"] == "uri" and not r["ok"]
    r = doctor.collect("bogus:x")
    assert r["checks"][0]["check"] == "scheme" and "known:" in r["checks"][0]["why"]
    rc, out, err = _run(capsys, "shm:vmsgamp-doctor-does-not-exist")
    assert rc == 1 and "fail     open" in out and "FileNotFoundError" in err


def test_ivshmem_finds_what_the_commands_fail_on(tmp_path, capsys):
    """Doctor never joins (a join is announced to every peer) but finds a
    missing socket, a directory, a plain file and a stale socket."""
    import socket as so

    def status(uri):
        r = doctor.collect(uri)
        return r["ok"], {c["check"]: (c["status"], c["why"]) for c in r["checks"]}

    ok, st = status(f"ivshmem:{tmp_path / 'nowhere.sock'}")
    assert not ok and st["socket"][0] == "missing" and "vmsgamp ivshmem-server" in st["socket"][1]
    assert st["open"][0] == "info"
    ok, st = status(f"ivshmem:{tmp_path}")
    assert not ok and "is a directory" in st["socket"][1]
    (tmp_path / "plain").write_bytes(b"")
    ok, st = status(f"ivshmem:{tmp_path / 'plain'}")
    assert not ok and "not a socket" in st["socket"][1]
    stale = so.socket(so.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))          # bound, never listening: a stale socket
    stale.close()
    ok, st = status(f"ivshmem:{tmp_path / 'stale.sock'}")
    assert not ok and "nothing is listening" in st["socket"][1]
    live = so.socket(so.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    try:
        ok, st = status(f"ivshmem:{tmp_path / 'live.sock'}")
        assert ok and "a server is listening" in st["socket"][1]
    finally:
        live.close()
    rc, out, err = _run(capsys, "--json", f"ivshmem:{tmp_path / 'nowhere.sock'}")
    assert rc == 1 and json.loads(out)["error"] in err and err.count("\n") == 1


def test_create_uri_is_checked_not_created(tmp_path):
    target = tmp_path / "region.bin"
    r = doctor.collect(f"file:{target}#create=1&size=1M")
    st = {c["check"]: c["status"] for c in r["checks"]}
    assert r["ok"] and st["create"] == "ok" and st["unlink"] == "info" and not target.exists()
    target.write_bytes(bytes(4096))
    r = doctor.collect(f"file:{target}#create=1&size=1M&unlink=1")
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert not r["ok"] and st["create"][0] == "fail" and "already exists" in st["create"][1]
    assert "unlink" not in st


def test_region_too_small(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(1221))
    r = doctor.collect(str(small))
    st = {c["check"]: (c["status"], c["why"]) for c in r["checks"]}
    assert not r["ok"] and st["size"][0] == "fail" and "too small" in st["size"][1]
