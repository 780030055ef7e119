"""moecomm.sampling: the Triton kernels (interpreter on CPU, compiled on GPU) against the reference,
token for token; edge cases; bad input; randomness contracts; torch.compile; sm_90 compile.

# B = output rows, R = distinct rows, V = vocab

Equality. Kernel and reference implement one rule (reference.py) with the same Philox stream, so
they draw the same token. They can differ only where two race keys or a kept-set boundary sit
within fp32 rounding of each other (sums in another order, log/exp by another library): with
these seeds and sizes that never happens in the interpreter (numpy's exp/log), so the CPU tests
demand exact equality; on the GPU (approximate exp2/log) >= 99.9% of rows at V = 128256.
"""

from __future__ import annotations


import pytest
import torch

import moecomm.sampling as S
from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.sampling import reference as ref

from _sampling_helpers import both

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _probs(rows, vocab, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * scale, -1).to(DEV)


def _logits(rows, vocab, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(DEV)


# ---------------------------------------------------------------------------------------------
# the random stream


def test_reference_philox_matches_triton(triton_backend):
    """reference.philox4x32 (int64 torch) == triton.language.philox with our round count."""
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(out_ptr, seed, c1, c2, c3, N: tl.constexpr, ROUNDS: tl.constexpr):
        c0 = tl.arange(0, N).to(tl.uint32)
        z = tl.zeros([N], dtype=tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, z + c1.to(tl.uint32), z + c2.to(tl.uint32), z + c3.to(tl.uint32), ROUNDS)
        o = tl.arange(0, N)
        tl.store(out_ptr + o * 4 + 0, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + o * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    for seed, c1, c2, c3 in ((0, 0, 0, 0), (123456789012345, 7, 2**32 - 1, 5), (-5, 2**31, 1, 2**31 + 3)):
        out = torch.empty(64 * 4, dtype=torch.int64, device=DEV)
        philox_kernel[(1,)](out, seed, c1, c2, c3, N=64, ROUNDS=ref.PHILOX_ROUNDS)
        want = ref.philox4x32(torch.tensor(seed, dtype=torch.int64, device=DEV), torch.arange(64, device=DEV), c1, c2, c3)
        assert torch.equal(out.view(64, 4), torch.stack(want, -1)), (seed, c1, c2, c3)


def test_exponentials_are_exponential():
    e = ref.race_exponentials(4, 50_000, torch.tensor([1]), torch.tensor([0]), False).double()
    assert e.min() > 0 and abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.03
    # rows of one seed are distinct streams; a per-row seed drops the row from the counter
    a = ref.race_exponentials(2, 64, torch.tensor([9]), torch.tensor([0]), False)
    assert not torch.equal(a[0], a[1])
    b = ref.race_exponentials(2, 64, torch.tensor([9, 9]), torch.tensor([0]), True)
    assert torch.equal(b[0], b[1])


# ---------------------------------------------------------------------------------------------
# kernel == reference, token for token

CASES = [
    ("plain", S.sampling_from_probs, {}),
    ("top_p", S.top_p_sampling_from_probs, {"top_p": 0.9}),
    ("top_p_small", S.top_p_sampling_from_probs, {"top_p": 0.3}),
    ("top_k", S.top_k_sampling_from_probs, {"top_k": 7}),
    ("min_p", S.min_p_sampling_from_probs, {"min_p": 0.05}),
    ("top_k_top_p", S.top_k_top_p_sampling_from_probs, {"top_k": 20, "top_p": 0.8}),
    ("joint", S.top_k_top_p_sampling_from_probs, {"top_k": 20, "top_p": 0.8, "filter_apply_order": "joint"}),
]


@pytest.mark.parametrize("name,fn,kw", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(triton_backend, name, fn, kw):
    p = _probs(6, 333)  # 333: not a multiple of the block
    (a, va), (b, vb) = both(fn, p, **kw, seed=5, offset=3, return_valid=True)
    assert torch.equal(a, b) and bool(va.all()) and bool(vb.all())


def test_kernel_matches_reference_multi_chunk_and_logits(triton_backend):
    """V = 2500 spans two chunks of 2048 (the second partial); logits with temperature."""
    p = _probs(3, 2500, seed=1)
    a, b = both(S.top_k_top_p_sampling_from_probs, p, 30, 0.9, seed=1)
    assert torch.equal(a, b)
    lg = _logits(3, 2500, seed=2)
    a, b = both(S.top_k_top_p_sampling_from_logits, lg, 30, 0.9, seed=1)
    assert torch.equal(a, b)
    a, b = both(S.sampling_from_logits, lg, seed=4)
    assert torch.equal(a, b)
    out_a, out_b = both(S.sample, lg, temperature=torch.tensor([0.5, 1.0, 2.0], device=DEV), top_k=torch.tensor([1, 5, 40], device=DEV),
                        top_p=0.95, min_p=0.01, seed=3, return_logprobs=True)
    assert torch.equal(out_a.tokens, out_b.tokens)
    torch.testing.assert_close(out_a.logprobs, out_b.logprobs, atol=1e-5, rtol=0)



@pytest.mark.parametrize("config", ["v1", "deep"])
def test_every_config_matches_reference(triton_backend, monkeypatch, config):
    """Each launch configuration (_triton.CONFIGS: chunk, warps, pivots, loads in flight) draws the
    reference's tokens: V = 5000 is 3 chunks of 2048 / 5 of 1024 (fewer than the 4 loads in flight
    at the end of the row, more at its start)."""
    from moecomm.sampling import _triton, api

    assert set(_triton.CONFIGS) == {"v1", "deep"}, "a new configuration: add it here"
    monkeypatch.setattr(_triton, "CONFIG", config)
    monkeypatch.setattr(api, "SAMPLE_KERNEL", "triton")  # on a GPU: the Triton kernel, not sample.cu
    p = _probs(3, 5000, seed=21)
    for fn, args in ((S.top_p_sampling_from_probs, (0.9,)), (S.top_k_top_p_sampling_from_probs, (40, 0.9)),
                     (S.min_p_sampling_from_probs, (0.05,))):
        a, b = both(fn, p, *args, seed=5)
        assert torch.equal(a, b), (fn.__name__, config)
    a, b = both(S.top_p_renorm_probs, p, 0.9)
    assert torch.equal(a > 0, b > 0)

def test_per_row_tensor_parameters_and_indices(triton_backend):
    p = _probs(4, 200, seed=3)
    idx = torch.tensor([3, 0, 0, 2, 3, 1], dtype=torch.int64, device=DEV)
    k = torch.tensor([1, 5, 200, 50, 2, 9], dtype=torch.int32, device=DEV)
    tp = torch.tensor([0.9, 1.0, 0.5, 0.2, 0.99, 0.7], device=DEV)
    (a, va), (b, vb) = both(S.top_k_top_p_sampling_from_probs, p, k, tp, indices=idx, seed=2, return_valid=True)
    assert a.dtype == torch.int64 and torch.equal(a, b) and torch.equal(va, vb) and bool(va.all())
    assert a[0] == torch.argmax(p[3])  # top_k 1: the argmax


def test_renorm_and_mask_match_reference(triton_backend):
    p = _probs(5, 300, seed=4)
    lg = _logits(5, 300, seed=4)
    for fn, x, arg in ((S.top_k_renorm_probs, p, 13), (S.top_p_renorm_probs, p, 0.85),
                       (S.top_p_renorm_probs, p, torch.tensor([0.1, 0.5, 0.9, 1.0, 0.99], device=DEV))):
        a, b = both(fn, x, arg)
        assert torch.equal(a > 0, b > 0)
        torch.testing.assert_close(a, b, atol=2e-7, rtol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones(5, device=DEV), atol=1e-5, rtol=0)
    a, b = both(S.top_k_mask_logits, lg, 9)
    assert torch.equal(a, b) and bool((torch.isfinite(a).sum(-1) == 9).all())
    a, b = both(S.softmax, lg, 0.7)
    torch.testing.assert_close(a, torch.softmax(lg / 0.7, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# edge cases (kernel and reference agree on each)


def test_edge_cases(triton_backend):
    vocab = 100
    ties = torch.zeros(1, vocab, device=DEV)
    ties[0, [10, 20, 30]] = 0.3
    ties[0, 40] = 0.1
    # top_k = 1 is the argmax, ties to the lowest index
    for k in (1, 2):
        a, b = both(S.top_k_sampling_from_probs, ties.expand(8, -1).contiguous(), k, seed=7)
        assert torch.equal(a, b)
        assert set(a.tolist()) <= ({10} if k == 1 else {10, 20})
    # top_p = 1 is plain sampling (the same race, the same token)
    p = _probs(4, vocab, seed=8)
    a, _ = both(S.top_p_sampling_from_probs, p, 1.0, seed=3)
    c, _ = both(S.sampling_from_probs, p, seed=3)
    assert torch.equal(a, c)
    # one non-zero probability
    one = torch.zeros(3, vocab, device=DEV)
    one[:, 77] = 1.0
    for fn, kw in CASES[:6] and [(c[1], c[2]) for c in CASES]:
        a, b = both(fn, one, **kw, seed=1)
        assert a.tolist() == [77, 77, 77] and torch.equal(a, b)
    # all probabilities equal: top-k keeps the k lowest indices, top-p the shortest prefix
    eq = torch.full((6, 37), 1 / 37, device=DEV)
    a, b = both(S.top_k_sampling_from_probs, eq, 4, seed=2)
    assert torch.equal(a, b) and bool((a < 4).all())
    a, b = both(S.top_p_renorm_probs, eq, 0.5)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert bool((a[:, :19] > 0).all()) and bool((a[:, 19:] == 0).all())
    # batch 1 and batch 0
    a, b = both(S.top_p_sampling_from_probs, p[:1], 0.9, seed=1)
    assert a.shape == (1,) and torch.equal(a, b)
    a, b = both(S.top_k_top_p_sampling_from_probs, p[:0], 5, 0.9, seed=1, return_valid=True)
    assert a[0].shape == (0,) and a[1].shape == (0,) and b[0].shape == (0,)
    assert S.top_k_renorm_probs(p[:0], 3).shape == (0, vocab)
    # vocabulary of 1
    a, b = both(S.top_k_top_p_sampling_from_probs, torch.ones(2, 1, device=DEV), 3, 0.5, seed=1)
    assert a.tolist() == [0, 0] and torch.equal(a, b)


def test_bad_rows_are_flagged_and_in_range(triton_backend):
    p = _probs(6, 64, seed=9)
    p[1, 3] = float("nan")
    p[2, 5] = float("inf")
    p[3, 7] = -0.5
    p[4] = 0.0
    for fn, kw in [(c[1], c[2]) for c in CASES]:
        (a, va), (b, vb) = both(fn, p, **kw, seed=4, return_valid=True)
        assert torch.equal(a, b) and torch.equal(va, vb)
        assert va.tolist() == [True, False, False, False, False, True]
        assert bool((a[1:5] == 0).all()) and bool(((a >= 0) & (a < 64)).all())
    lg = _logits(4, 64, seed=9)
    lg[1, 0] = float("nan")
    lg[2] = float("-inf")
    lg[3, 9] = float("inf")
    for fn, args in ((S.sampling_from_logits, ()), (S.top_k_top_p_sampling_from_logits, (5, 0.9))):
        (a, va), (b, vb) = both(fn, lg, *args, seed=4, return_valid=True)
        assert torch.equal(a, b) and va.tolist() == [True, False, False, False] and torch.equal(va, vb)
    # per-row parameters out of range: that row is invalid, the others are sampled
    q = _probs(4, 64, seed=10)
    (a, va), (b, vb) = both(S.top_k_top_p_sampling_from_probs, q, torch.tensor([5, 0, 5, -1], device=DEV),
                            torch.tensor([0.9, 0.9, 1.5, 0.9], device=DEV), seed=1, return_valid=True)
    assert va.tolist() == [True, False, False, False] and torch.equal(a, b) and torch.equal(va, vb)
    # an index out of range: an invalid row, no fault
    (a, va), (b, vb) = both(S.sampling_from_probs, q, indices=torch.tensor([0, 9, -1], device=DEV, dtype=torch.int32),
                            seed=1, return_valid=True)
    assert va.tolist() == [True, False, False] and torch.equal(a, b)
    # renorm of a bad row: zeros; softmax of an all -inf row: zeros; mask of a NaN row: unchanged
    r, rr = both(S.top_p_renorm_probs, p, 0.9)
    assert bool((r[1:5] == 0).all()) and torch.equal(r.isnan(), rr.isnan())
    s, _ = both(S.softmax, lg)
    assert bool((s[1:4] == 0).all())
    m, _ = both(S.top_k_mask_logits, lg, 3)
    assert torch.equal(m[1].isnan(), lg[1].isnan())


def test_bad_arguments_raise_naming_the_argument():
    p = _probs(2, 10)
    with pytest.raises(MoeCommValueError, match="top_k_sampling_from_probs: top_k must be >= 1, got 0"):
        S.top_k_sampling_from_probs(p, 0)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(MoeCommValueError, match="top_p"):
            S.top_p_sampling_from_probs(p, bad)
    with pytest.raises(MoeCommValueError, match="min_p"):
        S.min_p_sampling_from_probs(p, 1.2)
    with pytest.raises(MoeCommTypeError, match="top_k must be an int"):
        S.top_k_sampling_from_probs(p, 2.5)
    with pytest.raises(MoeCommValueError, match="probs must have 2 dimensions"):
        S.sampling_from_probs(p[0])
    with pytest.raises(MoeCommTypeError, match="probs must have dtype"):
        S.sampling_from_probs(p.to(torch.int32))
    with pytest.raises(MoeCommValueError, match=r"top_p must be a scalar or have shape \[2\]"):
        S.top_p_sampling_from_probs(p, torch.full((3,), 0.5, device=DEV))
    with pytest.raises(MoeCommTypeError, match="indices must have dtype"):
        S.sampling_from_probs(p, indices=torch.zeros(2, device=DEV))
    with pytest.raises(MoeCommValueError, match="seed must have 1 or 2"):
        S.sampling_from_probs(p, seed=torch.zeros(3, dtype=torch.int64, device=DEV), offset=0)
    with pytest.raises(MoeCommValueError, match="filter_apply_order"):
        S.top_k_top_p_sampling_from_probs(p, 2, 0.5, filter_apply_order="sorted")
    with pytest.raises(MoeCommValueError, match="temperature"):
        S.softmax(p, 0.0)
    with pytest.raises(MoeCommTypeError, match="must not require grad"):
        S.sampling_from_probs(p.clone().requires_grad_())


# ---------------------------------------------------------------------------------------------
# randomness: seeds, generators, per-row seeds, determinism


def test_randomness_contracts():
    p = _probs(5, 50, scale=0.5)
    a = S.sampling_from_probs(p, seed=1, offset=0)
    assert torch.equal(a, S.sampling_from_probs(p, seed=1, offset=0))  # same seed, same tokens
    assert not torch.equal(a, S.sampling_from_probs(p, seed=1, offset=1))
    # tensors behave as ints
    st, ot = torch.tensor([1], device=DEV), torch.tensor([0], device=DEV)
    assert torch.equal(a, S.sampling_from_probs(p, seed=st, offset=ot))
    # per-row seeds: a row's token does not depend on its batch neighbours or its slot
    seeds = torch.tensor([11, 22, 33, 44, 55], device=DEV)
    full = S.top_p_sampling_from_probs(p, 0.9, seed=seeds, offset=0)
    for i in range(5):
        alone = S.top_p_sampling_from_probs(p[i:i + 1], 0.9, seed=seeds[i:i + 1], offset=0)
        assert alone.item() == full[i].item()
    perm = torch.tensor([4, 2, 0, 1, 3], device=DEV)
    assert torch.equal(S.top_p_sampling_from_probs(p[perm], 0.9, seed=seeds[perm], offset=0), full[perm])
    # generator: deterministic under manual_seed, fresh numbers call after call
    g = torch.Generator(device=DEV)
    g.manual_seed(5)
    x1 = S.sampling_from_probs(p[:1].expand(64, -1), generator=g)
    x2 = S.sampling_from_probs(p[:1].expand(64, -1), generator=g)
    g.manual_seed(5)
    assert torch.equal(x1, S.sampling_from_probs(p[:1].expand(64, -1), generator=g)) and not torch.equal(x1, x2)
    torch.manual_seed(3)
    y1 = S.sampling_from_probs(p[:1].expand(64, -1))
    torch.manual_seed(3)
    assert torch.equal(y1, S.sampling_from_probs(p[:1].expand(64, -1)))


def test_pipeline_fuses_and_matches_the_functions():
    lg = _logits(6, 80, seed=12)
    pipe = S.SamplingPipeline([S.Temperature(0.8), S.TopK(10), S.TopP(0.9)], return_logprobs=True)
    out = pipe(lg, seed=4)
    want = S.top_k_top_p_sampling_from_logits(lg / 0.8, 10, 0.9, seed=4)
    assert torch.equal(out.tokens, want)
    lsm = torch.log_softmax(lg / 0.8, -1).gather(1, out.tokens.long()[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, lsm, atol=1e-5, rtol=0)
    # top-p then top-k is the joint rule; top-p after min-p renormalises the min-p set first
    joint = S.SamplingPipeline([S.TopP(0.9), S.TopK(10)])(probs=torch.softmax(lg, -1), seed=4).tokens
    assert torch.equal(joint, S.top_k_top_p_sampling_from_probs(torch.softmax(lg, -1), 10, 0.9, filter_apply_order="joint", seed=4))
    pre = S.SamplingPipeline([S.MinP(0.1), S.TopP(0.5)])(lg, seed=4).tokens
    pr = torch.softmax(lg, -1)
    pr = torch.where(pr >= 0.1 * pr.amax(-1, keepdim=True), pr, 0.0)
    assert torch.equal(pre, S.top_p_sampling_from_probs(pr, 0.5, seed=4))
    with pytest.raises(MoeCommValueError, match="once"):
        S.SamplingPipeline([S.TopK(2), S.TopK(3)])


def test_chain_speculative_sampling_semantics():
    g = torch.Generator().manual_seed(1)
    batch, n, vocab = 5, 3, 16
    draft = torch.softmax(torch.randn(batch, n, vocab, generator=g), -1).to(DEV)
    target = draft.new_zeros(batch, n + 1, vocab)
    target[:, :n] = draft  # target == draft: every draft token is accepted
    target[:, n, 7] = 1.0
    ids = torch.multinomial(draft.reshape(-1, vocab).cpu(), 1, generator=g).reshape(batch, n).to(DEV)
    acc = torch.ones(batch, dtype=torch.int32, device=DEV)
    out, accepted, emitted = S.chain_speculative_sampling(draft, ids, target, maybe_output_accepted_token_num=acc, seed=1)
    assert torch.equal(out[:, :n], ids.int()) and bool((out[:, n] == 7).all())
    assert accepted is acc and acc.tolist() == [n + 1] * batch and emitted.tolist() == [n] * batch
    # the target puts no mass on the draft tokens: the first is rejected, a target token follows, then -1
    t2 = torch.zeros_like(target)
    t2[..., 0] = 1.0
    ids2 = torch.full((batch, n), 3, device=DEV)
    out2, acc2, em2 = S.chain_speculative_sampling(draft, ids2, t2, seed=2)
    assert out2[:, 0].tolist() == [0] * batch and bool((out2[:, 1:] == -1).all())
    assert em2.tolist() == [0] * batch and acc2.tolist() == [0] * batch


def test_torch_compile_fullgraph():
    lg = _logits(4, 40, seed=13)

    def step(x, seed, offset):
        out = S.sample(x, temperature=0.7, top_k=8, top_p=0.9, seed=seed, offset=offset, return_logprobs=True)
        return out.tokens, out.valid, out.logprobs, S.top_p_renorm_probs(torch.softmax(x, -1), 0.8)

    def fresh(x):
        return S.top_p_sampling_from_probs(torch.softmax(x, -1), 0.9)  # seed drawn from the default generator

    seed, offset = torch.tensor([3], device=DEV), torch.tensor([1], device=DEV)
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(lg, seed, offset), step(lg, seed, offset)):
        assert torch.equal(got, want) or torch.allclose(got, want, equal_nan=True)
    out = torch.compile(fresh, fullgraph=True)(lg)
    assert out.shape == (4,) and bool(((out >= 0) & (out < 40)).all())


# ---------------------------------------------------------------------------------------------
# the kernels compile for Hopper (no GPU needed)

_SIG = {"x_ptr": "*fp32", "rowmap_ptr": "*i32", "out_ptr": "*i32", "valid_ptr": "*i1", "logprob_ptr": "*fp32",
        "y_ptr": "*fp32", "k_ptr": "*i32", "p_ptr": "*fp32", "minp_ptr": "*fp32", "temp_ptr": "*fp32",
        "seed_ptr": "*i64", "offset_ptr": "*i64", "V": "i32", "num_in_rows": "i32", "stride_x": "i32",
        "stride_y": "i32", "k_val": "i32", "p_val": "fp32", "minp_val": "fp32", "temp_val": "fp32",
        "seed_val": "i64", "offset_val": "i64"}
_BASE = dict(MODE=0, FROM_LOGITS=False, HAS_ROWMAP=False, HAS_TOPK=False, K_TENSOR=False, HAS_TOPP=False,
             P_TENSOR=False, HAS_MINP=False, MINP_TENSOR=False, HAS_TEMP=False, TEMP_TENSOR=False, TOPK_FIRST=True,
             SEED_TENSOR=True, SEED_PER_ROW=False, OFFSET_TENSOR=False, OFFSET_PER_ROW=False, WRITE_LOGPROB=False,
             N_ROUNDS=7, BLOCK=2048, NP=8, MAX_PASSES=48, DEPTH=1)
# every code path once (fp32 inputs), the two benchmarked ones also with bf16 inputs
_VARIANTS = [("fp32", dict(NP=2)), ("fp32", dict(NP=2, FROM_LOGITS=True)), ("bf16", dict(HAS_TOPP=True)),
             ("fp32", dict(HAS_MINP=True, HAS_TOPK=True, K_TENSOR=True)),
             ("bf16", dict(HAS_TOPK=True, HAS_TOPP=True, HAS_ROWMAP=True, WRITE_LOGPROB=True)),
             ("fp32", dict(FROM_LOGITS=True, HAS_TOPK=True, HAS_TOPP=True, HAS_TEMP=True, TEMP_TENSOR=True, TOPK_FIRST=False)),
             ("fp32", dict(MODE=1, HAS_TOPP=True, SEED_TENSOR=False)), ("fp32", dict(MODE=2, HAS_TOPK=True))]


def _compile_all_for_hopper() -> int:
    from moecomm.sampling import _triton
    from moecomm.testing import compile_for_hopper

    count = 0
    for xdt, over in _VARIANTS:
        consts = {**_BASE, **over}
        sig = {**_SIG, "x_ptr": f"*{xdt}", **{k: "constexpr" for k in consts}}
        ptx = compile_for_hopper(_triton.sample_kernel, sig, consts, num_warps=8).asm["ptx"]
        assert ".target sm_90" in ptx and "st.global" in ptx
        count += 1
    for cfg in _triton.CONFIGS.values():  # the benchmarked variants as each configuration launches them
        for over, counted in ((dict(HAS_TOPP=True), False), (dict(HAS_TOPK=True, HAS_TOPP=True), True)):
            consts = {**_BASE, **over, "DEPTH": cfg["depth"], "NP": cfg["pivots_counted" if counted else "pivots"],
                      "BLOCK": cfg["block_counted" if counted else "block"]}
            sig = {**_SIG, **{k: "constexpr" for k in consts}}
            ptx = compile_for_hopper(_triton.sample_kernel, sig, consts, num_warps=cfg["warps"]).asm["ptx"]
            assert ".target sm_90" in ptx and "st.global" in ptx
    return count


def test_kernels_compile_for_hopper():
    """In a fresh process without TRITON_INTERPRET (see moecomm.testing.run_without_interpreter)."""
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_all_for_hopper") == str(len(_VARIANTS))

# ---------------------------------------------------------------------------------------------
# issue 14: the while loop's state must be carried (a GPU-only bug the interpreter cannot show)


def _assigned_names(nodes) -> set[str]:
    import ast

    out = set()
    for node in nodes:
        for sub in ast.walk(node):
            targets = sub.targets if isinstance(sub, ast.Assign) else (
                [sub.target] if isinstance(sub, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                for leaf in ast.walk(t):
                    if isinstance(leaf, ast.Name):
                        out.add(leaf.id)
    return out


def test_loop_state_never_starts_as_an_alias():
    """sample_kernel binds no name before its `while` to another bare name (`c_idx = widx`) when
    the loop reassigns it: Triton's carry analysis compares IR values, and an alias that the body
    sets back to the other name looks unchanged, so it is not carried (see _triton._fresh). The
    kernel before the fix had `c_idx = widx` and `c_v = wval` here: 0.04% of its top-p draws on the
    H200 lay outside the kept set."""
    import ast
    import inspect
    import textwrap

    from moecomm.sampling import _triton

    fn = _triton.sample_kernel
    fn = getattr(fn, "fn", fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    loops = [w for node in body for w in ast.walk(node) if isinstance(w, ast.While)]
    assert loops, "sample_kernel has no while loop any more: update this test"
    constexprs = {n.target.id for n in ast.walk(tree.body[0]) if isinstance(n, ast.AnnAssign)}  # X: tl.constexpr = ...
    aliases = []
    for loop in loops:
        in_loop = _assigned_names(loop.body)
        inside = {id(n) for n in ast.walk(loop)}
        for node in body:
            for sub in ast.walk(node):
                if id(sub) in inside or not isinstance(sub, ast.Assign) or sub.lineno > loop.lineno:
                    continue
                if isinstance(sub.value, ast.Name) and len(sub.targets) == 1 and isinstance(sub.targets[0], ast.Name):
                    if sub.targets[0].id in in_loop and sub.value.id not in constexprs:
                        aliases.append(f"{sub.targets[0].id} = {sub.value.id}")
    assert not aliases, f"loop state starting as an alias (use _fresh): {aliases}"


def _carried_by_the_while() -> str:
    """For the variants whose pass 1 races (top-p, min-p; probs and logits): the names the compiled
    scf.while carries must include the candidate (c_idx, c_v). Returns 'ok' or what is missing."""
    import re

    from moecomm.sampling import _triton
    from moecomm.testing import compile_for_hopper

    missing = []
    for over in (dict(HAS_TOPP=True, HAS_ROWMAP=True, SEED_TENSOR=False), dict(HAS_TOPP=True, HAS_MINP=True),
                 dict(FROM_LOGITS=True, HAS_TOPP=True, HAS_TEMP=True)):
        consts = {**_BASE, **over, "BLOCK": 1024}
        sig = {**_SIG, **{k: "constexpr" for k in consts}}
        ttir = compile_for_hopper(_triton.sample_kernel, sig, consts, num_warps=16).asm["ttir"]
        head = next(line for line in ttir.splitlines() if "scf.while" in line)
        names = {re.sub(r"_\d+$", "", n) for n in re.findall(r"%([A-Za-z_][A-Za-z0-9_]*) = ", head.split(")")[0])}
        lost = {"c_idx", "c_v", "lo_v", "hi_v", "done"} - names
        if lost:
            missing.append("+".join(sorted(over)) + ":" + ",".join(sorted(lost)))
    return "ok" if not missing else ";".join(missing)


def test_loop_state_is_carried():
    """The compiled kernel (sm_90, no GPU needed) carries the candidate through its pass loop. Before
    the fix it did not (c_idx, c_v missing): a row could return its unfiltered pass-1 winner."""
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_carried_by_the_while") == "ok"
