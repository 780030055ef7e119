"""moecomm.distributed.nccl without a GPU: the exchange's NCCL calls (a stand-in library records
them), the watchdog's abort of a stuck exchange and the named errors."""

import time

import pytest
import torch

from moecomm.distributed import nccl as N


class _FakeNccl:
    """_Library's surface, recording the hot calls; ncclCommAbort / Destroy counted."""

    def __init__(self):
        self.calls = []
        self.aborts = self.destroys = 0
        self.path = "fake"
        fake = self

        class Lib:
            def ncclCommAbort(self, comm):
                fake.aborts += 1

            def ncclCommDestroy(self, comm):
                fake.destroys += 1

        self.lib = Lib()

    def group_start(self):
        self.calls.append(("start",))
        return 0

    def group_end(self):
        self.calls.append(("end",))
        return 0

    def send(self, ptr, n, dtype, peer, comm, stream):
        self.calls.append(("send", ptr.value, n.value, peer, stream.value))
        return 0

    def recv(self, ptr, n, dtype, peer, comm, stream):
        self.calls.append(("recv", ptr.value, n.value, peer, stream.value))
        return 0

    def check(self, rc, what):
        if rc:
            raise N.NcclError(f"{what} failed ({rc})")


class _FakeEvents:
    def __init__(self, done=True):
        self.is_done, self.free, self.recorded = done, [], 0

    def get(self):
        return self.free.pop() if self.free else object()

    def record(self, ev, stream):
        self.recorded += 1
        return 0

    def done(self, ev):
        return self.is_done

    def bind_thread(self):
        pass


def _comm(W, rank=0, events=None, timeout_s=300.0):
    lib = _FakeNccl()
    c = N.Communicator(lib, object(), rank, W, 0, timeout_s, events)
    c._stream_of = lambda device: 0x5EA
    return c, lib


def test_all_to_all_sends_each_peer_its_rows():
    """Rows in_splits[p] go to rank p and out_splits[p] come from it, at byte offsets of whole rows,
    in one NCCL group; empty parts make no call; None splits are W equal parts."""
    c, lib = _comm(3)
    inp, out = torch.zeros(10, 4), torch.zeros(7, 4)  # rows of 16 bytes
    c.all_to_all(out, inp, [2, 0, 5], [4, 6, 0], "test")
    a, b = inp.data_ptr(), out.data_ptr()
    assert lib.calls == [("start",), ("send", a, 64, 0, 0x5EA), ("recv", b, 32, 0, 0x5EA),
                         ("send", a + 64, 96, 1, 0x5EA), ("recv", b + 32, 80, 2, 0x5EA), ("end",)]
    lib.calls.clear()
    c.all_to_all(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32), None, None, "counts")
    assert [x[0] for x in lib.calls] == ["start"] + ["send", "recv"] * 3 + ["end"]
    assert [x[2] for x in lib.calls[1:-1]] == [8] * 6
    assert c.exchanges == 2


def test_watchdog_aborts_a_stuck_exchange(monkeypatch):
    """An exchange that does not complete within the timeout aborts the communicator: the next
    exchange and check() raise, naming why (and the health module is asked for the rank)."""
    monkeypatch.setattr(N, "WATCHDOG_TICK_S", 0.02)
    events = _FakeEvents(done=False)
    c, lib = _comm(2, events=events, timeout_s=0.2)
    t = torch.zeros(4, 4)
    c.all_to_all(t, t.clone(), None, None, "dispatch: all_to_all")
    deadline = time.monotonic() + 5
    while c.aborted is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.aborted is not None and "dispatch: all_to_all did not complete within 0.2 s" in c.aborted
    assert lib.aborts == 1
    explained = []
    import moecomm.distributed.health as H

    monkeypatch.setattr(H, "explain_failure", lambda group, what, exc: explained.append(what))
    with pytest.raises(N.NcclError, match="count exchange: dispatch: all_to_all did not complete"):
        c.check(None, "dispatch: count exchange")
    assert explained == ["dispatch: count exchange"]
    with pytest.raises(N.NcclError, match="was aborted"):
        c.all_to_all(t, t.clone(), None, None, "combine: all_to_all")
    c.close()
    assert lib.destroys == 0  # an aborted communicator is not destroyed again


def test_completed_exchanges_are_let_go():
    """Exchanges that complete leave the watchdog's list and return their events; nothing aborts."""
    events = _FakeEvents(done=True)
    N_TICK = N.WATCHDOG_TICK_S
    c, lib = _comm(1, events=events, timeout_s=0.05)
    t = torch.zeros(2, 2)
    for _ in range(5):
        c.all_to_all(t, t.clone(), None, None, "x")
    time.sleep(N_TICK * 3 + 0.1)
    assert c.aborted is None and not c._pending and events.recorded == 5 and len(events.free) >= 1
    assert c.check(None, "x") is None
    c.close()
    assert lib.destroys == 1 and lib.aborts == 0


def test_the_mode_and_the_library_are_named(monkeypatch):
    monkeypatch.setenv("MOECOMM_EP_NCCL", "fast")
    from moecomm.errors import MoeCommValueError

    with pytest.raises(MoeCommValueError, match="MOECOMM_EP_NCCL must be 'direct' or 'c10d', got 'fast'"):
        N.enabled()
    monkeypatch.setenv("MOECOMM_EP_NCCL", "c10d")
    assert not N.enabled()
    monkeypatch.delenv("MOECOMM_EP_NCCL")
    assert N.enabled()
    monkeypatch.setenv("MOECOMM_NCCL_LIBRARY", "/nonexistent/libnccl.so.2")
    monkeypatch.setattr(N, "_library", None)
    monkeypatch.setattr(N, "_library_error", None)
    assert N.load_library() is None
    assert "/nonexistent/libnccl.so.2" in N.library_error()


def test_a_gloo_group_keeps_torch_distributed():
    """communicator() of a gloo group is None (the exchange stays on torch.distributed), decided once."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert N.communicator(None) is None
        assert N._communicators[dist.group.WORLD] is None
    finally:
        N.forget()
        dist.destroy_process_group()
    assert not N._communicators
