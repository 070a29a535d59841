"""virtio-gpio: the device model against a mock driver (every request type,
malformed requests, interrupt semantics), the gpiochip pass-through's
marshalling against a fake kernel, and the client against the model in
another process over the AMP bus (split and packed rings)."""
import random
import struct

import pytest

from vmsgamp._core.region import Region
from vmsgamp.devices._base import parse_device_list
from vmsgamp.devices.gpio import (
    CHIPINFO, DIRECTION_IN, DIRECTION_NONE, DIRECTION_OUT, GPIO_GET_CHIPINFO_IOCTL,
    GPIO_V2_GET_LINE_IOCTL, GPIO_V2_GET_LINEINFO_IOCTL, GPIO_V2_LINE_GET_VALUES_IOCTL,
    GPIO_V2_LINE_SET_CONFIG_IOCTL, GPIO_V2_LINE_SET_VALUES_IOCTL, IRQ_TYPE_EDGE_BOTH,
    IRQ_TYPE_EDGE_FALLING, IRQ_TYPE_EDGE_RISING, IRQ_TYPE_LEVEL_HIGH, IRQ_TYPE_LEVEL_LOW,
    IRQ_TYPE_NONE, LINE_CONFIG, LINE_EVENT, LINE_INFO, LINE_VALUES, MSG_GET_DIRECTION,
    MSG_GET_LINE_NAMES, MSG_GET_VALUE, MSG_SET_DIRECTION, MSG_SET_IRQ_TYPE, MSG_SET_VALUE, REQUEST,
    V2_FLAG_EDGE_FALLING, V2_FLAG_EDGE_RISING, V2_FLAG_INPUT, V2_FLAG_OUTPUT, ChipBackend,
    GpioDevice, names_blob,
)
from vmsgamp.devices.gpio_client import Direction, GpioClient, GpioError, IrqStatus, IrqType
from vmsgamp.devices.rng import RngDevice
from vmsgamp.testing.amp import amp_pair
from vmsgamp.testing.virtq_mock import MockDriver

OK, ERR = 0, 1
VALID, INVALID = 1, 0


class Harness:
    """A GpioDevice with both queues driven by MockDrivers."""

    def __init__(self, fmt="split", features=1, **kw):
        self.dev = GpioDevice(**kw)
        self.regions = [Region.memfd(1 << 20), Region.memfd(1 << 20)]
        self.reqd = MockDriver(self.regions[0], fmt, 16)
        self.evd = MockDriver(self.regions[1], fmt, 16)
        self.notified = []
        self.dev._notify_queue = self.notified.append
        self.dev.activate([self.reqd.device_queue(), self.evd.device_queue()], features)

    def raw(self, out, in_sizes):
        assert self.reqd.add_chain(out, in_sizes)
        self.dev.handle_queue(0, self.dev.queues[0])
        _, ln, data = self.reqd.get_used()
        return ln, data

    def req(self, msg_type, line=0, value=0, resp=2):
        ln, data = self.raw([REQUEST.pack(msg_type, line, value)], [resp])
        assert ln == len(data)
        return data

    def ok(self, msg_type, line=0, value=0):
        data = self.req(msg_type, line, value)
        assert data[0] == OK, (msg_type, line, value, data)
        return data[1]

    def err(self, msg_type, line=0, value=0):
        assert self.req(msg_type, line, value) == bytes([ERR, 0])

    def unmask(self, line, token=None, req=None, resp=1):
        req = struct.pack("<H", line) if req is None else req
        assert self.evd.add_chain([req], [resp] if resp else [], token=line if token is None else token)
        return self.dev.handle_queue(1, self.dev.queues[1])

    def events(self):
        out = []
        while (u := self.evd.get_used()) is not None:
            token, ln, data = u
            out.append((token, data[0] if ln else None))
        return out

    def close(self):
        self.reqd.close()
        self.evd.close()
        for r in self.regions:
            r.close()


@pytest.fixture(params=["split", "packed"])
def h(request):
    harness = Harness(request.param, lines=4, names=["LED", "", "BTN"], loopback={0: 1})
    yield harness
    harness.close()


