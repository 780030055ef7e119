"""moecomm.routing.route: reference vs float64 truth and vs the transformers routers; the Triton
kernels (interpreter on CPU, compiled on GPU) vs the reference; ties; NaN; compile; bad input.

# T = num_tokens, E = num_experts, k = top_k, G = n_group

Tolerances. Weights are fp32 whatever the logits' dtype (logits are upcast before any arithmetic,
so the input dtype adds no error). A softmax or sigmoid in fp32 is accurate to a few ulp (~1e-7
relative); the renormalising sum over k <= 8 terms and the division add a few more: 1e-6 absolute
(weights are <= routed_scaling_factor) covers that with margin and would still catch any wrong
operation order (e.g. softmax over the top-k logits instead of the full row differs at ~1e-3 in fp32
for random logits only when renormalize=False, and by more elsewhere). Ids are compared exactly:
random normal logits hold no near-ties at these sizes with these seeds.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.routing import Routing, RoutingMethod, route
from moecomm.routing import reference as ref

GROUPED = RoutingMethod.SIGMOID_GROUPED_TOPK
ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# float64 ground truth, written independently of reference.py (argsort of -scores, stable)


def _truth_softmax(logits, k, renormalize, scale=1.0):
    p = torch.softmax(logits.double(), dim=-1)
    ids = torch.argsort(-p, dim=-1, stable=True)[:, :k]
    w = p.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids, w * scale


def _truth_grouped(logits, bias, k, n_group, topk_group, renormalize, scale):
    t, e = logits.shape
    s = torch.sigmoid(logits.double())
    c = s + (bias.double() if bias is not None else 0.0)
    per_group = c.view(t, n_group, e // n_group)
    gsc = per_group.sort(-1, descending=True)[0][..., :2].sum(-1)
    keep = torch.argsort(-gsc, dim=-1, stable=True)[:, :topk_group]
    allowed = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, keep, True)
    allowed = allowed[:, :, None].expand(-1, -1, e // n_group).reshape(t, e)
    ids = torch.argsort(-c.masked_fill(~allowed, float("-inf")), dim=-1, stable=True)[:, :k]
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * scale


def _grouped_kwargs(n_group, topk_group, bias, renormalize=True, scale=2.5):
    return dict(method=GROUPED, n_group=n_group, topk_group=topk_group, e_score_correction_bias=bias,
                renormalize=renormalize, routed_scaling_factor=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (128, 8), (512, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_softmax_matches_float64(dtype, num_experts, top_k, renormalize):
    torch.manual_seed(num_experts + top_k)
    logits = (torch.randn(199, num_experts) * 2).to(dtype)
    r = route(logits, top_k, renormalize=renormalize, routed_scaling_factor=1.5)
    ids, w = _truth_softmax(logits, top_k, renormalize, 1.5)  # truth on the same (rounded) logits
    assert r.topk_ids.dtype == torch.int32 and r.topk_weights.dtype == torch.float32
    assert torch.equal(r.topk_ids.long(), ids)
    torch.testing.assert_close(r.topk_weights.double(), w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_experts,n_group,topk_group,top_k", [(256, 8, 4, 8), (64, 8, 4, 6), (60, 4, 2, 4), (16, 16, 4, 3), (8, 1, 1, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_grouped_matches_float64(num_experts, n_group, topk_group, top_k, with_bias):
    torch.manual_seed(num_experts * 7 + top_k)
    logits = torch.randn(199, num_experts)
    bias = torch.randn(num_experts) * 0.1 if with_bias else None
    r = route(logits, top_k, **_grouped_kwargs(n_group, topk_group, bias))
    ids, w = _truth_grouped(logits, bias, top_k, n_group, topk_group, True, 2.5)
    assert torch.equal(r.topk_ids.long(), ids)
    torch.testing.assert_close(r.topk_weights.double(), w, atol=ATOL * 2.5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the transformers routers themselves (transformers 5.17, small random configs)


def _init_router(router, num_experts, hidden):
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(num_experts, hidden))
    return router


def test_matches_mixtral_router():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    router = _init_router(MixtralTopKRouter(cfg), 8, 32)
    logits, scores, idx = router(torch.randn(2, 33, 32))
    r = route(logits, 2, renormalize=True)
    assert torch.equal(r.topk_ids.long(), idx)
    torch.testing.assert_close(r.topk_weights, scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_matches_qwen_routers(family, norm_topk_prob):
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig as Config
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as Router
    else:
        from transformers import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router
    cfg = Config(hidden_size=32, num_experts=60, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    router = _init_router(Router(cfg), 60, 32)
    logits, scores, idx = router(torch.randn(65, 32))
    r = route(logits, 4, renormalize=norm_topk_prob)
    assert torch.equal(r.topk_ids.long(), idx)
    torch.testing.assert_close(r.topk_weights, scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_experts,n_group,topk_group,top_k,norm", [(256, 8, 4, 8, True), (64, 8, 3, 6, False)])
def test_matches_deepseek_v3_router(num_experts, n_group, topk_group, top_k, norm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    router = _init_router(DeepseekV3TopkRouter(cfg), num_experts, 32)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.1)
    logits, weights, idx = router(torch.randn(97, 32))
    r = route(logits, top_k, **_grouped_kwargs(n_group, topk_group, router.e_score_correction_bias, norm, 2.5))
    # transformers takes topk(sorted=False): compare as sets, weights aligned by expert id
    ours_ids, ours_order = r.topk_ids.long().sort(-1)
    theirs_ids, theirs_order = idx.sort(-1)
    assert torch.equal(ours_ids, theirs_ids)
    torch.testing.assert_close(r.topk_weights.gather(1, ours_order), weights.gather(1, theirs_order), atol=ATOL * 2.5, rtol=0)


# ---------------------------------------------------------------------------------------------
# ties: torch.topk has no tie rule; ours is "lowest expert index first"


def _tied_logits(num_tokens, num_experts, levels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (num_tokens, num_experts), generator=g).float()  # many exact ties


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (64, 8), (256, 8)])
def test_ties_go_to_lowest_index_with_torch_topk_values(backend, num_experts, top_k, request):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    logits = _tied_logits(33, num_experts)
    r = route(logits, top_k)
    probs = torch.softmax(logits, -1)
    # the rule: a stable descending sort
    assert torch.equal(r.topk_ids.long(), torch.sort(probs, dim=-1, descending=True, stable=True)[1][:, :top_k])
    # the values are torch.topk's (exactly for the reference, whose softmax is torch's; to an ulp or
    # two for the kernel's own exp); only which of several equal experts is taken differs
    topk_values = torch.topk(probs, top_k, dim=-1)[0]
    if backend == "reference":
        assert torch.equal(r.topk_weights, topk_values)
    torch.testing.assert_close(r.topk_weights, topk_values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grouped_ties_go_to_lowest_index(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    logits = _tied_logits(33, 64, levels=2, seed=1)
    r = route(logits, 6, **_grouped_kwargs(8, 3, None, renormalize=False, scale=1.0))
    ids, w = _truth_grouped(logits, None, 6, 8, 3, False, 1.0)
    assert torch.equal(r.topk_ids.long(), ids)
    torch.testing.assert_close(r.topk_weights.double(), w, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# the Triton kernels through the interpreter, against the reference


def _reference(logits, top_k, **kw):
    if kw.get("method") is GROUPED:
        return ref.route_grouped_topk(logits, kw["e_score_correction_bias"], top_k, kw["n_group"], kw["topk_group"],
                                      kw["renormalize"], kw["routed_scaling_factor"])
    return ref.route_softmax_topk(logits, top_k, kw.get("renormalize", False), kw.get("routed_scaling_factor", 1.0))


def _assert_same(r, expected):
    ids, w = expected
    assert torch.equal(r.topk_ids, ids)
    torch.testing.assert_close(r.topk_weights, w, atol=ATOL, rtol=0)


KERNEL_CASES = [
    # (num_experts, top_k, kwargs)
    (8, 2, dict(renormalize=True)),
    (60, 4, dict(renormalize=False)),
    (64, 6, dict(renormalize=True, routed_scaling_factor=2.0)),
    (128, 8, dict(renormalize=False)),
    (256, 8, dict(renormalize=True)),
    (256, 8, dict(method=GROUPED, n_group=8, topk_group=4, renormalize=True, routed_scaling_factor=2.5)),
    (64, 6, dict(method=GROUPED, n_group=8, topk_group=3, renormalize=False, routed_scaling_factor=1.0)),
    (60, 4, dict(method=GROUPED, n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=1.0)),
    (16, 3, dict(method=GROUPED, n_group=16, topk_group=4, renormalize=True, routed_scaling_factor=1.0)),
    (8, 2, dict(method=GROUPED, n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0)),
    # one group of every expert: GLM-4.5 (128 experts, top-8) and MiniMax-M2 (256, top-8; sigmoid + bias top-k)
    (128, 8, dict(method=GROUPED, n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=2.5)),
    (256, 8, dict(method=GROUPED, n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0)),
    (512, 8, dict(renormalize=True)),
    (512, 8, dict(method=GROUPED, n_group=16, topk_group=4, renormalize=True, routed_scaling_factor=1.0)),
]


@pytest.mark.parametrize("num_tokens", [0, 1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_experts,top_k,kw", KERNEL_CASES)
def test_kernel_matches_reference(triton_backend, num_tokens, dtype, num_experts, top_k, kw):
    torch.manual_seed(num_tokens * 1000 + num_experts + top_k)
    logits = (torch.randn(num_tokens, num_experts) * 2).to(dtype)
    kw = dict(kw)
    if kw.get("method") is GROUPED:
        kw["e_score_correction_bias"] = torch.randn(num_experts) * 0.1
    r = route(logits, top_k, **kw)
    assert r.topk_ids.shape == (num_tokens, top_k)
    _assert_same(r, _reference(logits, top_k, **kw))


@pytest.mark.parametrize("grouped", [False, True])
def test_kernel_non_contiguous_and_skewed(triton_backend, grouped):
    torch.manual_seed(3)
    base = torch.randn(64, 2 * 199)
    logits = base.t()[::2]  # [199, 64], strides (1, 398)
    logits[:150, 5] += 6.0  # skewed: most tokens pick expert 5
    logits[:, 40:48] = -30.0  # experts that no token picks
    assert not logits.is_contiguous()
    kw = _grouped_kwargs(8, 4, torch.randn(64) * 0.1) if grouped else dict(renormalize=True)
    r = route(logits, 8, **kw)
    _assert_same(r, _reference(logits.contiguous(), 8, **kw))
    assert (r.topk_ids == 5).sum() >= 150


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bias_is_upcast(triton_backend, bias_dtype):
    """A model loaded in bf16 holds a bf16 bias; transformers adds it to fp32 scores (fp32 result)."""
    torch.manual_seed(11)
    logits, bias = torch.randn(33, 64), (torch.randn(64) * 0.1).to(bias_dtype)
    kw = _grouped_kwargs(8, 4, bias)
    r = route(logits, 8, **kw)
    _assert_same(r, _reference(logits, 8, **kw))
    ids, w = _truth_grouped(logits, bias.float(), 8, 8, 4, True, 2.5)
    assert torch.equal(r.topk_ids.long(), ids)


def test_kernel_writes_every_output_row(triton_backend, monkeypatch):
    """Outputs pre-filled with NaN / -1: a row the kernel forgets to write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    from moecomm.routing import _triton

    monkeypatch.setattr(_triton.torch, "empty", nan_empty)
    for kw in (dict(renormalize=True), _grouped_kwargs(4, 2, None)):
        logits = torch.randn(199, 32)
        r = route(logits, 4, **kw)
        assert torch.isfinite(r.topk_weights).all() and (r.topk_ids >= 0).all()
        _assert_same(r, _reference(logits, 4, **kw))


