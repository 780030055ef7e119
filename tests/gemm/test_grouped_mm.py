"""grouped_mm: reference vs float64, Triton kernel (interpreter on CPU, compiled on GPU), errors, compile.

Tolerances (relative Frobenius error ||out - ref|| / ||ref|| against a float64 ground truth):
- fp32 reference / interpreter: 1e-5 (fp32 rounding grows ~sqrt(K) * 2^-24 ~ 1e-6 for K <= 256);
- fp16 interpreter: 2e-3 (inputs are exact fp16 values; fp32 accumulation; one rounding of the
  output to fp16: 2^-11 ~ 5e-4 relative);
- bf16 on the GPU: 1e-2 (output rounding to bf16 is 2^-8 ~ 4e-3 relative per element, the error is
  ~ that on average; fp32 accumulation keeps the sum's own error ~sqrt(K) * 2^-24, negligible even
  at K = 7168).
"""

# Shape legend: M = rows, K = in features, N = out features, E = groups, T = rows before the gather.

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecomm.testing.payloads import offsets_from_sizes as offsets
from moecomm.testing.payloads import relative_error as rel_err
from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.gemm import grouped_mm, grouped_mm_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def tol(dtype, device):
    # fp32 on the GPU runs tl.dot as tf32 (10-bit mantissa): ~1e-3 relative, not fp32's 1e-6
    return 5e-3 if (dtype == torch.float32 and str(device).startswith("cuda")) else TOL[dtype]


def make_w(E, K, N, layout, dtype, device="cpu"):
    shape = (E, K, N) if layout == "ekn" else (E, N, K)
    return (torch.randn(shape, dtype=torch.float32, device=device) * K**-0.5).to(dtype)


def ground_truth(x, w, offs, layout, gather_idx=None, row_scale=None):
    return grouped_mm_reference(x.double(), w.double(), offs, layout=layout, gather_idx=gather_idx,
                                row_scale=None if row_scale is None else row_scale.double())


# --------------------------------------------------------------------------- reference

