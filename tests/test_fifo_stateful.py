"""Hypothesis: MsgFifo (Cython) against the pure-Python peer over the same
bytes, with a bounded deque as the model of each direction.  Small rings so
wrap-around and full/empty edges come up constantly."""
import threading

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vmsgamp._core.fifo import MsgFifo
from vmsgamp._core.region import Region
from vmsgamp.testing.fifo_model import FifoModel, PyFifoPeer, make_msg

sizes = st.integers(min_value=8, max_value=64)


class FifoMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(["b", "a"]), n_slots=st.integers(min_value=2, max_value=6))
    def setup(self, layout, n_slots):
        self.region = Region.memfd(16384)
        window = 80 + 2 * n_slots * 64 if layout == "b" else None
        self.dev = MsgFifo(self.region, role="device", layout=layout, window=window)
        self.peer = PyFifoPeer(self.region.view(), role="driver", layout=layout,
                               window=window or 8192)
        if layout == "b":
            t = threading.Thread(target=self.peer.handshake)
            t.start()
            self.dev.start(5)
            t.join()
        else:
            self.dev.start(reset=True)
        self.to_drv = FifoModel(self.dev.num_slots)
        self.to_dev = FifoModel(self.dev.num_slots)
        self.seq = 0
        self.buf = bytearray(64 * 8)

    def _next(self, size):
        self.seq += 1
        return make_msg(self.seq, size)

    @rule(size=sizes)
    def dev_try_send(self, size):
        m = self._next(size)
        assert self.dev.try_send(m) == self.to_drv.send(m)

    @rule(sizes_=st.lists(st.just(64), min_size=1, max_size=8))
    def dev_send_burst(self, sizes_):
        msgs = [self._next(64) for _ in sizes_]
        sent = self.dev.send_burst(b"".join(msgs), 64)
        expected = 0
        for m in msgs:
            if not self.to_drv.send(m):
                break
            expected += 1
        assert sent == expected

    @rule()
    def peer_recv(self):
        assert self.peer.recv() == self.to_drv.recv()

    @rule(size=sizes)
    def peer_send(self, size):
        m = self._next(size)
        assert self.peer.send(m) == self.to_dev.send(m)

    @rule()
    def dev_try_recv(self):
        n = self.dev.try_recv(self.buf)
        exp = self.to_dev.recv()
        assert (bytes(self.buf[:n]) if n else None) == exp

    @rule(k=st.integers(min_value=1, max_value=8))
    def dev_recv_burst(self, k):
        got = self.dev.recv_burst(self.buf, max_count=k)
        for i in range(got):
            exp = self.to_dev.recv()
            assert bytes(self.buf[i * 64:i * 64 + len(exp)]) == exp
        assert got == k or self.to_dev.recv() is None

    @invariant()
    def counts_agree(self):
        if hasattr(self, "dev"):
            assert self.dev.pending() == len(self.to_dev.q)
            assert self.dev.free_slots() == self.to_drv.capacity - len(self.to_drv.q)

    def teardown(self):
        if hasattr(self, "dev"):
            self.peer.release()
            self.dev.close()
            self.region.close()


FifoMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestFifoStateful = FifoMachine.TestCase