# ---------------------------------------------------------------------------------------------
# NaN: a token with NaN logits gets distinct in-range ids; other tokens are untouched


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("grouped", [False, True])
def test_nan_row_affects_only_its_row(backend, grouped, request):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    torch.manual_seed(5)
    num_experts, top_k = 64, 8
    clean = torch.randn(33, num_experts)
    dirty = clean.clone()
    dirty[3] = float("nan")  # whole row
    dirty[7, 11] = float("nan")  # one score
    kw = _grouped_kwargs(8, 4, torch.randn(num_experts) * 0.1) if grouped else dict(renormalize=True)
    a, b = route(clean, top_k, **kw), route(dirty, top_k, **kw)
    others = [i for i in range(33) if i not in (3, 7)]
    assert torch.equal(a.topk_ids[others], b.topk_ids[others])
    assert torch.equal(a.topk_weights[others], b.topk_weights[others])
    for row in (3, 7):
        ids = b.topk_ids[row]
        assert ((ids >= 0) & (ids < num_experts)).all() and ids.unique().numel() == top_k
    assert torch.isnan(b.topk_weights[3]).all()
    if not grouped:  # one NaN logit poisons the softmax's max and sum: the whole row is NaN
        assert torch.isnan(b.topk_weights[7]).all()


# ---------------------------------------------------------------------------------------------
# sm_90 compile, torch.compile, DLPack


