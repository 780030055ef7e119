"""permute_indices / permute / combine on one rank: references, Triton kernels, compile, edge cases, errors.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

Permute is data movement: checked bit for bit, with payloads whose value encodes the source token.
Combine is arithmetic: checked against a float64 ground truth with a tolerance per dtype:

  fp32: k <= 8 products summed in fp32 lose at most ~k * 2**-24 relative to the float64 sum, and
        the kernel may fuse multiply-add where the reference rounds twice: 1e-5 covers both.
  fp16: the fp32 sum is rounded once to fp16 (half an ulp, 2**-11 ~ 4.9e-4 relative); kernel and
        reference may land on either side of a rounding boundary: 2 ulps, 2e-3.
  bf16: same argument with 8 mantissa bits (ulp 2**-7 relative at worst): 2 ulps, 1.6e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moecomm.permute import PermuteIndices, permute, permute_indices
from moecomm.permute import unpermute
from moecomm.permute import reference as ref
from moecomm.errors import MoeCommTypeError, MoeCommValueError

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_ids(num_tokens, top_k, num_experts, mode="uniform", seed=0, device="cpu"):
    """[T, k] int32 routing without repeated experts per token. mode: uniform | skew | sparse."""
    g = torch.Generator().manual_seed(seed)
    if mode == "uniform":
        scores = torch.rand(num_tokens, num_experts, generator=g)
    elif mode == "skew":  # expert 0 first choice of every token, the rest piled on the next few
        scores = torch.rand(num_tokens, num_experts, generator=g) + torch.linspace(2.0, 0.0, num_experts)
    elif mode == "sparse":  # only every third expert receives tokens: many empty experts
        scores = torch.rand(num_tokens, num_experts, generator=g)
        scores[:, torch.arange(num_experts) % 3 != 0] -= 10.0
    else:
        raise ValueError(mode)
    return scores.topk(top_k, dim=1).indices.to(torch.int32).to(device)


def ground_truth_indices(topk_ids, num_experts):
    """Plain-Python construction of the expected order: sort slots by (expert, slot)."""
    t, k = topk_ids.shape
    ids = topk_ids.cpu().tolist()
    slots = sorted(((ids[s // k][s % k], s) for s in range(t * k)))
    src = [s // k for _, s in slots]
    dst = [0] * (t * k)
    for row, (_, s) in enumerate(slots):
        dst[s] = row
    counts = [0] * num_experts
    for e, _ in slots:
        counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return src, dst, counts, offsets


def token_payload(num_tokens, hidden, dtype, device):
    """x[t, h] encodes t (and h, where the dtype holds it exactly): a wrong row cannot pass."""
    t = torch.arange(num_tokens, device=device, dtype=torch.float64)[:, None]
    h = torch.arange(hidden, device=device, dtype=torch.float64)[None, :]
    exact = {torch.float32: 2**24, torch.float16: 2**11, torch.bfloat16: 2**8}[dtype]
    val = (t * hidden + h) % exact if num_tokens * hidden <= exact else (t % exact) + 0 * h
    return val.to(dtype)


def check_indices(idx: PermuteIndices, topk_ids, num_experts):
    src, dst, counts, offsets = ground_truth_indices(topk_ids, num_experts)
    t, k = topk_ids.shape
    assert idx.src_token.dtype == idx.dst_row.dtype == idx.tokens_per_expert.dtype == idx.expert_offsets.dtype == torch.int32
    assert idx.src_token.shape == (t * k,) and idx.dst_row.shape == (t, k)
    assert idx.tokens_per_expert.shape == (num_experts,) and idx.expert_offsets.shape == (num_experts + 1,)
    assert idx.src_token.cpu().tolist() == src
    assert idx.dst_row.reshape(-1).cpu().tolist() == dst
    assert idx.tokens_per_expert.cpu().tolist() == counts
    assert idx.expert_offsets.cpu().tolist() == offsets


# ---------------------------------------------------------------------------------------------
# permute: exact


SHAPES = [(0, 2, 4, 8), (1, 1, 1, 8), (1, 4, 8, 24), (33, 2, 8, 40), (199, 8, 64, 16), (130, 6, 256, 8)]


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden", SHAPES)
@pytest.mark.parametrize("mode", ["uniform", "skew", "sparse"])
def test_permute_indices_exact(backend, num_tokens, top_k, num_experts, hidden, mode):
    if mode == "sparse" and top_k > (num_experts + 2) // 3:
        mode = "skew"  # not enough non-empty experts for distinct picks
    ids = make_ids(num_tokens, top_k, num_experts, mode, device=backend)
    check_indices(permute_indices(ids, num_experts), ids, num_experts)
    check_indices(permute_indices(ids.long(), num_experts), ids, num_experts)


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # a copy: bf16 is exact even interpreted
def test_permute_rows_exact(backend, num_tokens, top_k, num_experts, hidden, dtype):
    x = token_payload(num_tokens, hidden, dtype, backend)
    ids = make_ids(num_tokens, top_k, num_experts, "skew", seed=1, device=backend)
    res = permute(x, ids, num_experts)
    check_indices(res.indices, ids, num_experts)
    assert res.permuted.dtype == dtype and res.permuted.shape == (num_tokens * top_k, hidden)
    assert torch.equal(res.permuted, x[res.indices.src_token.long()])


def test_permute_indices_many_blocks(backend):
    """M = 33600 slots: more blocks (263) than one trip of the scan kernel's loop (256); E + 1 = 64 buckets."""
    t, k, e = 4200, 8, 63
    ids = make_ids(t, k, e, "skew", seed=4, device=backend)
    idx = permute_indices(ids, e)
    want = ref.permute_indices_ref(ids, e)
    for got, w in zip((idx.src_token, idx.dst_row, idx.tokens_per_expert, idx.expert_offsets), want):
        assert torch.equal(got, w)


