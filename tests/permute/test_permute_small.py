"""The one-program permute of decode sizes (M <= SMALL_M) and the row weights written by the sort.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

permute_small_kernel must give the multi-kernel path's results bit for bit (same stable order,
dropped slots after expert_offsets[E]), and row_weights must equal the reference scatter
row_weights[dst_row[t, j]] = topk_weights[t, j] on both paths. Everything here is data movement:
exact equality throughout. On CPU the kernels run through the Triton interpreter (conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moecomm.ep import LocalDispatcher
from moecomm.permute import permute, permute_indices
from moecomm.permute import reference as ref
from moecomm.permute.api import permute_with_row_weights

K = pytest.importorskip("moecomm.permute._triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("permute_small_kernel", "permute_rows_kernel", "permute_hist_kernel", "permute_scan_kernel", "permute_scatter_kernel")


def make_ids(num_tokens, top_k, num_experts, mode="uniform", seed=0, device=DEV):
    """[T, k] int32 without repeats per token. sparse: only every third expert gets tokens."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if mode == "sparse":
        scores[:, torch.arange(num_experts) % 3 != 0] -= 10.0
    return scores.topk(top_k, dim=1).indices.to(torch.int32).to(device)


def make_weights(num_tokens, top_k, seed=1, device=DEV):
    """[T, k] fp32, every value distinct: a weight on the wrong row cannot pass."""
    return (torch.randperm(num_tokens * top_k, generator=torch.Generator().manual_seed(seed)).float() / 7 + 0.5).reshape(
        num_tokens, top_k).to(device)


def reference(ids, num_experts, w):
    """(src_token, dst_row, tokens_per_expert, expert_offsets, row_weights) by the reference."""
    src, dst, tpe, offsets = ref.permute_indices_ref(ids, num_experts)
    rw = torch.empty(ids.numel(), dtype=torch.float32, device=ids.device)
    rw.scatter_(0, dst.reshape(-1).long(), w.reshape(-1))
    return src, dst, tpe, offsets, rw


class LaunchSpy:
    """Counts the launches of each kernel of moecomm.permute._triton (wraps kernel[grid])."""

    def __init__(self, monkeypatch):
        self.counts = dict.fromkeys(KERNELS, 0)
        for name in KERNELS:
            monkeypatch.setattr(K, name, self._wrap(name, getattr(K, name)))

    def _wrap(self, name, kernel):
        spy = self

        class Wrapped:
            def __getitem__(self, grid):
                spy.counts[name] += 1
                return kernel[grid]

        return Wrapped()

    def launched(self):
        return {k: v for k, v in self.counts.items() if v}


