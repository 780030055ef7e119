"""Low-latency dispatch/combine over IPC buffers (moecomm.ep.ipc): layout model, kernels, faults.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size, C = capacity

CPU: kernels/ep/ll.cu compiles for sm_90a and its constants agree with layout.py; the pure-torch
model of the buffer layout (what each rank writes where), run for W virtual ranks, equals
moecomm.ep.reference and, bit for bit, the NCCL static mode; capacity overflow; argument errors;
the timeout error; the path decision.
GPU (`gpu`): the kernels with W = 2 / 4 / 8 virtual ranks on one GPU (open_virtual, one stream a
rank), the same comparisons on integer payloads with NaN-prefilled buffers, overflow, CUDA-graph
capture and replay, and a virtual rank that never launches (the others name it within the timeout).

Payloads are small integers, weights powers of two, the expert multiplies by (expert id + 1): every
sum is exact in fp32/fp16/bf16 at these sizes, so results are compared with torch.equal.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import torch

from moecomm.distributed.health import RankFailureError
from moecomm.distributed.symmetric import Eligibility
from moecomm.ep.ipc import IPCDispatcher, choose_ep_path
from moecomm.ep.ipc import layout as LY
from moecomm.ep.ipc.dispatcher import timeout_error
from moecomm.ep.ipc.virtual import virtual_dispatch, virtual_step
from moecomm.ep.nccl.plan import expand_received
from moecomm.ep.nccl.reference import gather_sum_reference
from moecomm.ep.nccl.virtual import virtual_ep_forward
from moecomm.ep.placement import ExpertPlacement
from moecomm.ep.reference import ep_reference
from moecomm.errors import MoeCommTypeError, MoeCommValueError, UnsupportedHardwareError

from test_dispatch import CASES, case_inputs, check_against_reference, expert_times_id, int_tokens, routing, vectorised_expert

LL_CASES = dict(CASES)
LL_CASES["nondiv_w4"] = ([7, 0, 12, 5], 10, 3, 24, None, False)  # E % W != 0, a rank sending nothing


def _case(name, dtype=torch.float32):
    """case_inputs of test_dispatch over LL_CASES (its cases and ours)."""
    Ts, E, k, H, e2r, skew = LL_CASES[name]
    pl = ExpertPlacement(E, len(Ts), tuple(e2r) if e2r else ())
    xs, ids, ws = [], [], []
    for r, T in enumerate(Ts):
        i, w = routing(T, E, k, skew=skew, seed=100 + r)
        xs.append(int_tokens(T, H, seed=r, dtype=dtype))
        ids.append(i)
        ws.append(w)
    return pl, xs, ids, ws


# ----------------------------------------------------------------------------- the CUDA source


def test_ll_cu_compiles_for_sm90a(tmp_path, monkeypatch):
    from moecomm.jit import cuda

    if cuda.compile_error() is not None:
        pytest.skip(f"no CUDA compiler here: {cuda.compile_error()}")
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    got = cuda.compile("ep/ll.cu", arch="sm_90a")
    cubin = got.path.read_bytes()
    for name in ("moecomm_ll_dispatch", "moecomm_ll_combine_bf16", "moecomm_ll_combine_fp16", "moecomm_ll_combine_fp32"):
        assert name.encode() in cubin, name


def test_ll_cu_uses_system_scope_release_acquire(tmp_path):
    """The flags' ordering as the module docstring argues it: st.release.sys, ld.acquire.sys, system fences."""
    import shutil
    import subprocess

    from moecomm.jit import cuda

    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    if not shutil.which(nvcc):
        pytest.skip("nvcc not found")
    ptx = tmp_path / "ll.ptx"
    src = cuda.source_path("ep/ll.cu")
    subprocess.run([nvcc, "-ptx", "-arch=sm_90a", "-O3", "-std=c++17", "-o", str(ptx), str(src)], check=True,
                   capture_output=True, timeout=300)
    text = ptx.read_text()
    assert "st.release.sys.global.u32" in text and "ld.acquire.sys.global.u32" in text
    assert "globaltimer" in text and "membar.sys" in text


def test_layout_constants_agree_with_the_kernel():
    from moecomm.ep.ipc import _cuda
    from moecomm.jit import cuda

    src = cuda.source_path("ep/ll.cu").read_text()
    const = {m[0]: int(m[1]) for m in re.findall(r"constexpr int (LL_\w+) = (\d+);", src)}
    assert const == {"LL_MAX_W": LY.MAX_PEERS, "LL_MAX_T": LY.MAX_TOKENS, "LL_THREADS": _cuda.THREADS,
                     "LL_FP8_MAX_H": LY.FP8_MAX_HIDDEN}
    assert _cuda.FP8_MAX_H == LY.FP8_MAX_HIDDEN
    body = re.search(r"struct Ctrl \{(.*?)\};", src, re.S).group(1)
    fields = re.findall(r"(\w+)(?:\[LL_MAX_W\])?[,;]", body.replace("unsigned int", "").replace("int ", ""))
    offsets, off = {}, 0
    for f in fields:
        offsets[f] = off
        off += 4 * (LY.MAX_PEERS if f in ("disp_flag", "disp_cnt", "comb_flag") else 1)
    assert offsets["disp_flag"] == LY.DISP_FLAG and offsets["disp_cnt"] == LY.DISP_CNT
    assert offsets["comb_flag"] == LY.COMB_FLAG and offsets["disp_epoch"] == LY.DISP_EPOCH
    assert offsets["comb_epoch"] == LY.COMB_EPOCH and offsets["disp_ticket"] == LY.DISP_TICKET
    assert offsets["error_mask"] == LY.ERROR_MASK and offsets["error_phase"] == LY.ERROR_PHASE
    assert offsets["overflow"] == LY.OVERFLOW and off <= LY.CTRL_BYTES


def _kernel_params(src: str, name: str) -> list[str]:
    """The C types of an extern "C" kernel's parameters in ll.cu (the combine macro's for its entries)."""
    if name.startswith("moecomm_ll_combine"):
        sig = re.search(r"NAME\((.*?)\)\s*\{", src, re.S).group(1)
    else:
        sig = re.search(name + r"\((.*?)\)\s*\{", src, re.S).group(1)
    types = []
    for p in sig.replace("\\", " ").split(","):
        p = " ".join(p.split())
        types.append("ptr" if "*" in p else p.rsplit(" ", 1)[0])
    return types


