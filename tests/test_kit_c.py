"""The C device kit (csrc/kit) on the host: its unit tests compiled with
-Wall -Wextra -Werror, then again under AddressSanitizer and UBSan; its wire
constants against vmsgamp's Python codec; the firmware build for the M4."""
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from kit_support import need_tools

from vmsgamp.coproc.build import build_firmware, build_host_program, csrc_root, elf_size
from vmsgamp.protocol import BusMsgId, DeviceStatus, TransportMsgId
from vmsgamp.protocol import _messages as M

CC = shutil.which("gcc") or shutil.which("cc")
CSRC = Path(__file__).resolve().parents[1] / "csrc"   # the unit tests are not shipped in the package
needs_cc = pytest.mark.skipif(CC is None, reason="no host C compiler (the package could not have been built)")


@needs_cc
@pytest.mark.parametrize("sanitize", [False, True], ids=["werror", "asan-ubsan"])
def test_kit_unit_tests(tmp_path, sanitize):
    tests = CSRC / "kit" / "tests"
    exe = build_host_program([tests / "kit_unit.c", tests / "test_driver.c"], tmp_path / "kit_unit", cc=CC,
                             sanitize=sanitize)
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("0 failed"), p.stdout
    checks = int(p.stdout.split("kit_unit: ")[1].split()[0])
    assert checks > 300
    assert "runtime error" not in p.stderr and "AddressSanitizer" not in p.stderr


WIRE_PROGRAM = r"""
#include <stdio.h>
#include "vmk_wire.h"
#define P(name) printf("\"%s\": %u,\n", #name, (unsigned)(name))
int main(void) {
    printf("{\n");
    P(VMK_GET_DEVICE_INFO); P(VMK_GET_DEVICE_FEATURES); P(VMK_SET_DRIVER_FEATURES); P(VMK_GET_CONFIG);
    P(VMK_SET_CONFIG); P(VMK_GET_DEVICE_STATUS); P(VMK_SET_DEVICE_STATUS); P(VMK_GET_VQUEUE);
    P(VMK_SET_VQUEUE); P(VMK_RESET_VQUEUE); P(VMK_GET_SHM); P(VMK_EVENT_CONFIG); P(VMK_EVENT_AVAIL);
    P(VMK_EVENT_USED); P(VMK_BUS_GET_DEVICES); P(VMK_BUS_PING); P(VMK_BUS_EVENT_DEVICE);
    P(VMK_HDR_SIZE); P(VMK_HDR_MSG_SIZE); P(VMK_HDR_TOKEN); P(VMK_INFO_SIZE); P(VMK_GETVQ_SIZE);
    P(VMK_SETVQ_MSG_SIZE); P(VMK_GETVQ_DESC); P(VMK_SETVQ_DESC); P(VMK_SETVQ_SIZE); P(VMK_CFG_DATA);
    P(VMK_MIN_GET_DEVICE_FEATURES); P(VMK_MIN_SET_DRIVER_FEATURES); P(VMK_MIN_GET_CONFIG);
    P(VMK_MIN_SET_CONFIG); P(VMK_MIN_SET_DEVICE_STATUS); P(VMK_MIN_INDEX); P(VMK_MIN_SET_VQUEUE);
    P(VMK_MIN_EVENT_AVAIL); P(VMK_MIN_GET_DEVICES); P(VMK_MIN_PING); P(VMK_GETDEV_BITMAP);
    P(VMK_ST_ACKNOWLEDGE); P(VMK_ST_DRIVER); P(VMK_ST_DRIVER_OK); P(VMK_ST_FEATURES_OK);
    P(VMK_ST_NEEDS_RESET); P(VMK_ST_FAILED);
    printf("\"end\": 0}\n");
    return 0;
}
"""