def test_reference_matches_ground_truth_large():
    ids = make_ids(1000, 4, 37, "skew", seed=5)
    check_indices(PermuteIndices(*ref.permute_indices_ref(ids, 37)), ids, 37)


def test_all_tokens_to_one_expert(backend):
    t, k, e = 199, 1, 16
    ids = torch.full((t, k), 5, dtype=torch.int32, device=backend)
    idx = permute_indices(ids, e)
    assert idx.src_token.cpu().tolist() == list(range(t))
    assert idx.tokens_per_expert.cpu().tolist() == [0] * 5 + [t] + [0] * 10
    assert idx.expert_offsets.cpu().tolist() == [0] * 6 + [t] * 11


@pytest.mark.parametrize("layout", ["row_stride", "column_stride"])
def test_permute_non_contiguous_x(backend, layout):
    t, h, k, e = 33, 24, 4, 8
    big = token_payload(t, 3 * h, torch.float32, backend)
    x = big[:, h : 2 * h] if layout == "row_stride" else big[:, ::3]
    assert not x.is_contiguous()
    ids = make_ids(t, k, e, device=backend)[:, :k]
    ids_nc = torch.cat([ids, ids], dim=1)[:, ::2]  # non-contiguous ids, same values
    res = permute(x, ids_nc, e)
    assert torch.equal(res.permuted, x[res.indices.src_token.long()])


def test_permute_out_nan_prefilled(backend):
    t, h, k, e = 199, 40, 4, 16
    x = token_payload(t, h, torch.float32, backend)
    ids = make_ids(t, k, e, "sparse", device=backend)
    out = torch.full((t * k, h), float("nan"), device=backend)
    res = permute(x, ids, e, out=out)
    assert res.permuted is out
    assert not torch.isnan(out).any()  # every row written
    assert torch.equal(out, x[res.indices.src_token.long()])