def test_launch_arguments_match_the_kernel_signatures(monkeypatch):
    """The wrappers' argument lists (order, count, ctypes type) against ll.cu's signatures, without a GPU:
    a mismatch would only show as garbage or a fault on the device."""
    import ctypes

    from moecomm.ep.ipc import _cuda
    from moecomm.jit import cuda

    src = cuda.source_path("ep/ll.cu").read_text()
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            seen.append((self.name, grid, block, args))

    monkeypatch.setattr(_cuda, "kernel", lambda name, device: Recorder(name))
    monkeypatch.setattr(_cuda, "_sms", lambda device: 132)
    lay = LY.LLLayout.of(4, 8, 64, 2, torch.bfloat16)
    t = torch.zeros
    _cuda.dispatch_cuda(t(5, 64, dtype=torch.bfloat16), t(5, 2, dtype=torch.int32), t(5, 2), t(8, dtype=torch.int32),
                        t(8, dtype=torch.int32), t(4, dtype=torch.int64), t(5, 2, dtype=torch.int32), lay, 1, 10**9, 4)
    _cuda.combine_cuda(t(64, 64, dtype=torch.bfloat16), t(32, 2, dtype=torch.int32), t(4, dtype=torch.int64), lay, 1,
                       10**9, 4)
    ctype = {ctypes.c_int: "int", ctypes.c_longlong: "long long"}
    for name, grid, block, args in seen:
        want = _kernel_params(src, name)
        got = ["ptr" if isinstance(a, torch.Tensor) else ctype[type(a)] for a in args]
        assert got == want, (name, got, want)
        assert block == (_cuda.THREADS,) and 1 <= grid[0] <= 132 // 4
    assert [n for n, *_ in seen] == ["moecomm_ll_dispatch", "moecomm_ll_combine_bf16"]
    d_args = dict(zip(["rank", "W", "T", "k", "E", "C", "token_bytes", "row_bytes", "meta_off", "recv_off"],
                      [a.value for a in seen[0][3][7:17]]))
    assert d_args == {"rank": 1, "W": 4, "T": 5, "k": 2, "E": 8, "C": 8, "token_bytes": 128, "row_bytes": lay.row_bytes,
                      "meta_off": 128, "recv_off": 512}
    c_args = [a.value for a in seen[1][3][3:10]]
    assert c_args == [1, 4, 8, 2, 64, 64, lay.back_off]  # rank, W, C, k, H, N, back_off


def test_layout_napkin_math():
    """The module docstring's figures: T 128, H 7168, top-8, W 8, bf16, C 128."""
    lay = LY.LLLayout.of(8, 128, 7168, 8, torch.bfloat16)
    assert lay.row_bytes == 14400 and lay.token_bytes == 14336 and lay.meta_off == 14336
    assert lay.recv_off == 512 and lay.back_off == 512 + 8 * 128 * 14400
    assert lay.nbytes == 512 + 8 * 128 * (14400 + 14336)  # ~29.4 MB
    assert IPCDispatcher.buffer_bytes(8, 128, 7168, 8, torch.bfloat16) == lay.nbytes
    odd = LY.LLLayout.of(3, 5, 33, 3, torch.float16)  # odd sizes: rows padded to 4 bytes, regions 16-aligned
    assert odd.row_bytes == (34 + 12) * 2 and odd.back_off % 16 == 0 and odd.nbytes % 16 == 0


# ----------------------------------------------------------------------------- the layout model on CPU


def _model_run(pl, xs, ids, ws, capacity, steps=1, dtype=torch.float32, expert=vectorised_expert):
    """W virtual ranks through the pure-torch model of ll.cu: every rank's sends, then every rank's
    receive, the expert, every rank's combine stores, the sources' sums. ``steps`` calls on the same
    buffers (epochs 1, 2, ...). Returns (results per rank, y per rank, buffers)."""
    W = pl.ep_size
    k, H = ids[0].shape[1], xs[0].shape[1]
    lay = LY.LLLayout.of(W, capacity, H, k, dtype)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8) for _ in range(W)]
    for b in bufs:  # RECV and BACK NaN-filled: a row the model fails to write reads as NaN
        b[lay.recv_off:] = 0xFF
    e2r, e2l = pl.expert_to_rank_tensor(), pl.expert_to_local_tensor()
    for epoch in range(1, steps + 1):
        homes = [torch.full((x.shape[0], k), -7, dtype=torch.int32) for x in xs]
        for r in range(W):
            LY.send_reference(bufs, lay, r, xs[r].to(dtype), ids[r], ws[r], e2r, e2l, homes[r], epoch)
        results = []
        for r in range(W):
            LY.receive_reference(bufs[r], lay, epoch)
            ex = expand_received(lay.recv(bufs[r]), lay.rows, pl.num_local_experts(r), None)
            results.append(SimpleNamespace(tokens=lay.recv(bufs[r])[:, :H], gather_idx=ex.gather_idx,
                                           expert_offsets=ex.expert_offsets, tokens_per_expert=ex.tokens_per_expert,
                                           row_weights=ex.row_weights, slot_pos=ex.slot_pos))
        for r in range(W):
            res = results[r]
            n = int(res.expert_offsets[-1])
            local = torch.tensor(pl.local_experts(r), dtype=torch.long)
            e_of_row = local[torch.repeat_interleave(res.tokens_per_expert.long())] if n else local[:0]
            h = torch.full((res.gather_idx.shape[0], H), float("nan"), dtype=dtype)  # padding rows: never read
            h[:n] = expert(res.tokens[res.gather_idx[:n].long()], e_of_row, res.row_weights[:n])
            LY.combine_send_reference(bufs, lay, r, h, res.slot_pos, epoch)
        ys = [gather_sum_reference(lay.back(bufs[s]), homes[s]) for s in range(W)]
    return results, ys, bufs, lay, homes


