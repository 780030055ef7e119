"""moecomm.MoE: the layer against reference_forward and an independent float64 loop.

# T = num_tokens, H = hidden, I = intermediate, E = num_experts, k = top_k, S = shared intermediate

Tolerances (|err| <= atol + rtol*|ref|, ref of magnitude ~1 by the 1/sqrt(fan_in) init):
  fp32 vs float64: two GEMMs of depth H and I, fp32 rounding grows ~sqrt(depth)*2^-24 -> 1e-5;
      we allow 1e-4 for the routing-weight products and the silu.
  bf16 (GPU tier) vs the fp32-accumulating reference: outputs and the [R, I] intermediate are
      rounded to bf16 (2^-8 = 3.9e-3 relative each) -> 3e-2 absolute on O(1) values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moecomm
from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.layer import MoE
from moecomm.routing import RoutingMethod

SOFT, SIG = RoutingMethod.SOFTMAX_TOPK, RoutingMethod.SIGMOID_GROUPED_TOPK
H, I, E = 64, 32, 8


def make(top_k=2, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(H, I, E, top_k, **kw)
    if moe.e_score_correction_bias is not None:
        moe.e_score_correction_bias.normal_(0, 0.1)
    return moe


def float64_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot, in float64: shares no code with MoE.reference_forward."""
    x2 = x.reshape(-1, moe.hidden_size).double()
    wg, wgu, wd = moe.gate.weight.double(), moe.w_gate_up.double(), moe.w_down.double()
    act = F.silu if moe.activation == "silu" else F.gelu
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        logits = x2[t] @ wg.T  # [E]
        if moe.routing == SOFT:
            p = torch.softmax(logits, 0)
            w, ids = torch.topk(p, moe.top_k)
            if moe.renormalize:
                w = w / w.sum()
        else:
            s = torch.sigmoid(logits)
            c = s + moe.e_score_correction_bias.double()
            per = moe.num_experts // moe.n_group
            gs = torch.stack([c[g * per:(g + 1) * per].topk(min(2, per))[0].sum() for g in range(moe.n_group)])
            keep = torch.topk(gs, moe.topk_group)[1].tolist()
            c = torch.tensor([c[e] if e // per in keep else -float("inf") for e in range(moe.num_experts)], dtype=torch.float64)
            ids = torch.topk(c, moe.top_k)[1]
            w = s[ids]
            if moe.renormalize:
                w = w / (w.sum() + 1e-20)
        w = w * moe.routed_scaling_factor
        for j in range(moe.top_k):
            e = int(ids[j])
            hg = wgu[e] @ x2[t]
            out[t] += w[j] * (wd[e] @ (act(hg[: moe.intermediate_size]) * hg[moe.intermediate_size:]))
        if moe.shared_experts is not None:
            se = moe.shared_experts
            s_out = se.down_proj.weight.double() @ (act(se.gate_proj.weight.double() @ x2[t]) * (se.up_proj.weight.double() @ x2[t]))
            if moe.shared_expert_gate is not None:
                s_out = torch.sigmoid(moe.shared_expert_gate.weight.double() @ x2[t]) * s_out
            out[t] += s_out
    return out.reshape(x.shape)


CONFIGS = {
    "softmax": dict(),
    "softmax_renorm_top1": dict(top_k=1, renormalize=True),
    "softmax_gelu_shared_gate": dict(renormalize=False, activation="gelu", shared_expert_intermediate_size=24, shared_expert_gate=True),
    "sigmoid_grouped": dict(top_k=3, routing=SIG, n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=2.5,
                            shared_expert_intermediate_size=16),
    "sigmoid_one_group": dict(top_k=2, routing=SIG),
    "all_experts": dict(top_k=E, renormalize=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(2, 7, H), (33, H), (1, H)], ids=["BSH", "T33", "T1"])
@torch.no_grad()
def test_forward_matches_reference_and_float64(name, shape):
    moe = make(**CONFIGS[name])
    x = torch.randn(shape)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, moe.reference_forward(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), float64_loop(moe, x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_zero_tokens():
    moe = make(shared_expert_intermediate_size=16)
    for shape in [(0, H), (2, 0, H)]:
        y = moe(torch.randn(shape))
        assert y.shape == shape


@torch.no_grad()
def test_skewed_routing_leaves_experts_empty():
    moe = make(top_k=2, renormalize=True)
    d = torch.randn(H)
    d = d / d.norm()
    x = d + 0.05 * torch.randn(199, H)  # every token close to one direction
    # the router prefers experts 3 and 5 for every token: the other six receive nothing
    moe.gate.weight.mul_(0.01)
    moe.gate.weight[3] = 8 * d
    moe.gate.weight[5] = 6 * d
    y = moe(x)
    torch.testing.assert_close(y, moe.reference_forward(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:5].double(), float64_loop(moe, x[:5]), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_non_contiguous_input():
    moe = make(shared_expert_intermediate_size=16)
    big = torch.randn(3, 11, 2 * H)
    x = big[:, :, ::2]  # stride 2 in the hidden dim
    assert not x.is_contiguous()
    torch.testing.assert_close(moe(x), moe(x.contiguous()), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["softmax", "sigmoid_grouped"])
@torch.no_grad()
def test_nan_in_one_token_stays_in_that_token(name):
    moe = make(**CONFIGS[name])
    x = torch.randn(33, H)
    clean = moe(x)
    x[17, 5] = float("nan")
    y = moe(x)
    assert torch.isnan(y[17]).all()
    others = torch.arange(33) != 17
    assert torch.isfinite(y[others]).all()
    # not bit-exact: the NaN token's experts change, so other rows land in differently sized groups
    torch.testing.assert_close(y[others], clean[others], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dlpack_numpy_input_is_not_copied():
    moe = make()
    arr = np.random.default_rng(0).standard_normal((9, H), dtype=np.float32)
    seen = {}
    orig = moe.dispatcher.dispatch_unchecked  # the forward's (trusted) dispatch

    def spy(x, ids, w):
        seen["ptr"] = x.data_ptr()
        return orig(x, ids, w)

    moe.dispatcher.dispatch_unchecked = spy
    y = moe(arr)
    assert seen["ptr"] == arr.ctypes.data  # the tokens reached dispatch without a copy
    torch.testing.assert_close(y, moe.reference_forward(torch.from_numpy(arr)), atol=1e-4, rtol=1e-4)


def test_parameters_and_buffers():
    moe = make(**CONFIGS["sigmoid_grouped"])
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes["gate.weight"] == (E, H)
    assert shapes["w_gate_up"] == (E, 2 * I, H) and shapes["w_down"] == (E, H, I)
    assert dict(moe.named_buffers())["e_score_correction_bias"].shape == (E,)
    assert moe.num_local_experts == E and moe.local_expert_ids == list(range(E))


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((H, I, E, 9), {}, MoeCommValueError, "top_k must be <= num_experts (8), got 9"),
        ((H, I, E, 0), {}, MoeCommValueError, "top_k must be >= 1, got 0"),
        ((0, I, E, 2), {}, MoeCommValueError, "hidden_size must be >= 1, got 0"),
        ((H, 2.0, E, 2), {}, MoeCommTypeError, "intermediate_size must be an int, got float"),
        ((H, I, E, 2), {"activation": "relu"}, MoeCommValueError, "activation must be one of"),
        ((H, I, E, 2), {"routing": "softmax"}, MoeCommTypeError, "routing must be a moecomm.RoutingMethod"),
        ((H, I, E, 2), {"routing": SIG, "n_group": 3}, MoeCommValueError, "n_group must divide num_experts (8), got 3"),
        ((H, I, E, 2), {"routing": SIG, "n_group": 2, "topk_group": 3}, MoeCommValueError, "topk_group must be <= n_group (2), got 3"),
        ((H, I, E, 5), {"routing": SIG, "n_group": 4, "topk_group": 2}, MoeCommValueError, "top_k must be <= topk_group"),
        ((H, I, E, 2), {"n_group": 2}, MoeCommValueError, "n_group and topk_group must be None"),
        ((H, I, E, 2), {"shared_expert_gate": True}, MoeCommValueError, "shared_expert_gate needs shared_expert_intermediate_size"),
        ((H, I, E, 2), {"shared_expert_intermediate_size": -1}, MoeCommValueError, "shared_expert_intermediate_size must be >= 0"),
        ((H, I, E, 2), {"routed_scaling_factor": float("nan")}, MoeCommValueError, "routed_scaling_factor must be a finite number"),
        ((H, I, E, 2), {"dtype": "bf16"}, MoeCommTypeError, "dtype must be a torch.dtype"),
        ((H, I, E, 2), {"placement": moecomm.ep.ExpertPlacement(4, 1)}, MoeCommValueError, "placement must cover num_experts=8"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, exc, words):
    with pytest.raises(exc, match="^MoE: ") as info:
        MoE(*args, **kwargs)
    assert words in str(info.value)


def test_bad_forward_input():
    moe = make()
    with pytest.raises(MoeCommValueError, match=r"MoE.forward: x must have shape \[..., 64\], got \[3, 32\]"):
        moe(torch.randn(3, 32))
    with pytest.raises(MoeCommTypeError, match="MoE.forward: x must have dtype float32 .*, got float16"):
        moe(torch.randn(3, H, dtype=torch.float16))
    with pytest.raises(MoeCommTypeError, match="MoE.forward: x must be a torch.Tensor or a DLPack"):
        moe([[0.0] * H])
    with pytest.raises(MoeCommValueError, match="MoE.forward: x must be on device cpu, got meta"):
        moe(torch.empty(3, H, device="meta"))


@torch.no_grad()
def test_torch_compile_fullgraph():
    moe = make(**CONFIGS["sigmoid_grouped"])
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(compiled(x), moe(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_triton_kernels_through_interpreter(triton_backend):
    """The whole layer on the Triton kernels (interpreted on CPU), fp32 and fp16, small odd shapes."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):  # fp16: 2^-11 per rounding, a few roundings
        torch.manual_seed(0)
        moe = MoE(32, 16, 4, 2, renormalize=True, shared_expert_intermediate_size=8, dtype=dtype)
        x = torch.randn(5, 32, dtype=dtype)
        torch.testing.assert_close(moe(x), moe.reference_forward(x), atol=tol, rtol=tol)


def _ep_rank(num_experts, top_k):
    import torch.distributed as dist

    torch.manual_seed(0)
    full = MoE(H, I, num_experts, top_k, renormalize=True, shared_expert_intermediate_size=16)  # same on every rank
    x = torch.randn(2 + dist.get_rank(), 5, H)  # ranks hold different numbers of tokens
    moe = MoE(H, I, num_experts, top_k, renormalize=True, shared_expert_intermediate_size=16, ep_group=dist.group.WORLD)
    moe.gate.weight.data.copy_(full.gate.weight)
    moe.shared_experts.load_state_dict(full.shared_experts.state_dict())
    moe.load_expert_weights(full.w_gate_up, full.w_down)
    with torch.no_grad():
        return moe.num_local_experts, (moe(x) - full.reference_forward(x)).abs().max().item()


def test_expert_parallel_two_ranks_matches_single_process():
    """The layer with ep_group: each rank holds its experts only; the output equals the one-process layer."""
    pytest.importorskip("moecomm.ep.nccl")
    from moecomm.testing import run_distributed

    results = run_distributed(2, _ep_rank, 7, 2)  # 7 experts on 2 ranks: 4 and 3
    assert [r[0] for r in results] == [4, 3]
    assert all(err < 1e-4 for _, err in results), results


def test_load_expert_weights_checks_shapes():
    moe = make()
    with pytest.raises(MoeCommValueError, match=r"MoE.load_expert_weights: w_gate_up must have shape \[8, 64, 64\], got \[8, 64, 32\]"):
        moe.load_expert_weights(torch.zeros(E, 2 * I, I), torch.zeros(E, H, I))


def test_demo_runs_checks_and_prints_a_table():
    from moecomm.apps.demo import run_demo

    lines: list[str] = []
    rows = run_demo(device="cpu", tokens=(0, 1, 7), hidden=64, intermediate=32, stream=lines.append)
    assert [r["tokens"] for r in rows] == [0, 1, 7]
    assert all(r["passed"] and r["ms"] > 0 for r in rows)
    assert any("PASS" in line for line in lines) and "all checks passed" in lines[-1]


# --------------------------------------------------------------------------- GPU tier
GPU_SHAPES = {  # name: (H, I, E, k, kwargs); one layer of the real models
    "mixtral_8x7b": (4096, 14336, 8, 2, dict(renormalize=True)),
    "qwen3_30b_a3b": (2048, 768, 128, 8, dict(renormalize=True)),
    # top-10 of 512 with a gated shared expert; sigmoid grouped routing with one group (GLM-4.5-Air,
    # MiniMax-M2: 256 experts)
    "qwen3_next_80b": (2048, 512, 512, 10, dict(renormalize=True, shared_expert_intermediate_size=512,
                                                shared_expert_gate=True)),
    "glm4_5_air": (4096, 1408, 128, 8, dict(routing=RoutingMethod.SIGMOID_GROUPED_TOPK, n_group=1, topk_group=1,
                                            renormalize=True, routed_scaling_factor=1.0,
                                            shared_expert_intermediate_size=1408)),
    "minimax_m2": (3072, 1536, 256, 8, dict(routing=RoutingMethod.SIGMOID_GROUPED_TOPK, n_group=1, topk_group=1,
                                            renormalize=True, routed_scaling_factor=1.0)),
}


def _gpu_moe(name):
    h, i, e, k, kw = GPU_SHAPES[name]
    torch.manual_seed(0)
    return MoE(h, i, e, k, dtype=torch.bfloat16, device="cuda", **kw).eval()


def _assert_close_most_tokens(y, ref, tol, max_bad_fraction=1e-3):
    # bf16 logits can put two experts within an ulp: the kernel and the reference may then pick
    # different experts for that token. Allow 0.1% of tokens to differ; the rest must match.
    err = (y.float() - ref.float()).abs() - tol * (1 + ref.float().abs())
    bad = (err > 0).any(dim=-1)
    assert bad.float().mean().item() <= max_bad_fraction, f"{int(bad.sum())} of {bad.numel()} tokens out of tolerance"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 33, 4096])
@torch.no_grad()
def test_gpu_bf16_model_shapes(name, num_tokens):
    moe = _gpu_moe(name)
    x = torch.randn(num_tokens, moe.hidden_size, device="cuda", dtype=torch.bfloat16)
    _assert_close_most_tokens(moe(x), moe.reference_forward(x), 3e-2)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cuda_graph_replay_equals_eager():
    moe = _gpu_moe("qwen3_30b_a3b")
    static_x = torch.randn(64, moe.hidden_size, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: kernels compiled and configurations picked outside capture
            moe(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = moe(static_x)
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.testing.assert_close(static_y, moe(static_x), atol=0, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("num_tokens", [16, 1024])  # the one-program sort, the multi-kernel one
def test_gpu_eager_forward_launches_directly(num_tokens):
    """After its first forward, every kernel of an eager forward goes through moecomm.jit.launch's
    direct path (no JITFunction.run), and the output still matches the reference."""
    from moecomm.jit import launch as _launch

    moe = _gpu_moe("qwen3_30b_a3b")
    moe.cuda_graph_tokens = 0  # every forward from Python
    x = torch.randn(num_tokens, moe.hidden_size, device="cuda", dtype=torch.bfloat16)
    moe(x)  # compiles, picks configurations, specialises
    before = {k: ln.direct_launches for k, ln in _launch._LAUNCHERS.items()}
    y = moe(x)
    grew = {ln.kernel.__name__ for k, ln in _launch._LAUNCHERS.items() if ln.direct_launches > before.get(k, 0)}
    want = {"route_softmax_topk_kernel", "grouped_mm_kernel", "combine_kernel"}
    want |= {"permute_small_kernel"} if num_tokens * moe.top_k <= 256 else {"permute_hist_kernel", "permute_scan_kernel",
                                                                              "permute_scatter_kernel"}
    assert want <= grew, (want, grew)
    _assert_close_most_tokens(y, moe.reference_forward(x), 3e-2)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_memory_is_routed_rows_plus_intermediates():
    moe = _gpu_moe("qwen3_30b_a3b")
    T, Hd, Id, k = 4096, moe.hidden_size, moe.intermediate_size, moe.top_k
    x = torch.randn(T, Hd, device="cuda", dtype=torch.bfloat16)
    moe(x)  # warm-up: kernels, workspaces allocated once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    moe(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    R, b = T * k, 2  # routed rows, bytes per bf16
    # one copy of the routed tokens, the [R, 2I] gate_up output, the [R, I] activation, the [R, H]
    # expert output, the [T, H] result, routing metadata; 25% slack for the allocator's rounding
    bound = 1.25 * (R * Hd * b + R * 3 * Id * b + R * Hd * b + T * Hd * b + R * 64) + (1 << 20)
    tek = T * moe.num_experts * Hd * b  # what a [T, E, H] tensor would cost: 2 GiB here
    assert extra <= bound < tek, f"forward allocated {extra / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"


def test_benchmark_quick_smoke(tmp_path):
    """bench_moe --quick runs on CPU and writes ours, ours' GEMMs and transformers' rows as JSON lines."""
    pytest.importorskip("transformers")
    import json

    from benchmarks import bench_moe

    out = tmp_path / "moe.jsonl"
    assert bench_moe.main(["--quick", "--shapes", "tiny_qwen3", "--tokens", "1,5", "--rep", "1", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {r["impl"] for r in recs}
    assert {"ours", "ours_gemms", "hf_eager", "summary"} <= impls
    assert all(r["median_ms"] > 0 for r in recs if r["impl"] == "ours")