def test_permute_nan_token_stays_in_its_rows(backend):
    t, h, k, e = 33, 16, 4, 8
    x = torch.randn(t, h, device=backend)
    x[7, 3] = float("nan")
    ids = make_ids(t, k, e, device=backend)
    res = permute(x, ids, e)
    nan_rows = torch.isnan(res.permuted).any(dim=1)
    assert torch.equal(nan_rows, res.indices.src_token == 7)


def test_unvalidated_out_of_range_ids_stay_in_bounds(backend):
    """validate=False: bad ids never become addresses; their rows go after expert_offsets[E]."""
    t, k, e = 33, 4, 8
    ids = make_ids(t, k, e, device=backend)
    ids[3, 1] = 99
    ids[10, 0] = -1
    x = token_payload(t, 8, torch.float32, backend)
    res = permute(x, ids, e, validate=False)
    idx = res.indices
    assert sorted(idx.dst_row.reshape(-1).cpu().tolist()) == list(range(t * k))  # a bijection
    assert idx.expert_offsets[-1].item() == t * k - 2
    assert idx.tokens_per_expert.sum().item() == t * k - 2
    assert sorted(idx.dst_row[[3, 10], [1, 0]].cpu().tolist()) == [t * k - 2, t * k - 1]
    assert torch.equal(res.permuted, x[idx.src_token.long()])
    expected = ref.permute_indices_ref(ids, e)
    for got, want in zip((idx.src_token, idx.dst_row, idx.tokens_per_expert, idx.expert_offsets), expected):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# combine: float64 ground truth


def combine_truth(expert_out, dst_row, weights):
    rows = expert_out.double()[dst_row.long()]  # [T, k, H]
    w = torch.ones(dst_row.shape, dtype=torch.float64, device=rows.device) if weights is None else weights.double()
    return (w[..., None] * rows).sum(dim=1)


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_matches_float64(backend, num_tokens, top_k, num_experts, hidden, dtype, weighted):
    ids = make_ids(num_tokens, top_k, num_experts, "uniform", seed=2, device=backend)
    idx = permute_indices(ids, num_experts)
    g = torch.Generator().manual_seed(3)
    eo = torch.randn(num_tokens * top_k, hidden, generator=g).to(dtype).to(backend)
    w = torch.rand(num_tokens, top_k, generator=g).to(backend) if weighted else None
    y = unpermute(eo, idx, w)
    assert y.dtype == dtype and y.shape == (num_tokens, hidden)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), combine_truth(eo, idx.dst_row, w), rtol=tol, atol=tol)


def test_combine_integer_payload_exact(backend):
    """Small integers sum exactly in fp32: permute then combine with unit weights gives k * x."""
    t, h, k, e = 67, 24, 8, 64
    x = (torch.arange(t * h, device=backend) % 251).float().reshape(t, h)
    ids = make_ids(t, k, e, "skew", device=backend)
    p = permute(x, ids, e)
    assert torch.equal(unpermute(p.permuted, p.indices), k * x)
    w = torch.full((t, k), 0.5, device=backend)
    assert torch.equal(unpermute(p.permuted, p.indices, w), k * 0.5 * x)


def test_combine_out_nan_prefilled_and_nan_isolated(backend):
    t, h, k, e = 33, 40, 4, 8
    ids = make_ids(t, k, e, device=backend)
    idx = permute_indices(ids, e)
    eo = torch.randn(t * k, h, device=backend)
    eo[idx.dst_row[5, 2], 7] = float("nan")  # a NaN in one of token 5's rows
    w = torch.rand(t, k, device=backend)
    out = torch.full((t, h), float("nan"), device=backend)
    y = unpermute(eo, idx, w, out=out)
    assert y is out
    nan_tokens = torch.isnan(out).any(dim=1)
    assert nan_tokens.nonzero().flatten().tolist() == [5]