@pytest.mark.parametrize("name", list(LL_CASES))
def test_layout_model_equals_reference_and_nccl_static(name):
    pl, xs, ids, ws = _case(name)
    cap = max(x.shape[0] for x in xs) or 1
    results, ys, bufs, lay, _ = _model_run(pl, xs, ids, ws, cap, steps=2)
    check_against_reference(pl, xs, ids, ws, results, ys)
    nccl = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=cap)
    for r in range(pl.ep_size):  # the NCCL static mode's results, bit for bit
        a, b = results[r], nccl.results[r]
        n = int(b.expert_offsets[-1])
        for f in ("gather_idx", "expert_offsets", "tokens_per_expert"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (r, f)
        assert torch.equal(a.row_weights[:n], b.row_weights[:n]) and torch.equal(a.slot_pos, b.handle[0])
        assert torch.equal(a.tokens[a.gather_idx[:n].long()], b.tokens[b.gather_idx[:n].long()])
        assert torch.equal(ys[r], nccl.y[r])
        assert int(LY.LLLayout.word(bufs[r], LY.OVERFLOW)) == 0 and int(LY.LLLayout.word(bufs[r], LY.ERROR_MASK)) == 0


def test_layout_model_rows_land_where_the_docstring_says():
    """Row (s, slot) of rank d's RECV is the slot-th token (token order) rank s sends d; its ids are
    the token's local experts on d (-1 elsewhere), its weights theirs (0 elsewhere)."""
    pl, xs, ids, ws = case_inputs("skew_t0_w3")
    C = 17
    results, _, bufs, lay, homes = _model_run(pl, xs, ids, ws, C)
    e2r = torch.tensor(pl.expert_to_rank)
    e2l = pl.expert_to_local_tensor()
    k = lay.top_k
    for d in range(3):
        meta = lay.recv(bufs[d]).view(torch.int32)[:, lay.rows.meta_col:]
        for s in range(3):
            toks = [t for t in range(xs[s].shape[0]) if (e2r[ids[s][t]] == d).any()]
            assert int(LY.LLLayout.word(bufs[d], LY.DISP_CNT + 4 * s)) == len(toks)
            for slot, t in enumerate(toks):
                row = s * C + slot
                assert torch.equal(lay.recv(bufs[d])[row, :lay.hidden], xs[s][t])
                mine = e2r[ids[s][t]] == d
                assert meta[row, :k].tolist() == torch.where(mine, e2l[ids[s][t]], -1).tolist()
                assert torch.equal(meta[row, k:2 * k].view(torch.float32), torch.where(mine, ws[s][t], 0.0))
                j = int(mine.int().argmax())  # the token's first slot on d owns the row
                assert int(homes[s][t, j]) == d * C + slot
            assert (meta[s * C + len(toks):(s + 1) * C, :k] == -1).all()  # the rest: empty


def test_layout_model_overflow_flags_and_keeps_what_fits():
    pl, xs, ids, ws = case_inputs("uniform_w2")  # 33 and 1 tokens, top-2 of 8 on 2 ranks
    results, ys, bufs, lay, homes = _model_run(pl, xs, ids, ws, 2)
    assert int(LY.LLLayout.word(bufs[0], LY.OVERFLOW)) == 1 and int(LY.LLLayout.word(bufs[1], LY.OVERFLOW)) == 0
    nccl = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=2)  # the same drops as the NCCL mode
    ref = ep_reference(xs, ids, ws, pl, expert_times_id)
    e2r = torch.tensor(pl.expert_to_rank)
    for r in range(2):
        assert torch.equal(ys[r], nccl.y[r])
        dest = e2r[ids[r]]
        fit = torch.ones(ids[r].shape[0], dtype=torch.bool)
        for w in range(2):
            goes = (dest == w).any(1)
            fit &= ~(goes & (torch.cumsum(goes.int(), 0) > 2))
        assert torch.equal(ys[r][fit], ref.y[r][fit]) and torch.isfinite(ys[r]).all()
        assert int(homes[r].max()) < 2 * 2  # never a row past W * C


def test_layout_model_names_a_rank_that_did_not_send():
    pl, xs, ids, ws = case_inputs("custom_w4")
    lay = LY.LLLayout.of(4, 8, 8, 3, torch.float32)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8) for _ in range(4)]
    e2r, e2l = pl.expert_to_rank_tensor(), pl.expert_to_local_tensor()
    for r in (0, 1, 3):  # rank 2 never runs
        LY.send_reference(bufs, lay, r, xs[r], ids[r], ws[r], e2r, e2l, torch.empty(xs[r].shape[0], 3, dtype=torch.int32), 1)
    LY.receive_reference(bufs[0], lay, 1)
    mask, phase = LY.LLLayout.word(bufs[0], LY.ERROR_MASK, 2).tolist()
    assert (mask, phase) == (1 << 2, 1)
    assert (lay.recv(bufs[0]).view(torch.int32)[2 * 8:3 * 8, lay.rows.meta_col:lay.rows.meta_col + 3] == -1).all()
    exc = timeout_error(mask, phase, [10, 11, 12, 13], 0.5, 10)
    assert isinstance(exc, RankFailureError) and exc.failed_ranks == [12]
    assert "rank(s) [12] did not arrive in dispatch within timeout_s = 0.5 s (seen by rank 10)" in str(exc)
    assert timeout_error(0, 0, [0, 1], 1.0, 0) is None
    assert "in combine" in str(timeout_error(0b11, 2, [0, 1], 1.0, 0))


