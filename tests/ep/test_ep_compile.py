"""Expert-parallel dispatch/combine under torch.compile(fullgraph=True): the EPDispatcher static mode
(moecomm/ep/nccl/static_ops.py) and IPCDispatcher (moecomm/ep/ipc/ops.py) as opaque custom op pairs.
CPU: a static-mode round trip (force_exchange: the exchange path over a group of one, with and
without a gloo process group) compiled == eager == ep_reference, bit for bit, on small-integer
payloads; the fakes agree with the real ops (torch.library.opcheck); IPCDispatcher's round trip
compiled over the layout model (its kernels replaced, as in test_ll_dispatch.py) at W 1.
GPU: the static mode on CUDA tensors through the Triton kernels (test_static_mode_compiled_on_gpu);
IPCDispatcher at W 1 over a one-rank virtual buffer through the real ll.cu kernels
(test_ipc_dispatcher_compiled_on_gpu)."""

# T = num_tokens, H = hidden, k = top_k, E = num_experts, L = local experts, N = expanded rows

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moecomm.ep.nccl import dispatcher as D
from moecomm.ep.nccl import static_ops
from moecomm.ep.placement import ExpertPlacement
from moecomm.ep.reference import ep_reference
from moecomm.testing import run_distributed

from test_dispatch import expert_times_id, int_tokens, routing

E, K, H, T, MAX_TOKENS = 8, 2, 16, 13, 16


def _inputs(device="cpu", dtype=torch.float32, T=T):
    ids, w = routing(T, E, K, skew=True, seed=3)
    return int_tokens(T, H, seed=5, dtype=dtype).to(device), ids.to(device), w.to(device)


def _step(disp):
    def step(x, ids, w):
        d = disp.dispatch(x, ids, w)
        N = d.gather_idx.shape[0]
        # the local expert of every expanded row from the offsets: static shapes (no repeat_interleave)
        e_of_row = torch.searchsorted(d.expert_offsets[1:], torch.arange(N, device=x.device, dtype=torch.int32),
                                      right=True).clamp(max=disp.num_local_experts - 1)
        h = (d.tokens[d.gather_idx.long()].float() * (e_of_row[:, None] + 1) * d.row_weights[:, None]).to(x.dtype)
        return disp.combine(h, d.handle), d.expert_offsets, d.tokens_per_expert
    return step


def _check_round_trip(disp, x, ids, w, ops=("ep_static_dispatch", "ep_static_combine")) -> None:
    """eager == the reference; compiled (fullgraph, the ops ``ops`` in its graph; then aot_eager) ==
    eager, and again on new tokens."""
    step = _step(disp)
    eager = step(x, ids, w)
    ref = ep_reference([x.cpu()], [ids.cpu()], [w.cpu()], ExpertPlacement(E, 1), expert_times_id)
    assert torch.equal(eager[0].cpu(), ref.y[0])
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=record)(x, ids, w)
    assert all(f"moecomm.{op}.default" in targets for op in ops), targets
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, ids, w)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    # a second call with other tokens (same shapes): the graph is reused and reads the new inputs
    x2 = x * -1
    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(x2, ids, w)[0], step(x2, ids, w)[0])
    disp.check_overflow()


def test_static_mode_compiled_without_process_group():
    # no torch.distributed: the exchange of a group of one is a copy; the buffers are allocated by the
    # op at its first call (on x's device), not during tracing
    disp = D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True)
    _check_round_trip(disp, *_inputs())


def _gloo_round_trip() -> str:
    disp = D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True)
    _check_round_trip(disp, *_inputs())
    return "ok"


def test_static_mode_compiled_over_a_one_rank_gloo_group():
    assert run_distributed(1, _gloo_round_trip, start_method="spawn") == ["ok"]