def _compile_all_for_hopper() -> int:
    """Compile every routing kernel variant for sm_90; returns how many. Run without TRITON_INTERPRET."""
    from moecomm.routing import _triton
    from moecomm.testing import compile_for_hopper

    count = 0
    scalars = {"stride_lt": "i32", "stride_le": "i32", "stride_it": "i32", "stride_wt": "i32", "routed_scaling_factor": "fp32"}
    for dtype in ("bf16", "fp16", "fp32"):
        for num_experts, top_k in ((8, 2), (60, 4), (128, 8), (512, 8)):
            sig = {"logits_ptr": f"*{dtype}", "ids_ptr": "*i32", "weights_ptr": "*fp32", "num_tokens": "i32",
                   "num_experts": "i32", **scalars, "TOP_K": "constexpr", "RENORMALIZE": "constexpr",
                   "BLOCK_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"}
            consts = {"TOP_K": top_k, "RENORMALIZE": True, **_triton.softmax_topk_launch_config(num_experts, top_k)}
            ptx = compile_for_hopper(_triton.route_softmax_topk_kernel, sig, consts, num_warps=4).asm["ptx"]
            assert ".target sm_90" in ptx and "st.global" in ptx
            count += 1
    for num_experts, n_group, topk_group, top_k, has_bias in ((256, 8, 4, 8, True), (60, 4, 2, 4, True), (16, 16, 4, 3, False)):
        sig = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "ids_ptr": "*i32", "weights_ptr": "*fp32", "num_tokens": "i32",
               "stride_lt": "i32", "stride_le": "i32", "stride_b": "i32", "stride_it": "i32", "stride_wt": "i32",
               "routed_scaling_factor": "fp32", "renorm_eps": "fp32"}
        sig.update({name: "constexpr" for name in ("NUM_GROUPS", "GROUP_SIZE", "TOP_K", "TOPK_GROUP", "HAS_BIAS",
                                                   "RENORMALIZE", "BLOCK_T", "BLOCK_G", "BLOCK_S", "BLOCK_K")})
        consts = {"NUM_GROUPS": n_group, "GROUP_SIZE": num_experts // n_group, "TOP_K": top_k, "TOPK_GROUP": topk_group,
                  "HAS_BIAS": has_bias, "RENORMALIZE": True,
                  **_triton.grouped_topk_launch_config(num_experts, n_group, top_k)}
        ptx = compile_for_hopper(_triton.route_grouped_topk_kernel, sig, consts, num_warps=4).asm["ptx"]
        assert ".target sm_90" in ptx and "st.global" in ptx
        count += 1
    return count