def test_layout_model_a_rank_that_never_runs_counts_as_zero():
    """The timeout path, memory-safe and defined: rank 2 runs neither dispatch nor combine. The others
    count its rows as 0 (ids -1, DISP_CNT 0: nothing downstream indexes with its stale count), their
    BACK rows from it are zeroed (NaN before), and each y is the reference with rank 2's experts
    contributing 0, exactly; the error words name rank 2 (phase 2: combine's, the latest)."""
    pl, xs, ids, ws = _case("nondiv_w4")  # T [7, 0, 12, 5], 10 experts, top-3: rank 2 holds 3 of them
    W, C, H, k = 4, 12, xs[0].shape[1], ids[0].shape[1]
    lay = LY.LLLayout.of(W, C, H, k, torch.float32)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8) for _ in range(W)]
    for b in bufs:
        b[lay.recv_off:] = 0xFF  # NaN, and ids -1
        LY.LLLayout.word(b, LY.DISP_CNT, W).fill_(C + 5)  # a stale, out-of-range count: must never be used
    e2r, e2l = pl.expert_to_rank_tensor(), pl.expert_to_local_tensor()
    alive = (0, 1, 3)
    homes = {r: torch.full((xs[r].shape[0], k), -7, dtype=torch.int32) for r in alive}
    for r in alive:
        LY.send_reference(bufs, lay, r, xs[r], ids[r], ws[r], e2r, e2l, homes[r], 1)
    results = {}
    for r in alive:
        LY.receive_reference(bufs[r], lay, 1)
        assert int(LY.LLLayout.word(bufs[r], LY.DISP_CNT + 4 * 2)) == 0
        results[r] = expand_received(lay.recv(bufs[r]), lay.rows, pl.num_local_experts(r), None)
    for r in alive:
        ex = results[r]
        n = int(ex.expert_offsets[-1])
        local = torch.tensor(pl.local_experts(r), dtype=torch.long)
        e_of_row = local[torch.repeat_interleave(ex.tokens_per_expert.long())] if n else local[:0]
        h = torch.full((ex.gather_idx.shape[0], H), float("nan"))
        h[:n] = vectorised_expert(lay.recv(bufs[r])[:, :H][ex.gather_idx[:n].long()], e_of_row, ex.row_weights[:n])
        LY.combine_send_reference(bufs, lay, r, h, ex.slot_pos, 1)
    for r in alive:
        LY.combine_wait_reference(bufs[r], lay, 1)
        assert LY.LLLayout.word(bufs[r], LY.ERROR_MASK, 2).tolist() == [1 << 2, 2]
        assert (lay.back(bufs[r])[2 * C:3 * C] == 0).all()
    on2 = torch.tensor(pl.expert_to_rank) == 2
    ref = ep_reference(xs, ids, ws, pl, lambda rows, e: expert_times_id(rows, e) * (0.0 if on2[e] else 1.0))
    full = ep_reference(xs, ids, ws, pl, expert_times_id)
    for r in alive:
        y = gather_sum_reference(lay.back(bufs[r]), homes[r])
        assert torch.equal(y, ref.y[r]), r
    assert not torch.equal(ref.y[0], full.y[0]) and not torch.equal(ref.y[3], full.y[3])  # rank 2 mattered


def _threaded_ipc_run(monkeypatch, pl, xs, ids, ws, cap, steps, dtype=torch.float32, max_tokens=None, payload="native"):
    """IPCDispatcher's own code on CPU: W virtual ranks in W threads, the kernels replaced by the layout
    model with a barrier where ll.cu spins (every rank's stores land before any rank reads)."""
    import threading

    from moecomm.ep.ipc import _cuda

    W = pl.ep_size
    k, H = ids[0].shape[1], xs[0].shape[1]
    lay = LY.LLLayout.of(W, cap, H, k, dtype, payload)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8) for _ in range(W)]
    for b in bufs:
        b[lay.recv_off:] = 0xFF  # NaN
    barrier = threading.Barrier(W, timeout=60)

    def fake_dispatch(x, i, w, e2r, e2l, peer_ptrs, home, lay_, rank, timeout_ns, ranks_on_device):
        epoch = int(LY.LLLayout.word(bufs[rank], LY.DISP_EPOCH)) + 1
        LY.send_reference(bufs, lay_, rank, x, i, w, e2r, e2l, home, epoch)
        barrier.wait()  # ll.cu: the last block's spin on every peer's flag
        LY.receive_reference(bufs[rank], lay_, epoch)
        barrier.wait()  # (the model's receive rewrites ids; peers read nothing of ours meanwhile in ll.cu either)

    def fake_combine(out, slot_pos, peer_ptrs, lay_, rank, timeout_ns, ranks_on_device):
        epoch = int(LY.LLLayout.word(bufs[rank], LY.COMB_EPOCH)) + 1
        LY.combine_send_reference(bufs, lay_, rank, out, slot_pos, epoch)
        barrier.wait()
        LY.LLLayout.word(bufs[rank], LY.COMB_EPOCH).fill_(epoch)

    monkeypatch.setattr(_cuda, "dispatch_cuda", fake_dispatch)
    monkeypatch.setattr(_cuda, "combine_cuda", fake_combine)
    monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(lambda device: None))
    views = [SimpleNamespace(rank=r, world_size=W, nbytes=lay.nbytes, device=torch.device("cpu"), local=bufs[r],
                             peer_ptrs=torch.zeros(W, dtype=torch.int64), virtual=True) for r in range(W)]
    disps = [IPCDispatcher(pl.num_experts, k, H, buffer=v, placement=pl, dtype=dtype, max_tokens=max_tokens or cap,
                           capacity_per_peer=cap, timeout_s=5.0, payload=payload) for v in views]
    out = {}

    def rank_main(r):
        torch.set_num_threads(1)
        for step in range(steps):
            d = disps[r].dispatch(xs[r], ids[r], ws[r])
            n = int(d.expert_offsets[-1])
            local = torch.tensor(pl.local_experts(r), dtype=torch.long)
            e_of_row = local[torch.repeat_interleave(d.tokens_per_expert.long())] if n else local[:0]
            h = torch.full((d.gather_idx.shape[0], H), float("nan"), dtype=dtype)
            h[:n] = vectorised_expert(d.tokens[d.gather_idx[:n].long()], e_of_row, d.row_weights[:n])
            got = SimpleNamespace(**{f: getattr(d, f).clone() for f in ("tokens", "gather_idx", "expert_offsets",
                                                                        "tokens_per_expert", "row_weights")})
            got.slot_pos = d.handle.slot_pos.clone()
            barrier.wait()  # the results are views of the buffer: cloned before any rank's combine
            y = disps[r].combine(h, d.handle)
            out[(r, step)] = (got, y)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == W * steps, "a virtual rank failed (see the thread's traceback above)"
    return out, disps