def _two_ranks_one_without_experts() -> list:
    import torch.distributed as dist

    rank = dist.get_rank()
    pl = ExpertPlacement(E, 2, (0,) * E)  # rank 1 holds no expert: its outputs have N = 0 rows
    xs, ids, ws = [], [], []
    for r, t in enumerate((13, 6)):
        i, w = routing(t, E, K, skew=True, seed=10 + r)
        xs.append(int_tokens(t, H, seed=20 + r))
        ids.append(i)
        ws.append(w)
    ref = ep_reference(xs, ids, ws, pl, expert_times_id)
    disp = D.EPDispatcher(E, K, H, placement=pl, dtype=torch.float32, max_tokens=MAX_TOKENS)
    step = _step(disp)
    eager = step(xs[rank], ids[rank], ws[rank])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(xs[rank], ids[rank], ws[rank])
    disp.check_overflow()
    return [disp.num_local_experts, torch.equal(eager[0], ref.y[rank])] + [torch.equal(a, b) for a, b in zip(eager, got)]


def test_static_mode_compiled_two_ranks_one_without_experts():
    """A real two-rank exchange (gloo all_to_all_single inside the ops); rank 1's results have no rows."""
    assert run_distributed(2, _two_ranks_one_without_experts) == [[E, True, True, True, True], [0, True, True, True, True]]


def test_static_ops_opcheck():
    disp = D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True)
    x, ids, w = _inputs()
    torch.library.opcheck(static_ops.ep_static_dispatch.op, (x, ids.to(torch.int32), w, disp._op_handle))
    outs = static_ops.ep_static_dispatch(x, ids.to(torch.int32), w, disp._op_handle)
    h = torch.randint(-3, 4, (outs[4].shape[0], H)).float()
    torch.library.opcheck(static_ops.ep_static_combine.op, (h, outs[6], outs[5], disp._op_handle))


def test_eager_static_mode_keeps_its_views():
    """Eager calls do not go through the op: the result's tokens are still views of the buffers."""
    disp = D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True)
    d = disp.dispatch(*_inputs())
    assert d.tokens.data_ptr() == disp._static.recv.data_ptr() and d.handle.op_handle is None


@pytest.mark.gpu
def test_static_mode_compiled_on_gpu(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    # fp32: the reference's sums of small integers times powers of two stay exact
    disp = D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True)
    _check_round_trip(disp, *_inputs("cuda"))


# --------------------------------------------------------------------------- IPCDispatcher


def _ipc_over_layout_model(monkeypatch, dtype=torch.float32, fill=0xFF):
    """A one-rank IPCDispatcher on CPU, its two kernels replaced by the layout model (as in
    test_ll_dispatch.py's threaded run; W 1: no peer to wait for)."""
    from moecomm.ep.ipc import _cuda
    from moecomm.ep.ipc import layout as LY
    from moecomm.ep.ipc.dispatcher import IPCDispatcher

    lay = LY.LLLayout.of(1, MAX_TOKENS, H, K, dtype)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8)]
    bufs[0][lay.recv_off:] = fill  # 0xFF: NaN, rows never written show

    def fake_dispatch(x, i, w, e2r, e2l, peer_ptrs, home, lay_, rank, timeout_ns, ranks_on_device):
        epoch = int(LY.LLLayout.word(bufs[rank], LY.DISP_EPOCH)) + 1
        LY.send_reference(bufs, lay_, rank, x, i, w, e2r, e2l, home, epoch)
        LY.receive_reference(bufs[rank], lay_, epoch)

    def fake_combine(out, slot_pos, peer_ptrs, lay_, rank, timeout_ns, ranks_on_device):
        epoch = int(LY.LLLayout.word(bufs[rank], LY.COMB_EPOCH)) + 1
        LY.combine_send_reference(bufs, lay_, rank, out, slot_pos, epoch)
        LY.LLLayout.word(bufs[rank], LY.COMB_EPOCH).fill_(epoch)

    monkeypatch.setattr(_cuda, "dispatch_cuda", fake_dispatch)
    monkeypatch.setattr(_cuda, "combine_cuda", fake_combine)
    monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(lambda device: None))
    view = SimpleNamespace(rank=0, world_size=1, nbytes=lay.nbytes, device=torch.device("cpu"), local=bufs[0],
                           peer_ptrs=torch.zeros(1, dtype=torch.int64), virtual=True)
    return IPCDispatcher(E, K, H, buffer=view, dtype=dtype, max_tokens=MAX_TOKENS, timeout_s=5.0)