def test_combine_non_contiguous_expert_out(backend):
    t, h, k, e = 33, 16, 2, 4
    idx = permute_indices(make_ids(t, k, e, device=backend), e)
    big = torch.randn(t * k, 2 * h, device=backend)
    for eo in (big[:, :h], big[:, ::2]):
        w = torch.rand(k, t, device=backend).t()  # non-contiguous weights
        torch.testing.assert_close(unpermute(eo, idx, w).double(), combine_truth(eo, idx.dst_row, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens,hidden", [(64, 2048), (1, 4096), (5, 1000), (600, 300)])
def test_combine_decode_tiles(triton_backend, num_tokens, hidden):
    """Decode-sized combines split their tiles to fill the GPU (>= MIN_ROW_PROGRAMS programs where
    the shape allows), hidden sizes that are not a multiple of the tile included; same sums."""
    from moecomm.permute._triton import MIN_ROW_PROGRAMS, _row_tiles, _small_row_tiles

    bt, bh, warps = _small_row_tiles(num_tokens, hidden)
    programs = -(-num_tokens // bt) * -(-hidden // bh)
    assert programs >= MIN_ROW_PROGRAMS or (bt == 1 and bh <= 256) or (bt, bh) == _row_tiles(hidden)
    assert 1 <= warps <= 4 and bt * bh >= 32 * warps
    dev = triton_backend
    if dev == "cpu" and num_tokens * hidden > 60000:
        return  # the interpreter takes ~15 s for these; their sums run on the GPU (the tiles are checked above)
    k, e = 8, 128
    idx = permute_indices(make_ids(num_tokens, k, e, device=dev), e)
    eo = torch.randn(num_tokens * k, hidden, device=dev)
    w = torch.rand(num_tokens, k, device=dev)
    torch.testing.assert_close(unpermute(eo, idx, w), ref.combine_ref(eo, idx.dst_row, w), rtol=2e-6, atol=2e-6)


def test_kernel_matches_reference_fp32(triton_backend):
    """Same fixed summation order in kernel and reference: fp32 results agree to FMA rounding."""
    dev = triton_backend
    t, h, k, e = 65, 48, 8, 32
    ids = make_ids(t, k, e, device=dev)
    idx = permute_indices(ids, e)
    eo = torch.randn(t * k, h, device=dev)
    w = torch.rand(t, k, device=dev)
    torch.testing.assert_close(unpermute(eo, idx, w), ref.combine_ref(eo, idx.dst_row, w), rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# bad input: one test per error


def _good(device="cpu"):
    return torch.randn(4, 8, device=device), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32, device=device)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, ids: permute_indices(ids, 0), MoeCommValueError, "num_experts must be >= 1"),
        (lambda x, ids: permute_indices(ids, 4.0), MoeCommTypeError, "num_experts must be an int"),
        (lambda x, ids: permute_indices(ids.float(), 4), MoeCommTypeError, "topk_ids must have dtype int32 or int64"),
        (lambda x, ids: permute_indices(ids[0], 4), MoeCommValueError, "topk_ids must have 2 dimensions"),
        (lambda x, ids: permute_indices(ids, 1), MoeCommValueError, r"topk_ids must have 1 to num_experts=1 columns"),
        (lambda x, ids: permute_indices(ids + 2, 4), MoeCommValueError, r"topk_ids must be in \[0, num_experts=4\), got 4"),
        (lambda x, ids: permute_indices(ids - 1, 4), MoeCommValueError, r"topk_ids must be in \[0, num_experts=4\), got -1"),
        (lambda x, ids: permute_indices([[0, 1]], 4), MoeCommTypeError, "topk_ids must be a torch.Tensor"),
        (lambda x, ids: permute(x.long(), ids, 4), MoeCommTypeError, "x must have dtype float16 or bfloat16 or float32"),
        (lambda x, ids: permute(x[0], ids, 4), MoeCommValueError, "x must have 2 dimensions"),
        (lambda x, ids: permute(x[:3], ids, 4), MoeCommValueError, r"topk_ids must have shape \[3, top_k\]"),
        (lambda x, ids: permute(x, ids, 4, out=torch.empty(7, 8)), MoeCommValueError, r"out must have shape \[8, 8\]"),
        (lambda x, ids: permute(x, ids, 4, out=torch.empty(8, 8, dtype=torch.float16)), MoeCommTypeError, "out must have dtype float32"),
        (lambda x, ids: permute(x, ids, 4, out=torch.empty(8, 16)[:, ::2]), MoeCommValueError, "out must have contiguous rows"),
        (lambda x, ids: unpermute(torch.randn(7, 8), permute_indices(ids, 4)), MoeCommValueError, "expert_out must have T \\* k = 8 rows"),
        (lambda x, ids: unpermute(torch.randn(8, 8).long(), permute_indices(ids, 4)), MoeCommTypeError, "expert_out must have dtype"),
        (lambda x, ids: unpermute(torch.randn(8, 8), ids), MoeCommTypeError, "indices must be a PermuteIndices"),
        (lambda x, ids: unpermute(torch.randn(8, 8), permute_indices(ids, 4), torch.rand(4, 3)), MoeCommValueError, r"topk_weights must have shape \[4, 2\]"),
        (lambda x, ids: unpermute(torch.randn(8, 8), permute_indices(ids, 4), torch.rand(4, 2).double()), MoeCommTypeError, "topk_weights must have dtype float32"),
        (lambda x, ids: unpermute(torch.randn(8, 8), permute_indices(ids, 4), out=torch.empty(4, 9)), MoeCommValueError, r"out must have shape \[4, 8\]"),
    ],
)
def test_bad_input(call, exc, match):
    x, ids = _good()
    with pytest.raises(exc, match=match):
        call(x, ids)