def test_kernels_compile_for_hopper():
    """In a fresh process without TRITON_INTERPRET: with it set, triton.language's own @jit helpers
    (tl.max, tl.sum, ...) are interpreter functions and a cold-cache compile fails inside them."""
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_all_for_hopper") == "15"


def test_torch_compile_fullgraph():
    bias = torch.randn(64) * 0.1

    def both(x):
        a = route(x, 2, renormalize=True)
        b = route(x, 8, **_grouped_kwargs(8, 4, bias))
        return a.topk_ids, a.topk_weights * 2, b.topk_ids, b.topk_weights

    x = torch.randn(17, 64)
    compiled = torch.compile(both, fullgraph=True)
    for got, want in zip(compiled(x), both(x)):
        assert torch.equal(got, want)


def test_numpy_input_is_taken_without_copy(monkeypatch):
    arr = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    seen = {}
    real = ref.route_softmax_topk

    def spy(logits, *args):
        seen["ptr"] = logits.data_ptr()
        return real(logits, *args)

    monkeypatch.setattr(ref, "route_softmax_topk", spy)
    r = route(arr, 3, renormalize=True)
    assert seen["ptr"] == arr.__array_interface__["data"][0]
    _assert_same(r, real(torch.from_numpy(arr), 3, True))
    assert isinstance(r, Routing)