@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_reference_matches_float64(layout):
    torch.manual_seed(0)
    sizes = [5, 0, 33, 1]
    x = torch.randn(sum(sizes), 48)
    w = make_w(4, 48, 20, layout, torch.float32)
    offs = offsets(sizes)
    y = grouped_mm(x, w, offs, layout=layout)
    assert rel_err(y, ground_truth(x, w, offs, layout)) < TOL[torch.float32]
    # each group's rows really use that group's weight
    wk = w if layout == "ekn" else w.transpose(1, 2)
    torch.testing.assert_close(y[5:38], x[5:38] @ wk[2], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Triton kernel (interpreter)

CASES = [
    # (sizes per group, K, N)
    ([3, 0, 16, 1], 32, 48),   # empty group, 1-row group, aligned K/N (TMA path for weights)
    ([7, 26], 33, 199),        # odd K/N: pointer loads with masks
    ([40, 0, 0], 16, 32),      # all rows in one group, trailing empty groups
    ([1], 8, 8),               # a single row
]


@pytest.mark.parametrize("layout", ["ekn", "enk"])
@pytest.mark.parametrize("sizes,K,N", CASES)
def test_triton_kernel(triton_backend, layout, sizes, K, N):
    torch.manual_seed(1)
    dev = triton_backend
    dtype = torch.float32
    x = torch.randn(sum(sizes), K, device=dev).to(dtype)
    w = make_w(len(sizes), K, N, layout, dtype, dev)
    offs = offsets(sizes, dev)
    out = torch.full((sum(sizes), N), float("nan"), dtype=dtype, device=dev)  # unwritten rows fail
    y = grouped_mm(x, w, offs, layout=layout, out=out)
    assert y is out
    assert not torch.isnan(y).any()
    assert rel_err(y.cpu(), ground_truth(x.cpu(), w.cpu(), offs.cpu(), layout)) < tol(dtype, dev)


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_triton_gather_and_row_scale_fp16(triton_backend, layout):
    torch.manual_seed(2)
    dev = triton_backend
    T, K, N = 11, 32, 64
    sizes = [4, 0, 9, 2]
    M = sum(sizes)
    x = torch.randn(T, K, device=dev).half()
    gather = torch.randint(0, T, (M,), dtype=torch.int32, device=dev)
    scale = torch.rand(M, device=dev)
    w = make_w(4, K, N, layout, torch.float16, dev)
    offs = offsets(sizes, dev)
    y = grouped_mm(x, w, offs, layout=layout, gather_idx=gather, row_scale=scale)
    assert y.shape == (M, N) and y.dtype == torch.float16
    ref = ground_truth(x.cpu(), w.cpu(), offs.cpu(), layout, gather.cpu(), scale.cpu())
    assert rel_err(y.cpu(), ref) < tol(torch.float16, dev)


def test_triton_zero_rows_and_noncontiguous(triton_backend):
    dev = triton_backend
    w = make_w(3, 16, 8, "ekn", torch.float32, dev)
    y = grouped_mm(torch.randn(0, 16, device=dev), w, offsets([0, 0, 0], dev))
    assert y.shape == (0, 8)
    # non-contiguous x (a column slice) and w (a transposed view of an [E, N, K] tensor)
    torch.manual_seed(3)
    xb = torch.randn(10, 40, device=dev)
    x = xb[:, 4:20]
    w = make_w(3, 16, 8, "enk", torch.float32, dev).transpose(1, 2)  # [E, K, N] view, K contiguous
    offs = offsets([2, 3, 5], dev)
    y = grouped_mm(x, w, offs)
    assert rel_err(y.cpu(), ground_truth(x.cpu(), w.cpu(), offs.cpu(), "ekn")) < tol(torch.float32, dev)


def test_triton_nan_stays_in_its_row(triton_backend):
    dev = triton_backend
    torch.manual_seed(4)
    x = torch.randn(12, 16, device=dev)
    x[5, 3] = float("nan")
    w = make_w(2, 16, 32, "ekn", torch.float32, dev)
    y = grouped_mm(x, w, offsets([6, 6], dev))
    bad = torch.isnan(y).any(dim=1).cpu()
    assert bad.tolist() == [i == 5 for i in range(12)]


def test_triton_bad_offsets_without_validation_stay_in_bounds(triton_backend):
    """validate=False with decreasing offsets: wrong numbers are allowed, a crash is not."""
    dev = triton_backend
    x = torch.randn(8, 16, device=dev)
    w = make_w(2, 16, 16, "ekn", torch.float32, dev)
    grouped_mm(x, w, torch.tensor([0, 6, 3], dtype=torch.int32, device=dev), validate=False)
    g = torch.tensor([0, 99, -5, 1, 2, 3, 4, 5], dtype=torch.int32, device=dev)
    grouped_mm(x, w, offsets([4, 4], dev), gather_idx=g, validate=False)


# --------------------------------------------------------------------------- DLPack, compile

def test_numpy_input_accepted_without_copy():
    x_np = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    w_np = np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32)
    offs_np = np.array([0, 2, 6], dtype=np.int32)
    y = grouped_mm(x_np, w_np, offs_np)
    x_np[0, 0] = 1e6  # a copy would not see this: the op must have read the shared memory
    y2 = grouped_mm(x_np, w_np, offs_np)
    assert not torch.equal(y[0], y2[0]) and torch.equal(y[2:], y2[2:])
    ref = ground_truth(torch.from_numpy(x_np), torch.from_numpy(w_np), torch.from_numpy(offs_np), "ekn")
    assert rel_err(y2, ref) < TOL[torch.float32]


def test_torch_compile_fullgraph():
    torch.manual_seed(5)
    x = torch.randn(9, 16)
    w = make_w(3, 16, 8, "enk", torch.float32)
    offs = offsets([2, 0, 7])
    scale = torch.rand(9)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, w, offs, scale):
        return grouped_mm(x, w, offs, layout="enk", row_scale=scale) * 2

    y = f(x, w, offs, scale)
    assert rel_err(y / 2, ground_truth(x, w, offs, "enk", row_scale=scale)) < TOL[torch.float32]