def test_bad_device():
    if not torch.cuda.is_available():
        meta_ids = torch.zeros(4, 2, dtype=torch.int32, device="meta")
        with pytest.raises(MoeCommValueError, match="topk_ids must be on device cpu"):
            permute(torch.randn(4, 8), meta_ids, 4)
        return
    x, ids = _good("cuda")
    with pytest.raises(MoeCommValueError, match="topk_ids must be on device"):
        permute(x, ids.cpu(), 4)
    with pytest.raises(MoeCommValueError, match="expert_out must be on device"):
        unpermute(torch.randn(8, 8), permute_indices(ids, 4))


# ---------------------------------------------------------------------------------------------
# DLPack, torch.compile, opcheck, sm_90 compile


def test_numpy_arrays_accepted_without_copy(backend):
    if backend != "cpu":
        pytest.skip("numpy arrays live on the CPU")
    t, h, k, e = 33, 8, 2, 4
    x = np.arange(t * h, dtype=np.float32).reshape(t, h)
    ids = make_ids(t, k, e).numpy()
    out = np.full((t * k, h), np.nan, dtype=np.float32)
    res = permute(x, ids, e, out=out)
    assert np.shares_memory(res.permuted.numpy(), out)  # written in place: no copy on the way in
    np.testing.assert_array_equal(out, x[res.indices.src_token.numpy()])
    y = np.full((t, h), np.nan, dtype=np.float32)
    unpermute(out, res.indices, out=y)
    np.testing.assert_array_equal(y, k * x)


def test_torch_compile_fullgraph():
    """Fake implementations let dynamo trace through the ops with no graph break."""
    t, h, k, e = 33, 16, 4, 8
    x = torch.randn(t, h)
    ids = make_ids(t, k, e)
    w = torch.rand(t, k)

    def layer(x, ids, w):
        p = permute(x, ids, e)
        return unpermute(p.permuted * 2.0, p.indices, w), p.indices.expert_offsets

    # aot_eager runs dynamo and the fake-tensor trace (what fullgraph needs) without inductor's ~11 s compile.
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, ids, w)
    want = layer(x, ids, w)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_opcheck():
    """torch.library.opcheck: schema, fake-vs-real shapes, autograd registration consistency."""
    t, h, k, e = 9, 8, 2, 4
    x = torch.randn(t, h)
    ids = make_ids(t, k, e)
    idx = permute_indices(ids, e)
    torch.library.opcheck(torch.ops.moecomm.permute_indices.default, (ids, e))
    torch.library.opcheck(torch.ops.moecomm.permute.default, (x, ids, e))
    torch.library.opcheck(torch.ops.moecomm.permute_out.default, (x, ids, e, torch.empty(t * k, h)))
    eo = torch.randn(t * k, h)
    torch.library.opcheck(torch.ops.moecomm.unpermute.default, (eo, idx.dst_row, torch.rand(t, k)))
    torch.library.opcheck(torch.ops.moecomm.unpermute.default, (eo, idx.dst_row, None))
    torch.library.opcheck(torch.ops.moecomm.unpermute_out.default, (eo, idx.dst_row, None, torch.empty(t, h)))