@needs_cc
def test_wire_constants_match_the_python_codec(tmp_path):
    """vmk_wire.h and vmsgamp.protocol are two implementations of one wire format."""
    (tmp_path / "w.c").write_text(WIRE_PROGRAM)
    subprocess.run([CC, "-std=c11", "-I", str(csrc_root() / "kit"), "-o", str(tmp_path / "w"),
                    str(tmp_path / "w.c")], check=True)
    c = json.loads(subprocess.run([str(tmp_path / "w")], check=True, capture_output=True, text=True).stdout)
    for name in ("GET_DEVICE_INFO", "GET_DEVICE_FEATURES", "SET_DRIVER_FEATURES", "GET_CONFIG", "SET_CONFIG",
                 "GET_DEVICE_STATUS", "SET_DEVICE_STATUS", "GET_VQUEUE", "SET_VQUEUE", "RESET_VQUEUE",
                 "GET_SHM", "EVENT_CONFIG", "EVENT_AVAIL", "EVENT_USED"):
        assert c[f"VMK_{name}"] == TransportMsgId[name], name
    for name in ("GET_DEVICES", "PING", "EVENT_DEVICE"):
        assert c[f"VMK_BUS_{name}"] == BusMsgId[name], name
    hdr = 8
    assert c["VMK_HDR_SIZE"] == hdr and (c["VMK_HDR_TOKEN"], c["VMK_HDR_MSG_SIZE"]) == (4, 6)
    size = lambda cls: struct.calcsize(cls._FMT)  # noqa: E731
    assert c["VMK_INFO_SIZE"] == hdr + size(M.GetDeviceInfoResponse)
    assert c["VMK_GETVQ_SIZE"] == hdr + size(M.GetVqueueResponse) == 48
    assert c["VMK_SETVQ_MSG_SIZE"] == hdr + size(M.SetVqueueRequest) == 48
    assert c["VMK_GETVQ_DESC"] == c["VMK_SETVQ_DESC"] == hdr + 16
    assert c["VMK_CFG_DATA"] == hdr + size(M.GetConfigResponse)
    assert c["VMK_GETDEV_BITMAP"] == hdr + size(M.GetDevicesResponse)
    # the smallest request the kit accepts is the codec's minimum
    for key, cls in [("GET_DEVICE_FEATURES", M.GetDeviceFeaturesRequest),
                     ("SET_DRIVER_FEATURES", M.SetDriverFeaturesRequest), ("GET_CONFIG", M.GetConfigRequest),
                     ("SET_CONFIG", M.SetConfigRequest), ("SET_DEVICE_STATUS", M.SetDeviceStatusRequest),
                     ("INDEX", M.GetVqueueRequest), ("INDEX", M.ResetVqueueRequest), ("INDEX", M.GetShmRequest),
                     ("SET_VQUEUE", M.SetVqueueRequest), ("EVENT_AVAIL", M.EventAvail),
                     ("GET_DEVICES", M.GetDevicesRequest), ("PING", M.PingRequest)]:
        assert c[f"VMK_MIN_{key}"] == hdr + size(cls), key
    for name in ("ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK", "FAILED"):
        assert c[f"VMK_ST_{name}"] == DeviceStatus[name]
    assert c["VMK_ST_NEEDS_RESET"] == DeviceStatus.DEVICE_NEEDS_RESET


@need_tools("arm-none-eabi-gcc")
def test_firmware_builds_for_the_cortex_m4(tmp_path):
    fw = build_firmware(tmp_path)
    assert not fw.cached and fw.path.is_file()
    again = build_firmware(tmp_path)
    assert again.cached and again.path == fw.path
    # the kit and the board glue together stay small; nothing initialised in RAM
    assert 4000 < fw.text < 24 * 1024 and fw.bss < 8 * 1024
    size = shutil.which("arm-none-eabi-size")
    if size:
        out = subprocess.run([size, str(fw.path)], check=True, capture_output=True, text=True).stdout
        text, data, bss = map(int, out.splitlines()[1].split()[:3])
        assert (text, data, bss) == elf_size(fw.path)
    # no C library: the image must not need anything it does not define
    nm = shutil.which("arm-none-eabi-nm")
    if nm:
        undefined = subprocess.run([nm, "-u", str(fw.path)], check=True, capture_output=True,
                                   text=True).stdout.split()
        assert undefined == [], undefined