def test_ipc_dispatcher_compiled_over_the_layout_model(monkeypatch):
    disp = _ipc_over_layout_model(monkeypatch)
    _check_round_trip(disp, *_inputs(), ops=("ipc_ep_dispatch", "ipc_ep_combine"))
    disp.check_overflow()


def test_ipc_ops_opcheck(monkeypatch):
    from moecomm.ep.ipc import ops as ipc_ops

    # zero-filled: opcheck compares repeated calls with assert_close, and NaN padding rows never compare equal
    disp = _ipc_over_layout_model(monkeypatch, fill=0)
    x, ids, w = _inputs()
    ids = ids.to(torch.int32)
    torch.library.opcheck(ipc_ops.ipc_ep_dispatch.op, (x, ids, w, disp._op_handle))
    outs = ipc_ops.ipc_ep_dispatch(x, ids, w, disp._op_handle)
    h = torch.randint(-3, 4, (outs[4].shape[0], H)).float()
    torch.library.opcheck(ipc_ops.ipc_ep_combine.op, (h, outs[6], outs[5], disp._op_handle))
    # the fakes alone, under FakeTensorMode: shapes from the dispatcher's sizes, no data read
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fi, fw = mode.from_tensor(x), mode.from_tensor(ids), mode.from_tensor(w)
        fo = torch.ops.moecomm.ipc_ep_dispatch(fx, fi, fw, disp._op_handle)
        assert [tuple(t.shape) for t in fo] == [tuple(t.shape) for t in outs]
        assert [t.dtype for t in fo] == [t.dtype for t in outs]


@pytest.mark.gpu
def test_ipc_dispatcher_compiled_on_gpu(monkeypatch):
    """One rank (W 1, one virtual buffer): ll_dispatch / ll_combine inside the ops, no peer to wait for."""
    from moecomm.distributed.symmetric import open_virtual
    from moecomm.ep.ipc.dispatcher import IPCDispatcher

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    (buf,) = open_virtual(IPCDispatcher.buffer_bytes(1, MAX_TOKENS, H, K, torch.float32), 1, "cuda")
    disp = IPCDispatcher(E, K, H, buffer=buf, dtype=torch.float32, max_tokens=MAX_TOKENS, timeout_s=10.0)
    x, ids, w = _inputs("cuda")
    step = _step(disp)
    eager = step(x, ids, w)
    ref = ep_reference([x.cpu()], [ids.cpu()], [w.cpu()], ExpertPlacement(E, 1), expert_times_id)
    assert torch.equal(eager[0].cpu(), ref.y[0])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, ids, w)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    x2 = -x
    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(x2, ids, w)[0], step(x2, ids, w)[0])
    torch.cuda.synchronize()
    disp.check_overflow()
    buf.close()


def test_node_dispatcher_compiled_records_its_path():
    """NodeDispatcher (the layer's dispatcher on CUDA with EP > 1) under compile: its choice is made at
    trace time and recorded in last_path; the log of a change is eager only (dynamo cannot trace it)."""
    from moecomm.ep.ipc import NodeDispatcher

    nd = NodeDispatcher(D.EPDispatcher(E, K, H, dtype=torch.float32, max_tokens=MAX_TOKENS, force_exchange=True))
    x, ids, w = _inputs()
    eager = _step(nd)(x, ids, w)
    nd.last_path = None
    torch._dynamo.reset()
    got = torch.compile(_step(nd), fullgraph=True, backend="aot_eager")(x, ids, w)
    assert nd.last_path is not None and nd.last_path.path == "local"
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