_AOT_SCRIPT = textwrap.dedent(
    """
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from moecomm.permute import _triton as K

    def compile90(kernel, sig, consts, aligned):
        # Real launches specialise 16-divisible ints and 16-byte aligned pointers; mark the ones a
        # real call has, so the PTX shows the 16-byte vector accesses the GPU will run.
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4}).asm["ptx"]

    def ops(ptx):
        return sorted(set(re.findall(r"(?:ld|st)\\.global[.\\w]*", ptx)))

    ids = {"ids_ptr": "*i32"}
    for nbins in (2, 128, 512):
        ptx = compile90(K.permute_hist_kernel, {**ids, "hist_ptr": "*i32", "rank_ptr": "*i32", "M": "i32", "E": "i32",
                        "NBUCKETS": "i32", "BLOCK_M": "constexpr", "NUM_BINS": "constexpr"},
                        {"BLOCK_M": K.HIST_BLOCK_M, "NUM_BINS": nbins}, [])
        assert ".target sm_90" in ptx and "st.global" in ptx
    ptx = compile90(K.permute_scan_kernel, {"hist_ptr": "*i32", "base_ptr": "*i32", "tokens_per_expert_ptr": "*i32",
                    "NB": "i32", "NBUCKETS": "i32", "E": "i32", "BLOCK_B": "constexpr", "BLOCK_E": "constexpr"},
                    {"BLOCK_B": K.SCAN_BLOCK_B, "BLOCK_E": K.SCAN_BLOCK_E}, [])
    assert "st.global" in ptx
    for dtype, bt, bh in (("bf16", 4, 1024), ("fp16", 4, 1024), ("fp32", 64, 64)):
        sig = scatter_sig = {"ids_ptr": "*i64", "rank_ptr": "*i32", "base_ptr": "*i32", "tokens_per_expert_ptr": "*i32", "offsets_ptr": "*i32",
               "dst_row_ptr": "*i32", "src_token_ptr": "*i32", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "T": "i32", "H": "i32", "E": "i32",
               "NBUCKETS": "i32", "stride_xt": "i32", "stride_ot": "i32", "TOP_K": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_T": "constexpr", "BLOCK_H": "constexpr", "COPY": "constexpr", "NUM_BINS": "constexpr"}
        ptx = compile90(K.permute_scatter_kernel, sig, {"TOP_K": 8, "BLOCK_M": K.HIST_BLOCK_M, "BLOCK_T": bt,
                        "BLOCK_H": bh, "COPY": True, "NUM_BINS": 128}, ["x_ptr", "out_ptr", "H", "stride_xt", "stride_ot"])
        assert "st.global.v4.b32" in ops(ptx) and "ld.global.v4.b32" in ops(ptx), ops(ptx)
        sig = {"eo_ptr": f"*{dtype}", "dst_row_ptr": "*i32", "w_ptr": "*fp32", "y_ptr": f"*{dtype}", "T": "i32",
               "H": "i32", "stride_et": "i32", "stride_yt": "i32", "stride_wt": "i32", "stride_wk": "i32",
               "TOP_K": "constexpr", "HAS_WEIGHTS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"}
        for has_w in (True, False):
            ptx = compile90(K.combine_kernel, sig, {"TOP_K": 8, "HAS_WEIGHTS": has_w, "BLOCK_T": bt, "BLOCK_H": bh},
                            ["eo_ptr", "y_ptr", "H", "stride_et", "stride_yt"])
            assert "st.global.v4.b32" in ops(ptx) and "ld.global.v4.b32" in ops(ptx), ops(ptx)
        if dtype == "bf16":  # the index-only variant (permute_indices): no row copy
            ptx = compile90(K.permute_scatter_kernel, {**scatter_sig}, {"TOP_K": 8, "BLOCK_M": K.HIST_BLOCK_M,
                            "BLOCK_T": K.INDEX_BLOCK_T, "BLOCK_H": 16, "COPY": False, "NUM_BINS": 512}, [])
            assert "st.global" in ptx
    print("ok")
    """
)