@pytest.mark.parametrize("name", ["uniform_w2", "custom_w4", "nondiv_w4"])
def test_ipc_dispatcher_over_the_layout_model(monkeypatch, name):
    """dispatch / combine / handle / check_overflow of IPCDispatcher itself, kernels replaced by the model:
    equal to ep_reference and, bit for bit, to the NCCL static mode."""
    pl, xs, ids, ws = _case(name)
    cap = max(x.shape[0] for x in xs) or 1
    out, disps = _threaded_ipc_run(monkeypatch, pl, xs, ids, ws, cap, steps=2)
    nccl = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=cap)
    for step in range(2):
        results = [out[(r, step)][0] for r in range(pl.ep_size)]
        ys = [out[(r, step)][1] for r in range(pl.ep_size)]
        check_against_reference(pl, xs, ids, ws, results, ys)
        for r in range(pl.ep_size):
            a, b = results[r], nccl.results[r]
            n = int(b.expert_offsets[-1])
            assert torch.equal(a.gather_idx, b.gather_idx) and torch.equal(a.expert_offsets, b.expert_offsets)
            assert torch.equal(a.row_weights[:n], b.row_weights[:n]) and torch.equal(a.slot_pos, b.handle[0])
            assert torch.equal(ys[r], nccl.y[r])
            assert a.tokens.shape == (pl.ep_size * cap, xs[0].shape[1])
    for d in disps:
        d.check_overflow()


def test_ipc_dispatcher_overflow_and_errors_over_the_layout_model(monkeypatch):
    pl, xs, ids, ws = _case("uniform_w2")  # 33 and 1 tokens, top-2 of 8 on 2 ranks
    out, disps = _threaded_ipc_run(monkeypatch, pl, xs, ids, ws, 2, steps=1, max_tokens=33)
    nccl = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=2)  # the same rows dropped
    for r in range(2):
        assert torch.equal(out[(r, 0)][1], nccl.y[r])
    assert disps[0].overflowed() and not disps[1].overflowed()
    with pytest.raises(MoeCommValueError, match="IPCDispatcher: capacity_per_peer must hold every row .* got 2 rows on rank 0"):
        disps[0].check_overflow()
    disps[0].check_overflow()  # cleared
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher.dispatch: x must have at most max_tokens = 33 rows, got 34"):
        disps[0].dispatch(torch.zeros(34, 16), torch.zeros(34, 2, dtype=torch.int32), torch.ones(34, 2))
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.dispatch: x must have dtype float32, got float16"):
        disps[0].dispatch(xs[0].half(), ids[0], ws[0])
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher.dispatch: topk_ids must have shape \[33, 2\]"):
        disps[0].dispatch(xs[0], ids[0][:, :1], ws[0])
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher.combine: handle must be the handle of this IPCDispatcher"):
        disps[0].combine(torch.zeros(1, 16), "nope")
    LY.LLLayout.word(disps[1].buffer.local, LY.ERROR_MASK, 2).copy_(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(RankFailureError, match=r"rank\(s\) \[0\] did not arrive in combine .* \(seen by rank 1\)"):
        disps[1].check_overflow()  # a timeout word is raised before the overflow flag


# ----------------------------------------------------------------------------- arguments and the decision


def _fake_buffer(W=2, nbytes=1 << 20, device="cpu", rank=0):
    return SimpleNamespace(rank=rank, world_size=W, nbytes=nbytes, device=torch.device(device),
                           local=torch.zeros(8, dtype=torch.uint8), peer_ptrs=torch.zeros(W, dtype=torch.int64),
                           virtual=True)


def test_ipc_dispatcher_arguments():
    kw = dict(dtype=torch.float32, max_tokens=4)
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher: buffer must be a SymmetricBuffer .* got int"):
        IPCDispatcher(8, 2, 16, buffer=3, **kw)
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher: max_tokens must be <= 1024 .* got 2000"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), dtype=torch.float32, max_tokens=2000)
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher: capacity_per_peer must be <= max_tokens \(4\), got 5"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), capacity_per_peer=5, **kw)
    with pytest.raises(MoeCommValueError, match=r"IPCDispatcher: buffer.world_size must be in \[1, 8\] .* got 9"):
        IPCDispatcher(9, 2, 16, buffer=_fake_buffer(W=9), **kw)
    need = IPCDispatcher.buffer_bytes(2, 4, 16, 2, torch.float32)
    with pytest.raises(MoeCommValueError, match=rf"IPCDispatcher: buffer.nbytes must be >= {need} .* got 100"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(nbytes=100), **kw)
    with pytest.raises(MoeCommValueError, match="IPCDispatcher: placement must be for 8 experts on 2 ranks"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), placement=ExpertPlacement(8, 4), **kw)
    with pytest.raises(MoeCommTypeError, match="IPCDispatcher: dtype must be float32, float16 or bfloat16, got torch.int32"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), dtype=torch.int32, max_tokens=4)
    with pytest.raises(MoeCommValueError, match="IPCDispatcher: timeout_s must be a number > 0, got 0"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), timeout_s=0, **kw)
    with pytest.raises(UnsupportedHardwareError, match="IPCDispatcher: needs a CUDA device"):
        IPCDispatcher(8, 2, 16, buffer=_fake_buffer(), **kw)


def test_choose_ep_path():
    ok, no = Eligibility(True, "one node, peer access"), Eligibility(False, "the ranks span 2 hosts")
    assert choose_ep_path(5, ep_size=1).path == "local"
    got = choose_ep_path(128, ep_size=8, eligibility=ok, ll_max_tokens=128, static_max_tokens=256)
    assert got.path == "ipc_ll" and "128 <= 128" in got.reason
    got = choose_ep_path(129, ep_size=8, eligibility=ok, ll_max_tokens=128, static_max_tokens=256)
    assert got.path == "nccl_static" and "129 tokens exceed the low-latency capacity of 128" in got.reason
    got = choose_ep_path(1, ep_size=8, eligibility=no, ll_max_tokens=128, static_max_tokens=256)
    assert got.path == "nccl_static" and "the ranks span 2 hosts" in got.reason
    got = choose_ep_path(1, ep_size=8, eligibility=None, ll_max_tokens=128)
    assert got.path == "nccl_throughput" and "no symmetric (IPC) buffer" in got.reason
    got = choose_ep_path(300, ep_size=8, eligibility=ok, ll_max_tokens=128, static_max_tokens=256)
    assert got.path == "nccl_throughput" and "300 > 256" in got.reason
    assert choose_ep_path(0, ep_size=2, eligibility=ok, ll_max_tokens=1).path == "ipc_ll"
    with pytest.raises(MoeCommValueError, match="choose_ep_path: num_tokens must be an int >= 0, got -1"):
        choose_ep_path(-1, ep_size=2)