# ---- configuration and requests -------------------------------------------------------

def test_config_and_line_names(h):
    blob = b"LED\0\0BTN\0\0"
    assert struct.unpack("<HxxI", h.dev.read_config(0, 8)) == (4, len(blob))
    assert h.req(MSG_GET_LINE_NAMES, resp=1 + len(blob)) == bytes([OK]) + blob
    # response buffer smaller than 1 + gpio_names_size: ERR
    assert h.req(MSG_GET_LINE_NAMES, resp=len(blob)) == bytes([ERR, 0])


def test_no_names_means_size_zero_and_error():
    hh = Harness(lines=2)
    try:
        assert struct.unpack("<HxxI", hh.dev.read_config(0, 8)) == (2, 0)
        hh.err(MSG_GET_LINE_NAMES)
    finally:
        hh.close()
    with pytest.raises(ValueError, match="unique"):
        names_blob(["a", "a"], 2)
    with pytest.raises(ValueError):
        names_blob(["caf\u00e9"], 1)
    with pytest.raises(ValueError):
        GpioDevice(0)
    with pytest.raises(ValueError, match="3 line names for 2 lines"):
        GpioDevice(2, ["a", "b", "c"])


def test_direction_and_value(h):
    assert h.ok(MSG_GET_DIRECTION, 2) == DIRECTION_NONE
    h.err(MSG_GET_VALUE, 2)                      # not configured yet
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    assert h.ok(MSG_GET_DIRECTION, 2) == DIRECTION_IN
    assert h.ok(MSG_GET_VALUE, 2) == 0
    h.dev.set_input(2, 1)
    assert h.ok(MSG_GET_VALUE, 2) == 1
    # value first, then direction (what Linux does); the value is kept
    h.ok(MSG_SET_VALUE, 3, 1)
    h.ok(MSG_SET_DIRECTION, 3, DIRECTION_OUT)
    assert (h.ok(MSG_GET_DIRECTION, 3), h.ok(MSG_GET_VALUE, 3)) == (DIRECTION_OUT, 1)
    h.ok(MSG_SET_VALUE, 3, 0)
    assert h.ok(MSG_GET_VALUE, 3) == 0
    # direction none discards the line's state
    h.ok(MSG_SET_DIRECTION, 3, DIRECTION_NONE)
    h.err(MSG_GET_VALUE, 3)
    h.ok(MSG_SET_DIRECTION, 3, DIRECTION_OUT)
    assert h.ok(MSG_GET_VALUE, 3) == 0


def test_loopback_wire(h):
    h.ok(MSG_SET_DIRECTION, 1, DIRECTION_IN)
    h.ok(MSG_SET_DIRECTION, 0, DIRECTION_OUT)
    for v in (1, 0, 1):
        h.ok(MSG_SET_VALUE, 0, v)
        assert h.ok(MSG_GET_VALUE, 1) == v


@pytest.mark.parametrize("msg_type", [MSG_GET_DIRECTION, MSG_SET_DIRECTION, MSG_GET_VALUE,
                                      MSG_SET_VALUE, MSG_SET_IRQ_TYPE])
def test_line_out_of_range(h, msg_type):
    for line in (4, 5, 0xFFFF):
        h.err(msg_type, line, 0)


def test_bad_values_and_types(h):
    for t in (0, 7, 0x100, 0xFFFF):
        h.err(t, 0, 0)
    for d in (3, 4, 0xFF, 0xFFFFFFFF):
        h.err(MSG_SET_DIRECTION, 0, d)
    for v in (2, 0x100, 0xFFFFFFFF):
        h.err(MSG_SET_VALUE, 0, v)
    for t in (5, 6, 7, 9, 12, 0x10, 0xFFFFFFFF):
        h.err(MSG_SET_IRQ_TYPE, 2, t)
    assert h.dev.stats["errors"] == 4 + 4 + 3 + 7