def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90, and the row kernels use 16-byte vector loads and stores.

    Run in a fresh process without TRITON_INTERPRET: with it set, Triton's own jit helpers
    (tl.sum, tl.cumsum) are interpreted functions that the compiler cannot call.
    """
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_benchmark_quick_smoke(tmp_path, monkeypatch):
    """The benchmark's --quick mode runs (CI smoke test) and writes one JSON line per measurement."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import bench_permute

    out = tmp_path / "r.jsonl"
    assert bench_permute.main(["--quick", "--rep", "2", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2 * 3 * len(bench_permute.QUICK_SHAPES)  # (ours, torch) x 3 ops x shapes


def test_benchmark_host_pieces_run_interpreted(triton_backend, monkeypatch):
    """bench_permute --pieces launches each kernel of the permute by hand: its argument lists must
    follow the kernels' signatures (run here through the interpreter on a tiny shape)."""
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import bench_permute

    times = bench_permute.host_pieces(rep=1, T=9, H=16, k=2, E=4, device="cpu")
    assert {"permute_hist_kernel launch (Triton's run)", "permute_hist_kernel through moecomm.jit.launch (direct)",
            "permute_scatter_kernel launch (Triton's run)"} <= set(times)
    assert all(t > 0 for t in times.values())



# ---------------------------------------------------------------------------------------------
# GPU tier: realistic shapes in bf16, CUDA graphs


GPU_SHAPES = [(8192, 4096, 8, 64), (4096, 7168, 8, 256), (1, 4096, 8, 64), (199, 2048, 2, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,hidden,top_k,num_experts", GPU_SHAPES)
def test_gpu_matches_reference_bf16(num_tokens, hidden, top_k, num_experts, monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "auto")
    dev = "cuda"
    ids = make_ids(num_tokens, top_k, num_experts, "skew", device=dev)
    x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16)
    res = permute(x, ids, num_experts)
    want = ref.permute_indices_ref(ids, num_experts)
    for got, w in zip((res.indices.src_token, res.indices.dst_row, res.indices.tokens_per_expert, res.indices.expert_offsets), want):
        assert torch.equal(got, w)
    assert torch.equal(res.permuted, x[want[0].long()])
    eo = torch.randn(num_tokens * top_k, hidden, device=dev, dtype=torch.bfloat16)
    w = torch.rand(num_tokens, top_k, device=dev)
    y = unpermute(eo, res.indices, w)
    torch.testing.assert_close(y.double(), combine_truth(eo, res.indices.dst_row, w), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    assert torch.equal(unpermute(eo, res.indices, w), y)  # deterministic run to run


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "auto")
    t, h, k, e = 512, 1024, 8, 64
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    ids = make_ids(t, k, e, device="cuda")
    w = torch.rand(t, k, device="cuda")
    perm = torch.empty(t * k, h, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

    def step():
        p = permute(x, ids, e, out=perm)
        unpermute(perm, p.indices, w, out=y)

    step()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want = ref.combine_ref(x[ref.permute_indices_ref(ids, e)[0].long()], ref.permute_indices_ref(ids, e)[1], w)
    torch.testing.assert_close(y, want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