class _FakePath:
    """Stands for EPDispatcher / IPCDispatcher in NodeDispatcher's routing test: records the calls."""

    def __init__(self, name, max_tokens, calls):
        self.name, self.max_tokens, self.calls, self.ep_size, self.num_local_experts = name, max_tokens, calls, 4, 2

    def dispatch(self, x, ids, w):
        self.calls.append((self.name, "dispatch", x.shape[0]))
        return SimpleNamespace(handle=SimpleNamespace(buffers=self if self.name == "ipc" else None))

    dispatch_unchecked = dispatch

    def combine(self, out, handle):
        self.calls.append((self.name, "combine"))
        return out

    combine_unchecked = combine

    def check_overflow(self):
        self.calls.append((self.name, "check"))


def test_node_dispatcher_takes_the_chosen_path(caplog):
    import logging

    from moecomm.ep.ipc import NodeDispatcher

    calls = []
    ep, ipc = _FakePath("ep", 16, calls), _FakePath("ipc", 4, calls)
    node = NodeDispatcher(ep, ipc, eligibility=Eligibility(True, "one node"))
    x = torch.zeros(3, 8)
    with caplog.at_level(logging.INFO, logger="moecomm"):
        for T in (3, 4, 4, 9, 3):
            d = node.dispatch(torch.zeros(T, 8), None, None)
            node.combine(x, d.handle)
    assert [c for c in calls if c[1] == "dispatch"] == [("ipc", "dispatch", 3), ("ipc", "dispatch", 4),
                                                        ("ipc", "dispatch", 4), ("ep", "dispatch", 9),
                                                        ("ipc", "dispatch", 3)]
    assert [c[0] for c in calls if c[1] == "combine"] == ["ipc", "ipc", "ipc", "ep", "ipc"]  # back the same way
    assert node.last_path.path == "ipc_ll"
    said = [r.getMessage() for r in caplog.records if "path" in r.getMessage()]
    assert len(said) == 3 and "9 tokens a rank take the nccl_static path" in said[1]  # once per change
    calls.clear()
    node.check_overflow()
    assert calls == [("ep", "check"), ("ipc", "check")]
    off = NodeDispatcher(ep, ipc, eligibility=Eligibility(False, "PCIe without P2P"))
    off.dispatch(x, None, None)
    assert calls[-1] == ("ep", "dispatch", 3) and "PCIe without P2P" in off.last_path.reason
    alone = NodeDispatcher(ep, None)
    alone.dispatch_unchecked(x, None, None)
    assert calls[-1] == ("ep", "dispatch", 3) and alone.last_path.path == "nccl_static"


def test_ll_benchmark_quick(tmp_path):
    """benchmarks/bench_ll_dispatch --quick (CPU: the layout model): runs and writes JSON lines."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_ll_dispatch", "--quick", "--out", str(out)],
                          env=dict(os.environ, PYTHONPATH=str(root)), cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs and all(r["bench"] == "ll_dispatch" and r["median_ms"] > 0 for r in recs)


# ----------------------------------------------------------------------------- GPU: virtual ranks


def _gpu_inputs(Ts, E, k, H, *, skew, seed, dtype=torch.bfloat16, e2r=None):
    W = len(Ts)
    pl = ExpertPlacement(E, W, tuple(e2r) if e2r else ())
    xs, ids, ws = [], [], []
    for r, T in enumerate(Ts):
        i, w = routing(T, E, k, skew=skew, seed=seed * 100 + r)
        xs.append(int_tokens(T, H, seed=seed * 100 + r, dtype=dtype).clamp(-2, 2).cuda())
        ids.append(i.to(torch.int32).cuda())
        # weights 0.5 or 1: every term a multiple of 0.5 of magnitude <= 4, a sum of <= 8 terms at most
        # 7 significant bits: exact in bf16 after every rounding (the receiver's partials included)
        ws.append((2.0 ** torch.randint(-1, 1, (T, k), generator=torch.Generator().manual_seed(seed * 100 + r))).float().cuda())
    return pl, xs, ids, ws


def _gpu_expert(rows, e_of_row, row_w):
    # rows * (e % 2 + 1) * w: with |x| <= 2, w in {1/4 .. 2}, k <= 8 every sum has <= 8 significant bits: exact in bf16
    return (rows.float() * (e_of_row[:, None] % 2 + 1) * row_w[:, None]).to(rows.dtype)


def _gpu_ref_expert(rows, e):
    return rows * (e % 2 + 1)


def _open(W, disp_kw, E, k, H, dtype, cap, placement=None, nan_fill=True):
    from moecomm.distributed.symmetric import open_virtual

    nbytes = IPCDispatcher.buffer_bytes(W, cap, H, k, dtype)
    bufs = open_virtual(nbytes, W, "cuda")
    lay = LY.LLLayout.of(W, cap, H, k, dtype)
    if nan_fill:
        for b in bufs:
            b.local[lay.recv_off:] = 0xFF  # RECV and BACK NaN: an unwritten row read shows
    torch.cuda.synchronize()
    disps = [IPCDispatcher(E, k, H, buffer=b, placement=placement, dtype=dtype, max_tokens=cap, **disp_kw) for b in bufs]
    _LOCAL_IDS.clear()
    for d in disps:
        _local_ids(d)
    return bufs, disps


_LOCAL_IDS: dict[int, torch.Tensor] = {}


def _local_ids(disp) -> torch.Tensor:
    """[max(L, 1)] int64 on the GPU: the rank's global expert ids, built once (never inside a capture:
    a host-to-device copy from a list is not capturable)."""
    t = _LOCAL_IDS.get(id(disp))
    if t is None:
        t = _LOCAL_IDS[id(disp)] = torch.tensor(disp.local_experts or [0], dtype=torch.long, device="cuda")
    return t


def _step(disps, streams, xs, ids, ws, E, expert=_gpu_expert, ranks=None):
    """One dispatch -> expert -> combine on every virtual rank, each on its own stream, in the phase
    order of moecomm.ep.ipc.virtual (every rank's LL kernel before any rank's Triton / torch work:
    a first launch's module load behind a spinning kernel deadlocks); no sync inside."""

    def run_expert(r, d):
        N = d.gather_idx.shape[0]
        local = _local_ids(disps[r])
        # every expanded row's expert by its place in the offsets (padding rows: the last expert;
        # combine never reads them); NaN would do too but costs a mask
        e_of_row = local[torch.searchsorted(d.expert_offsets[1:].long(), torch.arange(N, device="cuda"),
                                            right=True).clamp(max=max(len(disps[r].local_experts) - 1, 0))]
        return expert(d.tokens[d.gather_idx.long()], e_of_row, d.row_weights) if N else d.tokens.new_zeros((0, xs[r].shape[1]))

    return virtual_step(disps, streams, xs, ids, ws, run_expert, ranks=ranks)


GPU_CASES = [  # (Ts, E, k, H, skew, placement map)
    ([5, 9], 8, 2, 256, False, None),
    ([33, 0, 17, 128], 10, 4, 7168, True, None),           # a rank sending nothing, E % W != 0
    ([64, 3, 1, 128, 0, 77, 128, 9], 256, 8, 7168, True, None),  # DeepSeek-V3 shape, skewed
    ([16, 16, 16, 16, 16, 16, 16, 16], 256, 8, 7168, False, None),  # uniform
    ([6, 8, 0, 3], 6, 3, 40, True, [3, 0, 3, 1, 1, 0]),     # rank 2 holds no expert
    ([7], 4, 2, 64, False, None),                           # W 1: a rank signalling itself
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ll_virtual_ranks_exact(monkeypatch, case, dtype):
    """Three steps on the same buffers (epochs advance), each against ep_reference and the NCCL
    static mode over the same virtual ranks, bit for bit."""
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    Ts, E, k, H, skew, e2r = GPU_CASES[case]
    if dtype is torch.float32 and H > 1024:
        H = 1001  # fp32 on a smaller, odd row: the scalar copy and sum paths
    W = len(Ts)
    cap = max(Ts) or 1
    pl0 = ExpertPlacement(E, W, tuple(e2r) if e2r else ())
    bufs, disps = _open(W, dict(timeout_s=5.0), E, k, H, dtype, cap, placement=pl0)
    streams = [torch.cuda.Stream() for _ in range(W)]
    try:
        for seed in range(3):
            pl, xs, ids, ws = _gpu_inputs(Ts, E, k, H, skew=skew, seed=seed, dtype=dtype, e2r=e2r)
            res, ys = _step(disps, streams, xs, ids, ws, E)
            torch.cuda.synchronize()
            for d in disps:
                d.check_overflow()  # no timeout, nothing dropped
            ref = ep_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], pl, _gpu_ref_expert)
            nccl = virtual_ep_forward(xs, ids, ws, pl, _gpu_expert, capacity=cap)
            for r in range(W):
                a, b = res[r], nccl.results[r]
                n = int(b.expert_offsets[-1])
                g = a.tokens[a.gather_idx[:n].long()]
                offs = a.expert_offsets.tolist()
                for lx in range(pl.num_local_experts(r)):
                    assert torch.equal(g[offs[lx]:offs[lx + 1]].cpu(), ref.received[r][lx]), (seed, r, lx)
                for f in ("gather_idx", "expert_offsets", "tokens_per_expert"):
                    assert torch.equal(getattr(a, f), getattr(b, f)), (seed, r, f)
                assert torch.equal(a.row_weights[:n], b.row_weights[:n]) and torch.equal(a.handle.slot_pos, b.handle[0])
                assert torch.equal(ys[r].cpu(), ref.y[r]), (seed, r)
                assert torch.equal(ys[r], nccl.y[r]), (seed, r)
    finally:
        for b in bufs:
            b.close()