def test_malformed_request_layouts(h):
    req = REQUEST.pack(MSG_GET_DIRECTION, 0, 0)
    assert h.raw([req[:7]], [2]) == (2, bytes([ERR, 0]))          # request too short
    assert h.raw([req + b"\0"], [2]) == (2, bytes([ERR, 0]))      # request too long
    assert h.raw([req], [1]) == (1, bytes([ERR]))                 # response too short
    assert h.raw([req], []) == (0, b"")                           # nowhere to write
    assert h.raw([], [2]) == (2, bytes([ERR, 0]))                 # no request at all
    # split over descriptors is fine (the layout is by bytes, not descriptors)
    assert h.raw([req[:3], req[3:]], [1, 1]) == (2, bytes([OK, DIRECTION_NONE]))
    # the device keeps serving afterwards
    assert h.ok(MSG_GET_DIRECTION, 0) == DIRECTION_NONE


def test_random_requests_never_raise(h):
    rnd = random.Random(41)
    for _ in range(400):
        if rnd.random() < 0.7:
            out = [REQUEST.pack(rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, rnd.getrandbits(16)]),
                                rnd.choice([0, 1, 2, 3, 4, rnd.getrandbits(16)]),
                                rnd.choice([0, 1, 2, 3, 4, 8, rnd.getrandbits(32)]))]
        else:
            out = [rnd.randbytes(rnd.randrange(0, 12))]
        h.raw(out, [rnd.choice([0, 1, 2, 2, 2, 16])])
        if rnd.random() < 0.3:
            line = rnd.choice([0, 1, 2, 3, 9])
            h.unmask(line, token=("r", line))
            if rnd.random() < 0.5:
                h.dev.set_input(rnd.randrange(4), rnd.randrange(2))
            h.events()
    assert h.ok(MSG_GET_DIRECTION, 0) in (DIRECTION_NONE, DIRECTION_IN, DIRECTION_OUT)


# ---- interrupts ---------------------------------------------------------------------------

def test_irq_needs_the_feature():
    hh = Harness(features=0, lines=2)
    try:
        hh.err(MSG_SET_IRQ_TYPE, 0, IRQ_TYPE_EDGE_RISING)
        hh.unmask(0)
        assert hh.events() == [(0, INVALID)]
    finally:
        hh.close()
    assert GpioDevice(2, irq=False).num_queues == 1 and GpioDevice(2, irq=False).features == 0


def test_irq_type_rules(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)          # unchanged: fine
    h.err(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_FALLING)        # must go through NONE
    h.err(MSG_SET_DIRECTION, 2, DIRECTION_OUT)               # an interrupt line stays an input
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_NONE)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_NONE)                 # disabling twice is harmless
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_FALLING)
    h.ok(MSG_SET_VALUE, 3, 0)
    h.ok(MSG_SET_DIRECTION, 3, DIRECTION_OUT)
    h.err(MSG_SET_IRQ_TYPE, 3, IRQ_TYPE_EDGE_BOTH)           # no interrupts on outputs


def test_edge_delivered_when_unmasked(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    assert h.unmask(2) is False and h.events() == []
    h.dev.set_input(2, 1)
    assert h.events() == [(2, VALID)] and h.notified == [1]
    h.dev.set_input(2, 0)                                    # falling: not for this type
    h.unmask(2)
    assert h.events() == []


def test_edge_latched_while_masked_delivered_on_unmask(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_BOTH)
    h.dev.set_input(2, 1)                                    # masked: latched
    h.dev.set_input(2, 0)
    assert h.events() == [] and h.notified == []
    assert h.unmask(2) is True                               # returned at once, from the latch
    assert h.events() == [(2, VALID)]
    h.unmask(2)                                              # the latch was consumed
    assert h.events() == []
    h.dev.set_input(2, 1)
    assert h.events() == [(2, VALID)]


def test_latch_discarded_on_disable_and_edges_before_enable_ignored(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.dev.set_input(2, 1)                                    # not enabled: nothing latched
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_FALLING)
    h.unmask(2)
    assert h.events() == []
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_NONE)                 # returns the pair INVALID
    assert h.events() == [(2, INVALID)]
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_FALLING)
    h.dev.set_input(2, 0)                                    # latched
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_NONE)                 # latch discarded
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_FALLING)
    h.unmask(2)
    assert h.events() == []


