"""The virtual-rank driver's phase order (moecomm.ep.ipc.virtual) and the two phases' API, on CPU.

# W = ranks

Why it matters (moecomm.ep.ipc.dispatcher's docstring, and the first H200 run): with W virtual
ranks on one GPU, a module load (a Triton or torch kernel's first launch), cudaMalloc or a host sync
issued while one rank's LL kernel spins waiting for another rank's not-yet-launched kernel
deadlocks. The driver must launch every rank's signal phase before any rank's finish phase.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moecomm.ep.ipc import IPCDispatcher
from moecomm.ep.ipc.dispatcher import PendingDispatch
from moecomm.errors import MoeCommTypeError, MoeCommValueError


class _RecordingStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class _FakeTorchCuda:
    """torch.cuda as moecomm.ep.ipc.virtual uses it (current_stream, stream), recording on CPU."""

    def __init__(self, log):
        self.log, self.now = log, _RecordingStream("main", log)

    def current_stream(self):
        return self.now

    def stream(self, s):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            prev, self.now = self.now, s
            try:
                yield
            finally:
                self.now = prev
        return ctx()


class _PhaseDisp:
    """An IPCDispatcher stand-in that logs each phase with the stream it ran on."""

    def __init__(self, r, log, cuda):
        self.r, self.log, self.cuda = r, log, cuda

    def _rec(self, what):
        self.log.append((what, self.r, self.cuda.now.name))

    def prepare_inputs(self, x, i, w):
        self._rec("prepare")
        return x, i, w

    def dispatch_send_unchecked(self, x, i, w):
        self._rec("dispatch_send")
        return ("pending", self.r)

    def dispatch_finish(self, pending):
        assert pending == ("pending", self.r)
        self._rec("dispatch_finish")
        return SimpleNamespace(handle=("handle", self.r))

    def combine_send_unchecked(self, h, handle):
        assert handle == ("handle", self.r)
        self._rec("combine_send")
        return handle

    def combine_finish(self, handle):
        self._rec("combine_finish")
        return ("y", self.r)


@pytest.mark.parametrize("ranks", [None, (0, 1, 3)])
def test_virtual_driver_launches_every_signal_phase_before_any_finish(monkeypatch, ranks):
    """The rule of moecomm.ep.ipc.dispatcher's docstring (the first H200 run's deadlock): with virtual
    ranks every rank's LL kernel (dispatch_send / combine_send) is launched before any rank's finish
    phase or expert, each rank's work on its own stream, forked from and joined to the current one."""
    from moecomm.ep.ipc import virtual

    log = []
    fake = _FakeTorchCuda(log)
    monkeypatch.setattr(virtual, "torch", SimpleNamespace(cuda=fake))
    W = 4
    run = list(range(W)) if ranks is None else list(ranks)
    streams = [_RecordingStream(f"s{r}", log) for r in range(W)]
    disps = [_PhaseDisp(r, log, fake) for r in range(W)]
    xs = [f"x{r}" for r in range(W)]

    def expert(r, d):
        log.append(("expert", r, fake.now.name))
        assert d.handle == ("handle", r)
        return SimpleNamespace(contiguous=lambda: f"h{r}")

    res, ys = virtual.virtual_step(disps, streams, xs, xs, xs, expert, ranks=ranks)
    assert sorted(res) == run and ys == {r: ("y", r) for r in run}
    phases = [e for e in log if e[0] != "wait"]
    order = ["prepare", "dispatch_send", "dispatch_finish", "expert", "combine_send", "combine_finish"]
    assert phases == [(p, r, f"s{r}") for p in order for r in run]  # phase by phase, each on its rank's stream
    assert log[0][0] == "wait" and {(e[1], e[2]) for e in log[:len(run)]} == {(f"s{r}", "main") for r in run}
    assert {(e[1], e[2]) for e in log[-len(run):]} == {("main", f"s{r}") for r in run}  # joined at the end
    assert fake.now.name == "main"
    log.clear()
    got = virtual.virtual_dispatch(disps, streams, xs, xs, xs, ranks=ranks)
    assert [e[0] for e in log if e[0] != "wait"] == [p for p in order[:3] for _ in run] and sorted(got) == run


def test_dispatch_and_combine_phases_reject_foreign_pending(monkeypatch):
    monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(lambda device: None))
    def buf():
        return SimpleNamespace(rank=0, world_size=2, nbytes=1 << 16, device=torch.device("cpu"),
                               local=torch.zeros(1 << 16, dtype=torch.uint8), peer_ptrs=torch.zeros(2, dtype=torch.int64),
                               virtual=True)

    a, b = (IPCDispatcher(8, 2, 16, buffer=buf(), dtype=torch.float32, max_tokens=4) for _ in range(2))
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.dispatch_finish: pending must be this dispatcher's"):
        a.dispatch_finish(PendingDispatch(b, 1, 16, None))
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.dispatch_finish: pending must be .* got tuple"):
        a.dispatch_finish((1, 2))
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.combine_finish: handle must be the handle of this"):
        a.combine_finish("nope")
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.combine_send: handle must be the handle of this"):
        a.combine_send(torch.zeros(1, 16), "nope")
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher.dispatch_send: x must have at most max_tokens = 4 rows, got 5"):
        a.dispatch_send(torch.zeros(5, 16), torch.zeros(5, 2, dtype=torch.int32), torch.ones(5, 2))
    x, i, w = IPCDispatcher.prepare_inputs(torch.zeros(3, 16)[:, ::1], torch.zeros(3, 2, dtype=torch.int64),
                                           torch.ones(3, 2, dtype=torch.bfloat16))
    assert i.dtype == torch.int32 and w.dtype == torch.float32 and x.is_contiguous()
    same = torch.zeros(3, 2, dtype=torch.int32)
    assert IPCDispatcher.prepare_inputs(x, same, w)[1] is same  # prepared inputs: no copy, no kernel