# ---------------------------------------------------------------------------------------------
# bad input: one test per error, each message names the argument


BAD = [
    (lambda: route(torch.randn(4, 8), 9), MoeCommValueError, "top_k must be <= num_experts"),
    (lambda: route(torch.randn(4, 8), 0), MoeCommValueError, "top_k must be >= 1"),
    (lambda: route(torch.randn(4, 8), 2.0), MoeCommTypeError, "top_k must be an int"),
    (lambda: route(torch.randn(4, 8, 2), 2), MoeCommValueError, "router_logits must have 2 dimensions"),
    (lambda: route(torch.randn(4, 0), 1), MoeCommValueError, "router_logits must have at least 1 expert"),
    (lambda: route(torch.randn(4, 8).double(), 2), MoeCommTypeError, "router_logits must have dtype"),
    (lambda: route(torch.zeros(4, 8, dtype=torch.int32), 2), MoeCommTypeError, "router_logits must have dtype"),
    (lambda: route([[1.0, 2.0]], 1), MoeCommTypeError, "router_logits must be a torch.Tensor"),
    (lambda: route(torch.randn(4, 8), 2, method="softmax"), MoeCommTypeError, "method must be a RoutingMethod"),
    (lambda: route(torch.randn(4, 8), 2, renormalize=1), MoeCommTypeError, "renormalize must be a bool"),
    (lambda: route(torch.randn(4, 8), 2, routed_scaling_factor=float("nan")), MoeCommValueError, "routed_scaling_factor must be finite"),
    (lambda: route(torch.randn(4, 8), 2, routed_scaling_factor="2"), MoeCommTypeError, "routed_scaling_factor must be a float"),
    (lambda: route(torch.randn(4, 8), 2, n_group=2), MoeCommValueError, "n_group must be None with method=SOFTMAX_TOPK"),
    (lambda: route(torch.randn(4, 8), 2, e_score_correction_bias=torch.zeros(8)), MoeCommValueError, "e_score_correction_bias must be None"),
    (lambda: route(torch.randn(4, 10), 2, method=GROUPED, n_group=4), MoeCommValueError, "n_group must divide num_experts"),
    (lambda: route(torch.randn(4, 8), 2, method=GROUPED, n_group=0), MoeCommValueError, "n_group must be >= 1"),
    (lambda: route(torch.randn(4, 8), 2, method=GROUPED, n_group=4, topk_group=5), MoeCommValueError, "topk_group must be <= n_group"),
    (lambda: route(torch.randn(4, 8), 5, method=GROUPED, n_group=4, topk_group=2), MoeCommValueError, "top_k must be <= topk_group * (num_experts // n_group) = 4"),
    (lambda: route(torch.randn(4, 8), 2, **_grouped_kwargs(4, 2, torch.zeros(7))), MoeCommValueError, "e_score_correction_bias must have shape [8]"),
    (lambda: route(torch.randn(4, 8), 2, **_grouped_kwargs(4, 2, torch.zeros(8, dtype=torch.float64))), MoeCommTypeError, "e_score_correction_bias must have dtype"),
    (lambda: route(torch.randn(4, 8), 2, **_grouped_kwargs(4, 2, torch.zeros(8, device="meta"))), MoeCommValueError, "e_score_correction_bias must be on device cpu"),
    (lambda: route(torch.randn(4, 8), 2, **_grouped_kwargs(4, 2, torch.tensor([0.0] * 7 + [float("inf")]))), MoeCommValueError, "e_score_correction_bias must be finite"),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match="^route: ") as info:
        call()
    assert message in str(info.value)