def test_level_not_latched(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_LEVEL_HIGH)
    h.dev.set_input(2, 1)                                    # active while masked...
    h.dev.set_input(2, 0)                                    # ...and gone again
    h.unmask(2)
    assert h.events() == []                                  # not latched
    h.dev.set_input(2, 1)
    assert h.events() == [(2, VALID)]
    h.unmask(2)                                              # still active: fires again at once
    assert h.events() == [(2, VALID)]


def test_level_low(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.dev.set_input(2, 1)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_LEVEL_LOW)
    h.unmask(2)
    assert h.events() == []
    h.dev.set_input(2, 0)
    assert h.events() == [(2, VALID)]


def test_eventq_returned_invalid_when_irq_disabled(h):
    h.unmask(2)                                              # never enabled
    assert h.events() == [(2, INVALID)]
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.unmask(2)
    h.notified.clear()
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_NONE)
    assert h.events() == [(2, INVALID)] and h.notified == [1]
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.unmask(2)
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_NONE)               # also disables the interrupt
    assert h.events() == [(2, INVALID)]
    h.dev.set_input(2, 0)
    h.dev.set_input(2, 1)
    h.unmask(2)
    assert h.events() == [(2, INVALID)]


def test_malformed_eventq_buffers(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.unmask(9, token="line9")                               # no such line
    h.unmask(2, token="short", req=b"\2")                    # request too short
    h.unmask(2, token="long", req=b"\2\0\0")                 # request too long
    h.unmask(2, token="nowrite", resp=0)                     # nowhere to write
    assert h.events() == [("line9", INVALID), ("short", INVALID), ("long", INVALID), ("nowrite", None)]
    h.unmask(2, token="first")
    h.unmask(2, token="second")                              # a second pair for the line
    assert h.events() == [("second", INVALID)]
    h.dev.set_input(2, 1)
    assert h.events() == [("first", VALID)]


def test_reset_forgets_held_buffers_and_renegotiates():
    hh = Harness(lines=2)
    try:
        hh.ok(MSG_SET_DIRECTION, 0, DIRECTION_IN)
        hh.ok(MSG_SET_IRQ_TYPE, 0, IRQ_TYPE_EDGE_RISING)
        hh.unmask(0)
        hh.dev.reset()
        hh.dev.set_input(0, 1)                               # no queue: nothing touched
        assert hh.events() == [] and hh.notified == []
        hh2 = Harness(lines=2)
        hh2.dev = hh.dev
        hh2.dev._notify_queue = hh2.notified.append
        hh.dev.activate([hh2.reqd.device_queue(), hh2.evd.device_queue()], 1)
        assert hh2.ok(MSG_GET_DIRECTION, 0) == DIRECTION_NONE
        hh2.unmask(0)
        assert hh2.events() == [(0, INVALID)]                # the interrupt was reset too
        hh2.close()
    finally:
        hh.close()


def test_post_input_from_another_thread(h):
    import threading

    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.unmask(2)
    t = threading.Thread(target=h.dev.post_input, args=(2, 1))
    t.start()
    t.join()
    (fd,) = h.dev.poll_fds()
    h.dev.on_fd_ready(fd)
    assert h.events() == [(2, VALID)] and h.notified == [1]
    h.dev.close()


def test_device_list_options():
    (dev,) = parse_device_list("gpio:lines=3;names=a||c;loopback=0:2")
    assert dev.ngpio == 3 and dev.blob == b"a\0\0c\0" and dev.backend.loopback == {0: 2}
    (dev,) = parse_device_list("gpio:irq=0")
    assert dev.ngpio == 8 and dev.features == 0
    with pytest.raises(ValueError):
        parse_device_list("gpio:loopback=1")


# ---- gpiochip pass-through with a fake kernel ------------------------------------------------

class FakeChip:
    """Enough of the gpiochip v2 uAPI to check what ChipBackend sends."""

    def __init__(self, names):
        self.names = names
        self.levels = [0] * len(names)
        self.requests = {}          # fd -> [offset, flags, out value]
        self.closed = []
        self.events = {}
        self._next_fd = 100

    def open(self, path, flags):
        assert path == "/dev/gpiochip7"
        return 3

    def close(self, fd):
        self.closed.append(fd)

    def read(self, fd, n):
        data, self.events[fd] = self.events.get(fd, b""), b""
        return data

    def ioctl(self, fd, req, buf, mutate):
        assert mutate and isinstance(buf, bytearray)
        if req == GPIO_GET_CHIPINFO_IOCTL:
            buf[:] = CHIPINFO.pack(b"gpiochip7", b"fake", len(self.names))
        elif req == GPIO_V2_GET_LINEINFO_IOCTL:
            off = struct.unpack_from("<I", buf, 64)[0]
            buf[:] = LINE_INFO.pack(self.names[off].encode(), b"", off, 0, V2_FLAG_INPUT, bytes(160))
        elif req == GPIO_V2_GET_LINE_IOCTL:
            assert len(buf) == 592
            offset = struct.unpack_from("<I", buf, 0)[0]
            assert struct.unpack_from("<I", buf, 560)[0] == 1 and buf[256:263] == b"vmsgamp"
            flags, nattrs, out = self._config(bytes(buf[288:288 + LINE_CONFIG.size]))
            fd = self._next_fd
            self._next_fd += 1
            self.requests[fd] = [offset, flags, out]
            struct.pack_into("<i", buf, 588, fd)
        elif req == GPIO_V2_LINE_SET_CONFIG_IOCTL:
            flags, nattrs, out = self._config(bytes(buf))
            self.requests[fd][1:] = [flags, out]
        elif req == GPIO_V2_LINE_GET_VALUES_IOCTL:
            bits, mask = LINE_VALUES.unpack(buf)
            assert mask == 1
            offset, flags, out = self.requests[fd]
            level = out if flags & V2_FLAG_OUTPUT else self.levels[offset]
            buf[:] = LINE_VALUES.pack(level, mask)
        elif req == GPIO_V2_LINE_SET_VALUES_IOCTL:
            bits, mask = LINE_VALUES.unpack(buf)
            assert mask == 1 and self.requests[fd][1] & V2_FLAG_OUTPUT
            self.requests[fd][2] = bits & 1
        else:
            raise OSError(22, "bad ioctl")

    @staticmethod
    def _config(raw):
        fields = LINE_CONFIG.unpack(raw)
        flags, nattrs = fields[0], fields[1]
        out = None
        if nattrs:
            attr_id, _pad, values = struct.unpack("<IIQ", fields[2])
            assert attr_id == 2 and fields[3] == 1
            out = values & 1
        return flags, nattrs, out


def test_chip_backend_marshalling():
    chip = FakeChip(["LED", "BTN", ""])
    backend = ChipBackend("/dev/gpiochip7", ioctl=chip.ioctl, open_=chip.open, read=chip.read,
                          close=chip.close)
    hh = Harness(backend=backend)
    try:
        assert hh.dev.ngpio == 3 and hh.dev.blob == b"LED\0BTN\0\0"
        assert hh.ok(MSG_GET_DIRECTION, 1) == DIRECTION_IN     # as the kernel reports it
        hh.ok(MSG_SET_VALUE, 0, 1)
        hh.ok(MSG_SET_DIRECTION, 0, DIRECTION_OUT)
        (fd0,) = chip.requests
        assert chip.requests[fd0] == [0, V2_FLAG_OUTPUT, 1]
        hh.ok(MSG_SET_VALUE, 0, 0)
        assert chip.requests[fd0][2] == 0 and hh.ok(MSG_GET_VALUE, 0) == 0
        hh.err(MSG_GET_VALUE, 2)                                # not requested
        hh.ok(MSG_SET_DIRECTION, 1, DIRECTION_IN)
        fd1 = max(chip.requests)
        chip.levels[1] = 1
        assert hh.ok(MSG_GET_VALUE, 1) == 1
        hh.err(MSG_SET_IRQ_TYPE, 1, IRQ_TYPE_LEVEL_HIGH)       # the cdev has no level IRQs
        hh.ok(MSG_SET_IRQ_TYPE, 1, IRQ_TYPE_EDGE_BOTH)
        assert chip.requests[fd1][1] == V2_FLAG_INPUT | V2_FLAG_EDGE_RISING | V2_FLAG_EDGE_FALLING
        assert hh.dev.poll_fds() == [fd1]
        hh.unmask(1)
        chip.events[fd1] = LINE_EVENT.pack(1, 2, 1, 1, 1)     # falling edge
        hh.dev.on_fd_ready(fd1)
        assert hh.events() == [(1, VALID)] and hh.notified == [1]
        hh.ok(MSG_SET_DIRECTION, 0, DIRECTION_NONE)            # releases the request
        assert chip.closed == [fd0]
        hh.dev.reset()
        assert sorted(chip.closed) == [fd0, fd1] and hh.dev.poll_fds() == []
        hh.dev.close()
        assert chip.closed[-1] == 3
    finally:
        hh.close()


# ---- two processes over the AMP bus ------------------------------------------------------------

def _models():
    return [GpioDevice(4, ["LED", "", "BTN", "IRQ-IN"], loopback={0: 3}), RngDevice()]


@pytest.mark.parametrize("packed", [False, True])
def test_client_over_amp(packed):
    with amp_pair(_models) as drv:
        assert drv.info(0).name == "gpio" and drv.info(0).max_virtqueues == 2
        gpio = GpioClient.open(drv, 0, packed=packed)
        assert gpio.dev.packed == packed and gpio.irq and gpio.ngpio == 4
        assert gpio.line_names() == ["LED", "", "BTN", "IRQ-IN"]
        assert gpio.get_direction(0) is Direction.NONE
        gpio.direction_output(0, 1)
        assert (gpio.get_direction(0), gpio.get_value(0)) == (Direction.OUT, 1)
        gpio.set_direction(3, Direction.IN)
        assert gpio.get_value(3) == 1                           # the loopback wire
        with pytest.raises(GpioError, match="GET_VALUE line 9"):
            gpio.get_value(9)
        with pytest.raises(GpioError, match="SET_VALUE"):
            gpio.set_value(0, 5)
        with pytest.raises(GpioError, match="type 77"):
            gpio.request(77)

        # toggle with interrupt: line 0 drives line 3, which interrupts on falling edges
        gpio.set_irq_type(3, IrqType.EDGE_FALLING)
        assert gpio.poll_irq(3) is None
        gpio.set_value(0, 0)
        assert gpio.wait_irq(3, 5) is IrqStatus.VALID
        # edges while masked are latched and delivered when wait_irq re-unmasks
        gpio.set_value(0, 1)
        gpio.set_value(0, 0)
        assert gpio.wait_irq(3, 5) is IrqStatus.VALID
        assert gpio.wait_irq(3, 0.05) is None                   # nothing pending
        gpio.set_irq_type(3, IrqType.NONE)                      # the posted pair comes back
        assert gpio.wait_irq(3, 5) is IrqStatus.INVALID

        # the other device on the bus is unaffected
        rng = drv.open(1)
        addr, view = rng.alloc(16)
        rng.queues[0].add([], [(addr, 16)])
        rng.notify(0)
        assert rng.wait_used(0, 5) and rng.queues[0].get_used()[1] == 16

        # reset and re-negotiation without interrupts
        gpio.close()
        gpio = GpioClient.open(drv, 0, irq=False, packed=not packed)
        assert not gpio.irq and gpio.get_direction(0) is Direction.NONE
        with pytest.raises(GpioError, match="not negotiated"):
            gpio.set_irq_type(3, IrqType.EDGE_RISING)
        with pytest.raises(GpioError, match="SET_IRQ_TYPE"):
            gpio.request(MSG_SET_IRQ_TYPE, 3, IRQ_TYPE_EDGE_RISING)   # the device refuses it too


class _SilentGpio(GpioDevice):
    """Never answers GET_VALUE (keeps the chain), to test the client's timeout."""

    def _request(self, chain, queue):
        if REQUEST.unpack(chain.read())[0] == MSG_GET_VALUE:
            self.held = chain
            return
        super()._request(chain, queue)


def test_client_timeout_then_refuses_requests():
    with amp_pair(lambda: [_SilentGpio(2)]) as drv:
        gpio = GpioClient.open(drv, 0, timeout=0.3)
        gpio.set_direction(0, Direction.IN)
        with pytest.raises(GpioError, match="no response"):
            gpio.get_value(0)
        with pytest.raises(GpioError, match="reopen"):
            gpio.get_direction(0)
        gpio.close()
        gpio = GpioClient.open(drv, 0)
        assert gpio.get_direction(0) is Direction.NONE


def test_eventq_reset_while_running_drops_held_pair(h):
    h.ok(MSG_SET_DIRECTION, 2, DIRECTION_IN)
    h.ok(MSG_SET_IRQ_TYPE, 2, IRQ_TYPE_EDGE_RISING)
    h.unmask(2)
    # RESET_VQUEUE + SET_VQUEUE of the eventq: the transport swaps the queue object
    region = Region.memfd(1 << 20)
    evd2 = MockDriver(region, h.evd.fmt, 16)
    h.dev.queues[1] = evd2.device_queue()
    assert evd2.add_chain([struct.pack("<H", 2)], [1], token="new")
    h.dev.handle_queue(1, h.dev.queues[1])
    assert evd2.get_used() is None                           # held, not a "duplicate"
    h.dev.set_input(2, 1)
    assert evd2.get_used() == ("new", 1, bytes([VALID])) and h.events() == []
    evd2.close()
    region.close()


def test_post_input_through_a_serving_loop():
    model = GpioDevice(4)
    with amp_pair(lambda: [model], process=False) as drv:
        gpio = GpioClient.open(drv, 0)
        gpio.set_direction(2, Direction.IN)
        gpio.set_irq_type(2, IrqType.LEVEL_HIGH)
        model.post_input(2, 1)                 # from this thread; the server thread applies it
        assert gpio.wait_irq(2, 5) is IrqStatus.VALID
        assert gpio.get_value(2) == 1
        model.post_input(2, 0)
        for _ in range(1000):                  # applied asynchronously: wait until seen
            if gpio.get_value(2) == 0:
                break
        gpio.set_irq_type(2, IrqType.NONE)
        gpio.set_irq_type(2, IrqType.EDGE_FALLING)
        assert gpio.wait_irq(2, 0.05) is None
        model.post_input(2, 1)
        model.post_input(2, 0)
        assert gpio.wait_irq(2, 5) is IrqStatus.VALID


class _WeirdGpio(GpioDevice):
    """Answers GET_DIRECTION with an unknown direction and GET_VALUE short."""

    def _request(self, chain, queue):
        msg_type = REQUEST.unpack(chain.read())[0]
        if msg_type == MSG_GET_DIRECTION:
            self._respond(chain, queue, bytes([OK, 7]))
        elif msg_type == MSG_GET_VALUE:
            self._respond(chain, queue, bytes([OK]))
        else:
            super()._request(chain, queue)


def test_client_checks_the_device():
    with amp_pair(lambda: [_WeirdGpio(2)], process=False) as drv:
        gpio = GpioClient.open(drv, 0)
        with pytest.raises(GpioError, match="unknown direction 7"):
            gpio.get_direction(0)
        with pytest.raises(GpioError, match="response of 1 bytes, expected 2"):
            gpio.get_value(0)
        with pytest.raises(ValueError):
            gpio.set_value(0x10000, 1)
        gpio.set_value(1, 1)                                      # still usable