def test_custom_op_opcheck():
    x = torch.randn(5, 8)
    w = torch.randn(2, 8, 4)
    offs = offsets([2, 3])
    torch.library.opcheck(torch.ops.moecomm.grouped_mm.default, (x, w, offs, "ekn", None, None),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- errors

def _args(**over):
    a = dict(x=torch.randn(6, 8), w=torch.randn(2, 8, 4), expert_offsets=offsets([2, 4]))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,msg", [
    (dict(layout="nk"), MoeCommValueError, "layout must be one of"),
    (dict(x=torch.randn(6, 7)), MoeCommValueError, "x.shape[1] must equal w's K"),
    (dict(x=torch.randn(6, 8, 1)), MoeCommValueError, "x must have 2 dimensions"),
    (dict(x=torch.randint(0, 3, (6, 8))), MoeCommTypeError, "x must have dtype"),
    (dict(w=torch.randn(2, 8, 4).double()), MoeCommTypeError, "w must have dtype float32"),
    (dict(expert_offsets=offsets([2, 4]).long()), MoeCommTypeError, "expert_offsets must have dtype int32"),
    (dict(expert_offsets=offsets([6])), MoeCommValueError, "expert_offsets must have shape [E+1]"),
    (dict(expert_offsets=torch.tensor([1, 2, 6], dtype=torch.int32)), MoeCommValueError, "expert_offsets[0] must be 0"),
    (dict(expert_offsets=torch.tensor([0, 4, 3], dtype=torch.int32)), MoeCommValueError, "non-decreasing"),
    (dict(expert_offsets=torch.tensor([0, 2, 5], dtype=torch.int32)), MoeCommValueError, "must equal the number of rows M=6"),
    (dict(gather_idx=torch.tensor([0, 1, 2, 3, 4, 6], dtype=torch.int32)), MoeCommValueError, "gather_idx values must be in [0, 6)"),
    (dict(gather_idx=torch.zeros(6, dtype=torch.int64)), MoeCommTypeError, "gather_idx must have dtype int32"),
    (dict(row_scale=torch.rand(5)), MoeCommValueError, "row_scale must have shape [6]"),
    (dict(row_scale=torch.rand(6).half()), MoeCommTypeError, "row_scale must have dtype float32"),
    (dict(out=torch.empty(6, 5)), MoeCommValueError, "out must have shape [6, 4]"),
    (dict(x="not a tensor"), MoeCommTypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs(over, exc, msg):
    a = _args(**over)
    with pytest.raises(exc, match=None) as info:
        grouped_mm(a.pop("x"), a.pop("w"), a.pop("expert_offsets"), **a)
    assert msg in str(info.value) and str(info.value).startswith("grouped_mm: ")


def test_validate_false_skips_device_data_checks():
    a = _args(expert_offsets=torch.tensor([0, 2, 5], dtype=torch.int32))
    grouped_mm(a["x"], a["w"], a["expert_offsets"], validate=False)  # no error raised


# --------------------------------------------------------------------------- GPU tier

GPU_SHAPES = [
    # (E, rows per group (None = balanced), M, K, N)
    (8, None, 8192, 4096, 3584),
    (32, None, 2048, 7168, 512),
    (64, None, 512, 2048, 1536),
    (32, None, 256, 7168, 4096),
    (16, "skewed", 3000, 1024, 768),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ekn", "enk"])
@pytest.mark.parametrize("E,dist,M,K,N", GPU_SHAPES)
def test_gpu_bf16_vs_reference(layout, E, dist, M, K, N):
    torch.manual_seed(6)
    if dist == "skewed":
        raw = [M // (e + 1) for e in range(E)]
        raw[3] = 0
        sizes = [r * M // sum(raw) for r in raw]
        sizes[0] += M - sum(sizes)
    else:
        sizes = [M // E] * E
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = make_w(E, K, N, layout, torch.bfloat16, dev)
    offs = offsets(sizes, dev)
    scale = torch.rand(M, device=dev)
    out = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
    y = grouped_mm(x, w, offs, layout=layout, row_scale=scale, out=out)
    ref = grouped_mm_reference(x.double(), w.double(), offs, layout=layout, row_scale=scale.double())
    assert not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_gather_and_cuda_graph():
    torch.manual_seed(7)
    dev = "cuda"
    T, K, N, E = 300, 512, 1024, 8
    M = 600
    x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
    g = torch.randint(0, T, (M,), device=dev, dtype=torch.int32)
    w = make_w(E, K, N, "enk", torch.bfloat16, dev)
    offs = offsets([100, 0, 200, 50, 50, 100, 0, 100], dev)
    y0 = grouped_mm(x, w, offs, layout="enk", gather_idx=g)  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_mm(x, w, offs, layout="enk", gather_idx=g)
    graph.replay()
    torch.cuda.synchronize()
    ref = grouped_mm_reference(x.double(), w.double(), offs, layout="enk", gather_idx=g)
    assert rel_err(y, ref) < TOL[torch.bfloat16] and rel_err(y0, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_every_tuning_candidate_is_correct(triton_backend, layout):
    """Each launch config the tuner may pick (decode and prefill regimes) computes the same function.

    Small shape with rows that straddle tile edges (20 + 0 + 17 rows; K 264 and N 280 not multiples
    of the tiles), fp16, TMA active where a config asks for it (every stride is 16-byte aligned).
    """
    from moecomm.gemm import _configs
    from moecomm.gemm.api import launch

    dev = triton_backend
    torch.manual_seed(8)
    cands = {
        *_configs.candidates(512, 1536, 2048, 64, glu=False),  # decode, 8 rows per expert
        *_configs.candidates(128, 28672, 4096, 8, glu=False),  # decode, 16 rows per expert: 32/64-row tiles too
        *_configs.candidates(8192, 28672, 4096, 8, glu=False),  # prefill
    }
    sizes, K, N = [20, 0, 17], 264, 280
    x = torch.randn(sum(sizes), K, device=dev).half()
    w = make_w(3, K, N, layout, torch.float16, dev)
    offs = offsets(sizes, dev)
    ref = ground_truth(x.cpu(), w.cpu(), offs.cpu(), layout)
    for cfg in sorted(cands, key=str):
        out = torch.full((sum(sizes), N), float("nan"), dtype=torch.float16, device=dev)
        launch(x, w, offs, out, layout=layout, config=cfg)
        assert rel_err(out.cpu(), ref) < TOL[torch.float16], cfg


def test_every_decode_candidate_is_correct_with_glu_and_gather(triton_backend):
    """The decode tiles (16, 32 and 64 rows) in the fused gate_up form the MoE layer launches:
    rows gathered, SiLU(gate) * up in the epilogue; experts of 20, 0 and 17 rows straddle the tiles."""
    from moecomm.gemm import _configs, _triton, expert_mlp_reference
    from moecomm.gemm.api import launch

    dev = triton_backend
    torch.manual_seed(9)
    cands = {*_configs.candidates(512, 1536, 2048, 64, glu=True), *_configs.candidates(128, 28672, 4096, 8, glu=True)}
    assert {c.block_m for c in cands} == {16, 32, 64}
    sizes, K, I, T = [20, 0, 17], 72, 40, 11
    M = sum(sizes)
    x = torch.randn(T, K, device=dev).half()
    gather = torch.randint(0, T, (M,), dtype=torch.int32, device=dev)
    w_gu = (torch.randn(3, 2 * I, K, device=dev) * K**-0.5).half()  # [E, 2I, K]: layout "enk"
    eye = torch.eye(I, device=dev).half().expand(3, I, I).contiguous()  # down = identity: the reference's inter
    offs = offsets(sizes, dev)
    ref = expert_mlp_reference(x.float(), w_gu.float(), eye.float(), offs, layout="enk", gather_idx=gather)
    for cfg in sorted(cands, key=str):
        inter = torch.full((M, I), float("nan"), dtype=torch.float16, device=dev)
        launch(x, w_gu, offs, inter, layout="enk", gather_idx=gather, glu=True, act=_triton.ACT_SILU, config=cfg)
        assert rel_err(inter.float().cpu(), ref.cpu()) < 5e-3, cfg


@pytest.mark.parametrize("glu", [False, True])
def test_tma_store_and_flatten_epilogues(triton_backend, glu):
    """The TMA-store epilogue (full tiles through TMA, a group's partial last tile masked) and the
    flattened tile loop: experts of 32, 0, 20, 16 and 7 rows give full tiles followed by partial ones
    and by the next group's rows, which the store must leave alone; NaN-filled outputs show any row
    written wrong or not at all. With row scale and gather (the MoE layer's launches)."""
    import dataclasses

    from moecomm.gemm import _configs, _triton, expert_mlp_reference
    from moecomm.gemm.api import launch

    dev = triton_backend
    torch.manual_seed(10)
    sizes, K, N, T = [32, 0, 20, 16, 7], 48, 40, 13
    M, E = sum(sizes), len(sizes)
    offs = offsets(sizes, dev)
    base = _configs.interpreter_config()
    cfgs = [dataclasses.replace(base, tma_store=True), dataclasses.replace(base, flatten=True)]
    x = torch.randn(T, K, device=dev).half()
    gather = torch.randint(0, T, (M,), dtype=torch.int32, device=dev)
    scale = torch.rand(M, device=dev)
    if glu:
        w = (torch.randn(E, 2 * N, K, device=dev) * K**-0.5).half()  # [E, 2N, K]
        eye = torch.eye(N, device=dev).half().expand(E, N, N).contiguous()
        ref = expert_mlp_reference(x.float(), w.float(), eye.float(), offs, layout="enk", gather_idx=gather)
        ref = ref * scale[:, None]
    else:
        w = make_w(E, K, N, "enk", torch.float16, dev)
        ref = ground_truth(x.float().cpu(), w.float().cpu(), offs.cpu(), "enk", gather.cpu(), scale.cpu())
    for cfg in cfgs:
        for g in (gather, None):
            xin = x if g is not None else x[gather.long()].contiguous()
            out = torch.full((M, N), float("nan"), dtype=torch.float16, device=dev)
            launch(xin, w, offs, out, layout="enk", gather_idx=g, row_scale=scale, glu=glu,
                   act=_triton.ACT_SILU if glu else 0, config=cfg)
            assert not out.isnan().any(), cfg
            assert rel_err(out.float().cpu(), ref.float().cpu()) < 5e-3, (cfg, g is None)
