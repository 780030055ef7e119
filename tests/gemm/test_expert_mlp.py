"""expert_mlp: fused gate_up (act(gate) * up in the epilogue) + down with row_scale.

Tolerances as in test_grouped_mm.py, relative Frobenius error vs float64; fp16 gets 3e-3 because
the intermediate [M, I] is rounded to fp16 once before the down GEMM (one more 2^-11 rounding).
"""

# Shape legend: M = rows, H = hidden, I = intermediate (per GLU half), E = experts, T = tokens.

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecomm.testing.payloads import offsets_from_sizes as offsets
from moecomm.testing.payloads import relative_error as rel_err
from moecomm.errors import MoeCommValueError
from moecomm.gemm import expert_mlp, expert_mlp_reference

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def tol(dtype, device):
    # fp32 on the GPU runs tl.dot as tf32 (10-bit mantissa): ~1e-3 relative, not fp32's 1e-6
    return 5e-3 if (dtype == torch.float32 and str(device).startswith("cuda")) else TOL[dtype]


def weights(E, H, I, layout, dtype, device="cpu"):
    gu = torch.randn(E, 2 * I, H, device=device) * H**-0.5   # HF gate_up_proj [E, 2I, H]
    dn = torch.randn(E, H, I, device=device) * I**-0.5       # HF down_proj [E, H, I]
    if layout == "ekn":
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    return gu.to(dtype), dn.to(dtype)


def truth(x, gu, dn, offs, layout, act, g=None, s=None):
    return expert_mlp_reference(x.double(), gu.double(), dn.double(), offs, layout=layout, activation=act,
                                gather_idx=g, row_scale=None if s is None else s.double())


def test_reference_matches_hf_mixtral_expert():
    """Our reference equals transformers' expert math: down(silu(gate) * up), gate rows first."""
    torch.manual_seed(0)
    E, H, I = 3, 16, 12
    gu, dn = weights(E, H, I, "enk", torch.float32)
    x = torch.randn(7, H)
    offs = offsets([3, 0, 4])
    y = expert_mlp(x, gu, dn, offs)
    for e, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 7)]):
        gate, up = torch.nn.functional.linear(x[lo:hi], gu[e]).chunk(2, dim=-1)
        want = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, dn[e])
        torch.testing.assert_close(y[lo:hi], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["enk", "ekn"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fused_mlp(triton_backend, layout, act, dtype):
    torch.manual_seed(1)
    dev = triton_backend
    E, H, I, T = 4, 32, 24, 9
    sizes = [5, 0, 9, 3]
    M = sum(sizes)
    gu, dn = weights(E, H, I, layout, dtype, dev)
    x = torch.randn(T, H, device=dev).to(dtype)
    g = torch.randint(0, T, (M,), dtype=torch.int32, device=dev)
    s = torch.rand(M, device=dev)
    offs = offsets(sizes, dev)
    out = torch.full((M, H), float("nan"), device=dev, dtype=dtype)
    y = expert_mlp(x, gu, dn, offs, layout=layout, activation=act, gather_idx=g, row_scale=s, out=out)
    assert y is out and not torch.isnan(y).any()
    ref = truth(x.cpu(), gu.cpu(), dn.cpu(), offs.cpu(), layout, act, g.cpu(), s.cpu())
    assert rel_err(y.cpu(), ref) < tol(dtype, dev)


def test_triton_odd_intermediate_and_zero_rows(triton_backend):
    dev = triton_backend
    torch.manual_seed(2)
    E, H, I = 2, 33, 19   # unaligned: pointer loads, masked GLU halves
    gu, dn = weights(E, H, I, "enk", torch.float32, dev)
    x = torch.randn(10, H, device=dev)
    offs = offsets([0, 10], dev)
    y = expert_mlp(x, gu, dn, offs)
    assert rel_err(y.cpu(), truth(x.cpu(), gu.cpu(), dn.cpu(), offs.cpu(), "enk", "silu")) < tol(torch.float32, dev)
    assert expert_mlp(x[:0], gu, dn, offsets([0, 0], dev)).shape == (0, H)


def test_numpy_input_and_compile():
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((5, 8)).astype(np.float32)
    gu, dn = weights(2, 8, 4, "enk", torch.float32)
    offs = offsets([2, 3])
    y = expert_mlp(x_np, gu, dn, offs)
    x_np[4] = 0.0  # shared memory, not a copy: row 4 of the next result is exactly 0
    assert torch.equal(expert_mlp(x_np, gu, dn, offs)[4], torch.zeros(8)) and not torch.equal(y[4], torch.zeros(8))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, gu, dn, offs):
        return expert_mlp(x, gu, dn, offs, activation="gelu") + 1

    x = torch.randn(5, 8)
    assert rel_err(f(x, gu, dn, offs) - 1, truth(x, gu, dn, offs, "enk", "gelu")) < 1e-5
    torch.library.opcheck(torch.ops.moecomm.expert_mlp.default, (x, gu, dn, offs, "enk", "silu", None, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kw,msg", [
    (dict(activation="relu"), "expert_mlp: activation must be one of"),
    (dict(w_down=torch.randn(2, 8, 5)), "expert_mlp: w_down must have shape [2, 8, 4]"),
    (dict(w_gate_up=torch.randn(2, 7, 8)), "expert_mlp: w_gate_up's output size 2*I must be even"),
    (dict(layout="kn"), "expert_mlp: layout must be one of"),
    (dict(out=torch.empty(5, 4)), "expert_mlp: out must have shape [5, 8]"),
])
def test_bad_inputs(kw, msg):
    gu, dn = weights(2, 8, 4, "enk", torch.float32)
    a = dict(x=torch.randn(5, 8), w_gate_up=gu, w_down=dn, expert_offsets=offsets([2, 3]))
    a.update(kw)
    with pytest.raises(MoeCommValueError) as info:
        expert_mlp(a.pop("x"), a.pop("w_gate_up"), a.pop("w_down"), a.pop("expert_offsets"), **a)
    assert msg in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("name,H,I,E,k,T", [
    ("mixtral", 4096, 14336, 8, 2, 512),
    ("qwen3", 2048, 768, 128, 8, 256),
    ("qwen3-decode", 2048, 768, 128, 8, 1),
])
def test_gpu_models_bf16(name, H, I, E, k, T):
    torch.manual_seed(3)
    dev = "cuda"
    M = T * k
    sizes = [M // E + (1 if e < M % E else 0) for e in range(E)]
    gu, dn = weights(E, H, I, "enk", torch.bfloat16, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    g = torch.arange(M, device=dev, dtype=torch.int32) % T
    s = torch.rand(M, device=dev)
    offs = offsets(sizes, dev)
    y = expert_mlp(x, gu, dn, offs, gather_idx=g, row_scale=s)
    ref = truth(x, gu, dn, offs, "enk", "silu", g, s)
    assert not torch.isnan(y).any() and rel_err(y, ref) < TOL[torch.bfloat16]