def test_validate_false_skips_the_device_check():
    bias = torch.tensor([0.0] * 7 + [float("inf")])
    r = route(torch.randn(4, 8), 2, validate=False, **_grouped_kwargs(4, 2, bias))
    assert r.topk_ids.shape == (4, 2)


# ---------------------------------------------------------------------------------------------
# gpu tier: compiled kernels on realistic shapes in bf16


GPU_SHAPES = [  # (name, num_tokens, num_experts, top_k, kwargs)
    ("mixtral", 4096, 8, 2, dict(renormalize=True)),
    ("qwen3-moe", 4096, 128, 8, dict(renormalize=True)),
    ("qwen2-moe", 16384, 60, 4, dict(renormalize=False)),
    ("deepseek-v3", 16384, 256, 8, dict(method=GROUPED, n_group=8, topk_group=4, renormalize=True, routed_scaling_factor=2.5)),
    ("glm-4.5", 4096, 128, 8, dict(method=GROUPED, n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=2.5)),
    ("minimax-m2", 4096, 256, 8, dict(method=GROUPED, n_group=1, topk_group=1, renormalize=True, routed_scaling_factor=1.0)),
    ("odd", 199, 512, 8, dict(renormalize=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,num_tokens,num_experts,top_k,kw", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_kernel_matches_reference_bf16(name, num_tokens, num_experts, top_k, kw):
    torch.manual_seed(0)
    logits = torch.randn(num_tokens, num_experts, device="cuda").to(torch.bfloat16)
    kw = dict(kw)
    if kw.get("method") is GROUPED:
        kw["e_score_correction_bias"] = torch.randn(num_experts, device="cuda") * 0.1
    r = route(logits, top_k, **kw)
    ids, w = _reference(logits, top_k, **kw)
    # bf16 logits hold exact ties, and the GPU's exp differs from torch's by an ulp, which can swap
    # two experts whose scores are within an ulp: demand >= 99.9% identical ids, and that every
    # token's weights (sorted) match the reference's, which holds whichever of the near-equal is taken.
    assert (r.topk_ids == ids).float().mean() >= 0.999
    torch.testing.assert_close(r.topk_weights.sort(-1)[0], w.sort(-1)[0], atol=ATOL * 3, rtol=0)


@pytest.mark.gpu
def test_gpu_ties_and_torch_topk():
    logits = _tied_logits(4096, 128).cuda()
    r = route(logits, 8)
    probs = torch.softmax(logits, -1)
    assert torch.equal(r.topk_ids.long(), torch.sort(probs, dim=-1, descending=True, stable=True)[1][:, :8])
    # values to an ulp or two (the kernel's exp is not torch's); ids: how often CUDA torch.topk agrees
    # with the lowest-index rule is printed for the record (it has no documented rule either)
    torch.testing.assert_close(r.topk_weights, torch.topk(probs, 8, dim=-1)[0], atol=ATOL, rtol=0)
    same = (torch.topk(probs, 8, dim=-1)[1] == r.topk_ids.long()).float().mean().item()
    print(f"CUDA torch.topk ids equal to the lowest-index rule on tied rows: {same:.2%}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    logits = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(256, device="cuda") * 0.1
    kw = _grouped_kwargs(8, 4, bias)
    route(logits, 8, **kw)  # warm-up compiles the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = route(logits, 8, **kw)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(r, _reference(logits, 8, **kw))


def test_benchmark_quick_smoke(tmp_path):
    """The benchmark's --quick mode runs (CI smoke test) and writes one JSON line per measurement."""
    import json

    from benchmarks import bench_routing

    out = tmp_path / "r.jsonl"
    assert bench_routing.main(["--quick", "--tokens", "1", "5", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 * 2 * len(bench_routing.CONFIGS)  # (ours, torch) x tokens x configs
    assert all(r["same_choice"] == 1.0 and r["median_ms"] > 0 for r in lines)