@pytest.mark.gpu
def test_ll_layers_share_one_buffer(monkeypatch):
    """Two dispatchers a rank (two MoE layers) on one set of buffers, called in turn: the epochs live
    in the buffer, so each layer's calls advance the same counters; every result exact."""
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    Ts, E, k, H, W = [9, 4, 0, 12], 16, 4, 128, 4
    bufs, first = _open(W, dict(timeout_s=5.0), E, k, H, torch.bfloat16, 12)
    second = [IPCDispatcher(E, k, H, buffer=b, dtype=torch.bfloat16, max_tokens=12, timeout_s=5.0) for b in bufs]
    for d in second:
        _local_ids(d)
    streams = [torch.cuda.Stream() for _ in range(W)]
    try:
        for seed in range(4):
            pl, xs, ids, ws = _gpu_inputs(Ts, E, k, H, skew=bool(seed % 2), seed=seed)
            _, ys = _step(first if seed % 2 == 0 else second, streams, xs, ids, ws, E)
            torch.cuda.synchronize()
            ref = ep_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], pl, _gpu_ref_expert)
            for r in range(W):
                assert torch.equal(ys[r].cpu(), ref.y[r]), (seed, r)
        for d in first + second:
            d.check_overflow()
    finally:
        for b in bufs:
            b.close()


@pytest.mark.gpu
def test_ll_overflow_flags_and_corrupts_nothing(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    Ts, E, k, H = [40, 3, 40, 1], 16, 4, 512
    W = 4
    pl, xs, ids, ws = _gpu_inputs(Ts, E, k, H, skew=True, seed=5)
    bufs, disps = _open(W, dict(timeout_s=5.0, capacity_per_peer=4), E, k, H, torch.bfloat16, 40)
    streams = [torch.cuda.Stream() for _ in range(W)]
    try:
        res, ys = _step(disps, streams, xs, ids, ws, E)
        torch.cuda.synchronize()
        nccl = virtual_ep_forward(xs, ids, ws, pl, _gpu_expert, capacity=4)  # the NCCL mode drops the same rows
        for r in range(W):
            assert torch.equal(ys[r], nccl.y[r]) and torch.isfinite(ys[r].float()).all()
            assert disps[r].overflowed() == bool(int(nccl.results[r].handle[1]))
            assert int(disps[r]._home[:Ts[r]].max()) < W * 4
        assert disps[0].overflowed()
        for r in range(W):
            if disps[r].overflowed():
                with pytest.raises(MoeCommValueError,
                                   match=f"IPCDispatcher: capacity_per_peer must hold every row .* got 4 rows on rank {r}"):
                    disps[r].check_overflow()
            assert not disps[r].overflowed()  # cleared by the check
        small = [x[:2] for x in xs], [i[:2] for i in ids], [w[:2] for w in ws]  # fits now: exact again
        res, ys = _step(disps, streams, *small, E)
        torch.cuda.synchronize()
        ref = ep_reference([x.cpu() for x in small[0]], [i.cpu() for i in small[1]], [w.cpu() for w in small[2]], pl,
                           _gpu_ref_expert)
        for r in range(W):
            assert torch.equal(ys[r].cpu(), ref.y[r]) and not disps[r].overflowed()
    finally:
        for b in bufs:
            b.close()


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 8])
def test_ll_cuda_graph_capture_and_replay(monkeypatch, W):
    """dispatch + expert + combine of all W virtual ranks captured in one graph (a branch a rank),
    replayed on new inputs: every replay exact. The epochs live on the device, so replays advance them."""
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    E, k, H, T = 64, 8, 2048, 32
    pl = ExpertPlacement(E, W)
    # 5 s: were the graph's W branches ever run one after another, each wait would end in a named
    # timeout error instead of a long hang
    bufs, disps = _open(W, dict(timeout_s=5.0), E, k, H, torch.bfloat16, T)
    streams = [torch.cuda.Stream() for _ in range(W)]
    try:
        _, xs, ids, ws = _gpu_inputs([T] * W, E, k, H, skew=False, seed=0)
        static = [[t.clone() for t in group] for group in (xs, ids, ws)]
        _step(disps, streams, *static, E)  # warm-up outside the capture: compiles, allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, ys = _step(disps, streams, *static, E)
        for seed in (1, 2, 3):
            _, xs, ids, ws = _gpu_inputs([T] * W, E, k, H, skew=bool(seed % 2), seed=seed)
            for dst, src in zip(static, (xs, ids, ws)):
                for a, b in zip(dst, src):
                    a.copy_(b)
            graph.replay()
            torch.cuda.synchronize()
            ref = ep_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], pl, _gpu_ref_expert)
            for r in range(W):
                assert torch.equal(ys[r].cpu(), ref.y[r]), (seed, r)
        for d in disps:
            d.check_overflow()
    finally:
        for b in bufs:
            b.close()