def triton_permute(ids, num_experts, w=None, x=None, *, small: bool):
    """permute_triton on the path asked for (SMALL_M set to 0 forces the multi-kernel path)."""
    with pytest.MonkeyPatch.context() as mp:
        if not small:
            mp.setattr(K, "SMALL_M", 0)
        out = None if x is None else torch.full((ids.numel(), x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
        res = K.permute_triton(ids.contiguous(), num_experts, x, out, w)
    return res, out


def assert_equal_all(got, want):
    names = ("src_token", "dst_row", "tokens_per_expert", "expert_offsets", "row_weights")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


# ---------------------------------------------------------------------------------------------
# the one-program sort against the multi-kernel path and the reference


SHAPES = [
    (32, 8, 128),  # Qwen3-30B-A3B decode step of 32 tokens: M = 256 = SMALL_M
    (33, 2, 8),  # Mixtral-like top-2 of 8, odd T
    (30, 8, 256),  # DeepSeek-V3 routing width: M = 240 over 2 blocks of 128
    (40, 4, 512),  # 513 buckets: 1024 bins, the widest the brief asks for
    (1, 8, 128),
    (1, 1, 1),
    (0, 2, 4),
]


@pytest.mark.parametrize("num_tokens,top_k,num_experts", SHAPES)
@pytest.mark.parametrize("mode", ["uniform", "sparse"])
def test_small_path_bit_identical(monkeypatch, num_tokens, top_k, num_experts, mode):
    if mode == "sparse" and (num_experts < 3 or top_k > (num_experts + 2) // 3):
        pytest.skip("sparse routing needs empty experts and enough non-empty ones for distinct picks")
    ids = make_ids(num_tokens, top_k, num_experts, mode)
    w = make_weights(num_tokens, top_k)
    spy = LaunchSpy(monkeypatch)
    small, _ = triton_permute(ids, num_experts, w, small=True)
    if num_tokens:
        assert spy.launched() == {"permute_small_kernel": 1}  # the whole dispatch in one launch
    multi, _ = triton_permute(ids, num_experts, w, small=False)
    want = reference(ids, num_experts, w)
    assert_equal_all(small, want)
    assert_equal_all(multi, want)
    if mode == "sparse":
        assert (want[2] == 0).any()  # experts with no tokens were exercised


def test_small_path_int64_ids_and_strided_weights():
    t, k, e = 64, 8, 128
    ids = make_ids(t, k, e).long()
    w = make_weights(k, t).t()  # [T, k] with strides (1, T)
    assert not w.is_contiguous()
    for small in (True, False):
        got, _ = triton_permute(ids, e, w, small=small)
        assert_equal_all(got, reference(ids, e, w))


@pytest.mark.parametrize("small", [True, False])
def test_out_of_range_ids_dropped_after_last_expert(small):
    """Unvalidated ids (-1, E, 99) go to the bucket after expert_offsets[E], in slot order, as before."""
    t, k, e = 33, 4, 8
    ids = make_ids(t, k, e)
    ids[3, 1], ids[10, 0], ids[20, 3], ids[32, 2] = 99, -1, e, -7
    w = make_weights(t, k)
    got, _ = triton_permute(ids, e, w, small=small)
    assert_equal_all(got, reference(ids, e, w))
    assert got[3][-1].item() == t * k - 4
    assert got[1][[3, 10, 20, 32], [1, 0, 3, 2]].tolist() == [t * k - 4 + i for i in range(4)]


@pytest.mark.parametrize("num_tokens", [7, 8, 9, 16])  # M = 56, 64, 72, 128 around SMALL_M = 64
def test_threshold(monkeypatch, num_tokens):
    """Forced SMALL_M = 64: M <= 64 runs the one program, M > 64 the multi-kernel path; both exact."""
    k, e = 8, 16
    monkeypatch.setattr(K, "SMALL_M", 64)
    monkeypatch.setattr(K, "SMALL_BLOCK_M", 16)  # 4 ranking trips at M = 64, the carried cursor at work
    ids = make_ids(num_tokens, k, e, "sparse")
    w = make_weights(num_tokens, k)
    spy = LaunchSpy(monkeypatch)
    got = K.permute_triton(ids, e, None, None, w)
    small = num_tokens * k <= 64
    assert spy.launched() == ({"permute_small_kernel": 1} if small else
                              {"permute_hist_kernel": 1, "permute_scan_kernel": 1, "permute_scatter_kernel": 1})
    assert_equal_all(got, reference(ids, e, w))


def test_many_buckets_fall_back(monkeypatch):
    """E + 1 > SMALL_MAX_BUCKETS takes the multi-kernel path, still exact."""
    t, k, e = 8, 2, 40
    monkeypatch.setattr(K, "SMALL_MAX_BUCKETS", 32)
    ids, w = make_ids(t, k, e), make_weights(t, k)
    spy = LaunchSpy(monkeypatch)
    got = K.permute_triton(ids, e, None, None, w)
    assert "permute_small_kernel" not in spy.launched()
    assert_equal_all(got, reference(ids, e, w))


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # a copy: exact in any dtype
def test_rows_copied_with_weights(monkeypatch, small, dtype):
    """permute with x: the one program + the row copy (2 launches), or the scatter with COPY; rows exact."""
    t, k, e, h = 33, 4, 16, 40
    ids, w = make_ids(t, k, e), make_weights(t, k)
    x = (torch.arange(t * h, dtype=torch.float32) % 251).reshape(t, h).to(dtype).to(DEV)  # row t holds t's values
    spy = LaunchSpy(monkeypatch)
    got, out = triton_permute(ids, e, w, x, small=small)
    if small:
        assert spy.launched() == {"permute_small_kernel": 1, "permute_rows_kernel": 1}
    want = reference(ids, e, w)
    assert_equal_all(got, want)
    assert torch.equal(out, x[want[0].long()])  # NaN-prefilled: an unwritten row fails


# ---------------------------------------------------------------------------------------------
# through the API: permute_with_row_weights, LocalDispatcher, public ops unchanged


@pytest.mark.parametrize("materialize", [False, True])
@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(64, 8, 128), (0, 2, 4), (150, 8, 64)])  # M = 1200 > SMALL_M
def test_dispatch_unchanged(backend, materialize, num_tokens, top_k, num_experts):
    """LocalDispatcher.dispatch gives what permute/permute_indices + the reference scatter gave."""
    h = 24
    ids, w = make_ids(num_tokens, top_k, num_experts, device=backend), make_weights(num_tokens, top_k, device=backend)
    x = torch.randn(num_tokens, h, generator=torch.Generator().manual_seed(2)).to(backend)
    r = LocalDispatcher(num_experts, top_k, materialize=materialize).dispatch(x, ids, w)
    p = permute(x, ids, num_experts) if materialize else None
    idx = p.indices if materialize else permute_indices(ids, num_experts)
    want = reference(ids, num_experts, w)
    assert_equal_all((r.handle.src_token, r.handle.dst_row, r.tokens_per_expert, r.expert_offsets, r.row_weights), want)
    assert_equal_all((idx.src_token, idx.dst_row, idx.tokens_per_expert, idx.expert_offsets), want[:4])
    if materialize:
        assert r.gather_idx is None and torch.equal(r.tokens, p.permuted)
    else:
        assert r.tokens is x and torch.equal(r.gather_idx, want[0])


def test_bad_weights():
    ids = make_ids(4, 2, 4, device="cpu")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"permute_with_row_weights: topk_weights must have shape \[4, 2\]"):
        permute_with_row_weights(x, ids, torch.rand(4, 3), 4, materialize=False)
    with pytest.raises(TypeError, match="permute_with_row_weights: topk_weights must have dtype float32"):
        permute_with_row_weights(x, ids, torch.rand(4, 2).half(), 4, materialize=True)
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, num_experts=4\), got 4"):
        permute_with_row_weights(x, torch.full_like(ids, 4), torch.rand(4, 2), 4, materialize=False)


