import threading

import pytest

from vmsgamp._core.doorbell import EventfdDoorbell
from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region


def start_pair(dev: MsgFifo, drv: MsgFifo, timeout: float = 5.0) -> None:
    """Run both handshakes at once (start() blocks until the peer shows up)."""
    err = []

    def run():
        try:
            dev.start(timeout)
        except BaseException as e:  # surfaced below
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    drv.start(timeout)
    t.join()
    if err:
        raise err[0]


@pytest.fixture(params=["b", "a"])
def fifo_pair(request):
    """(device, driver, region) running over one memfd with eventfd doorbells."""
    region = Region.memfd(16384)
    a, b = EventfdDoorbell.pair()
    dev = MsgFifo(region, role="device", layout=request.param, doorbell=a)
    drv = MsgFifo(region, role="driver", layout=request.param, doorbell=b)
    start_pair(dev, drv)
    yield dev, drv, region
    dev.close()
    drv.close()
    a.close()
    b.close()
    region.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every failed QEMU test carries QEMU's stderr and the guest console of
    each guest it ran, whatever assertion failed."""
    outcome = yield
    if item.get_closest_marker("qemu") is None:
        return
    from vmsgamp.testing.qemu_guest import take_reports

    report = outcome.get_result()
    logs = take_reports()
    if report.failed:
        for i, text in enumerate(logs):
            report.sections.append((f"QEMU guest {i + 1}", text))