@pytest.mark.gpu
def test_ll_timeout_names_the_rank_that_never_launched(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    W, E, k, H, T, timeout_s = 4, 16, 2, 256, 8, 0.5
    pl, xs, ids, ws = _gpu_inputs([T] * W, E, k, H, skew=False, seed=1)
    from moecomm.ep.ipc import _cuda
    from moecomm.ep.nccl.plan import RowLayout

    _cuda.kernel("moecomm_ll_dispatch", torch.device("cuda"))  # compile and load outside the timing
    expand_received(torch.full((4, RowLayout.of(H, k, torch.bfloat16).width), -1.0, dtype=torch.bfloat16, device="cuda"),
                    RowLayout.of(H, k, torch.bfloat16), 4, None)  # the expansion's Triton kernels too
    torch.cuda.synchronize()
    bufs, disps = _open(W, dict(timeout_s=timeout_s), E, k, H, torch.bfloat16, T)
    streams = [torch.cuda.Stream() for _ in range(W)]
    try:
        t0 = time.perf_counter()
        virtual_dispatch(disps, streams, xs, ids, ws, ranks=(0, 1, 3))  # rank 2 never launches
        torch.cuda.synchronize()
        waited = time.perf_counter() - t0
        assert waited < timeout_s + 5.0, waited  # bounded: no hang
        for r in (0, 1, 3):
            with pytest.raises(RankFailureError, match=r"rank\(s\) \[2\] did not arrive in dispatch within timeout_s = 0.5 s") as info:
                disps[r].check_overflow()
            assert info.value.failed_ranks == [2]
        print(f"\nLL timeout: the three ranks returned {waited:.3f} s after launch (timeout {timeout_s} s)")
    finally:
        for b in bufs:
            b.close()


@pytest.mark.gpu
def test_ll_combine_timeout_counts_the_missing_rank_as_zero(monkeypatch):
    """Every rank dispatches, rank 2 never combines: the others' combine kernels time out on it (0.5 s),
    name it, touch nothing out of bounds (the H200's first run saw an illegal access after a timeout),
    and their y is exact with rank 2's experts contributing 0 (its BACK rows zeroed, not stale NaN)."""
    from moecomm.ep.ipc.virtual import virtual_combine

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    W, E, k, H, T, timeout_s = 4, 16, 4, 256, 8, 0.5
    pl, xs, ids, ws = _gpu_inputs([T] * W, E, k, H, skew=False, seed=3)
    bufs, disps = _open(W, dict(timeout_s=timeout_s), E, k, H, torch.bfloat16, T)
    streams = [torch.cuda.Stream() for _ in range(W)]
    alive = (0, 1, 3)
    try:
        res, _ = _step(disps, streams, xs, ids, ws, E)  # one full step first: every kernel loaded, BACK written
        torch.cuda.synchronize()
        for d in disps:
            d.check_overflow()
        for b in bufs:  # BACK NaN again: a row the timeout path leaves unwritten shows
            b.local[disps[0].layout.back_off:] = 0xFF
        res = virtual_dispatch(disps, streams, xs, ids, ws)
        hs = {}
        for r in range(W):
            d = res[r]
            N = d.gather_idx.shape[0]
            local = _local_ids(disps[r])
            e_of_row = local[torch.searchsorted(d.expert_offsets[1:].long(), torch.arange(N, device="cuda"),
                                                right=True).clamp(max=max(len(disps[r].local_experts) - 1, 0))]
            hs[r] = _gpu_expert(d.tokens[d.gather_idx.long()], e_of_row, d.row_weights)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ys = virtual_combine(disps, streams, hs, {r: res[r].handle for r in range(W)}, ranks=alive)
        torch.cuda.synchronize()  # an illegal access would raise here
        waited = time.perf_counter() - t0
        assert waited < timeout_s + 5.0, waited
        on2 = [pl.expert_to_rank[e] == 2 for e in range(E)]
        ref = ep_reference([x.cpu() for x in xs], [i.cpu() for i in ids], [w.cpu() for w in ws], pl,
                           lambda rows, e: _gpu_ref_expert(rows, e) * (0.0 if on2[e] else 1.0))
        for r in alive:
            assert torch.equal(ys[r].cpu(), ref.y[r]), r
            with pytest.raises(RankFailureError, match=r"rank\(s\) \[2\] did not arrive in combine within timeout_s = 0.5 s"):
                disps[r].check_errors()
        print(f"\nLL combine timeout: the three ranks returned {waited:.3f} s after launch (timeout {timeout_s} s)")
    finally:
        for b in bufs:
            b.close()