def test_opcheck_and_compile(backend):
    """Fake implementations match the ops; dynamo traces the dispatch with no graph break."""
    t, h, k, e = 9, 8, 2, 4
    x, ids, w = torch.randn(t, h, device=backend), make_ids(t, k, e, device=backend), make_weights(t, k, device=backend)
    torch.library.opcheck(torch.ops.moecomm.permute_indices_weighted.default, (ids, e, w))
    torch.library.opcheck(torch.ops.moecomm.permute_weighted.default, (x, ids, e, w))
    for materialize in (False, True):
        d = LocalDispatcher(e, k, materialize=materialize, validate=False)

        def step(x, ids, w):
            r = d.dispatch(x, ids, w)
            return r.row_weights, r.expert_offsets, r.handle.dst_row

        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, ids, w)
        for g, want in zip(got, step(x, ids, w)):
            assert torch.equal(g, want)


# ---------------------------------------------------------------------------------------------
# sm_90 compile without a GPU


_AOT_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moecomm.permute import _triton as K

    def compile90(kernel, sig, consts, aligned=(), warps=4):
        attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        return triton.compile(ASTSource(kernel, {**sig, **{c: "constexpr" for c in consts}}, consts, attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

    small = {"ids_ptr": "*i32", "w_ptr": "*fp32", "dst_row_ptr": "*i32", "src_token_ptr": "*i32", "row_w_ptr": "*fp32",
             "tokens_per_expert_ptr": "*i32", "offsets_ptr": "*i32", "M": "i32", "E": "i32", "NBUCKETS": "i32",
             "stride_wt": "i32", "stride_wk": "i32"}
    for nbins, count_block, has_w in ((2, 128, False), (256, 512, True), (1024, 1024, True)):
        ptx = compile90(K.permute_small_kernel, small, {"TOP_K": 8, "BLOCK_M": K.SMALL_BLOCK_M, "COUNT_BLOCK": count_block,
                        "NUM_BINS": nbins, "HAS_W": has_w}, warps=K.SMALL_NUM_WARPS)
        assert ".target sm_90" in ptx and "st.global" in ptx
    rows = {"x_ptr": "*bf16", "dst_row_ptr": "*i32", "out_ptr": "*bf16", "T": "i32", "H": "i32", "stride_xt": "i32",
            "stride_ot": "i32"}
    ptx = compile90(K.permute_rows_kernel, rows, {"TOP_K": 8, "BLOCK_T": 4, "BLOCK_H": 1024},
                    ["x_ptr", "out_ptr", "H", "stride_xt", "stride_ot"])
    assert "st.global.v4.b32" in ptx and "ld.global.v4.b32" in ptx  # 16-byte row accesses
    scatter = {"ids_ptr": "*i32", "rank_ptr": "*i32", "base_ptr": "*i32", "tokens_per_expert_ptr": "*i32", "offsets_ptr": "*i32", "dst_row_ptr": "*i32",
               "src_token_ptr": "*i32", "x_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*fp32", "row_w_ptr": "*fp32",
               "T": "i32", "H": "i32", "E": "i32", "NBUCKETS": "i32", "stride_xt": "i32", "stride_ot": "i32",
               "stride_wt": "i32", "stride_wk": "i32"}
    for copy in (False, True):
        compile90(K.permute_scatter_kernel, scatter, {"TOP_K": 8, "BLOCK_M": K.HIST_BLOCK_M, "BLOCK_T": 4,
                  "BLOCK_H": 1024, "COPY": copy, "HAS_W": True, "NUM_BINS": 128})
    print("ok")
    """
)


def test_kernels_compile_for_hopper():
    """The new kernels and the HAS_W scatter compile for sm_90 (fresh process, no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU tier: compiled kernels, one launch, CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(64, 8, 128), (1, 8, 256), (60, 8, 256), (100, 8, 256), (40, 4, 512), (33, 2, 8)])
def test_gpu_small_path_matches_reference(num_tokens, top_k, num_experts):
    ids, w = make_ids(num_tokens, top_k, num_experts, "sparse" if top_k <= num_experts // 3 else "uniform"), make_weights(num_tokens, top_k)
    ids[0, 0] = -1  # a dropped slot
    x = torch.randn(num_tokens, 2048, device="cuda", dtype=torch.bfloat16)
    want = reference(ids, num_experts, w)
    for small in (True, False):
        got, out = triton_permute(ids, num_experts, w, small=small)
        assert_equal_all(got, want)
        got, out = triton_permute(ids, num_experts, w, x, small=small)
        assert_equal_all(got, want)
        assert torch.equal(out, x[want[0].long()])


def _cuda_kernels_launched(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
def test_gpu_dispatch_one_launch_and_cuda_graph(monkeypatch):
    """Qwen3-30B decode step of 32 tokens (top-8 of 128, M = SMALL_M): dispatch is one kernel,
    captures, replays exactly."""
    monkeypatch.setenv("MOECOMM_BACKEND", "auto")
    t, h, k, e = 32, 2048, 8, 128
    d = LocalDispatcher(e, k, validate=False)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    ids, w = make_ids(t, k, e), make_weights(t, k)
    d.dispatch(x, ids, w)  # compile outside the capture
    kernels = _cuda_kernels_launched(lambda: d.dispatch(x, ids, w))
    assert len(kernels) == 1 and "permute_small_kernel" in kernels[0], kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = d.dispatch(x, ids, w)
    ids.copy_(make_ids(t, k, e, seed=5))
    w.copy_(make_weights(t, k, seed=6))
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_all((r.handle.src_token, r.handle.dst_row, r.tokens_per_expert, r.expert_offsets, r.row_weights),
                     reference(ids, e, w))
