"""The sampling rule itself, through the pure-torch reference, at 1e6 draws per case.

Default tier (CPU): four cases at a vocabulary of 8 (the CPU's integer throughput makes Philox over
1e6 x V draws cost ~0.4 s per 8 tokens); the gpu tier runs every case, on CUDA tensors, at V 24.

Each case draws N = 1e6 tokens from one distribution (one row repeated through ``indices``, each
output row its own Philox stream) and checks, against the exactly renormalised kept set of
reference.kept_mask computed in float64:
  - tokens outside the kept set are never drawn (exact);
  - total variation distance < 0.004 (the expected TV of N draws over K bins is about
    sqrt(K / (2 pi N)) < 0.002 for K <= 24);
  - a chi-square test at significance 1e-4 (p-value >= 1e-4; a correct sampler fails one case in
    10,000; the cases here use fixed seeds, so the outcome is deterministic).
The kernels draw the same tokens as the reference from the same seed (test_sampling.py checks
that token for token), so these statistics hold for them too; the gpu tier repeats them on the
compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from moecomm.sampling import reference as ref

from _sampling_helpers import chi_square_pvalue

N = 1_000_000
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu
SIGNIFICANCE = 1e-4
TV_MAX = 0.004


def _draw(x, n, seed, from_logits=False, **filters):
    x = x.to(DEV)
    idx = torch.zeros(n, dtype=torch.int64, device=DEV)
    tokens, valid, _ = ref.sample(x, from_logits=from_logits, indices=idx, seed=torch.tensor([seed], device=DEV),
                                  offset=torch.tensor([0], device=DEV), **filters)
    assert bool(valid.all())
    return torch.bincount(tokens.long(), minlength=x.shape[1]).cpu()


def _expected(x, from_logits=False, top_k=None, top_p=None, min_p=None, top_k_first=True, temperature=None):
    v, _ = ref.values(x, from_logits, temperature)
    keep = ref.kept_mask(v, top_k, top_p, min_p, top_k_first)[0]
    w = torch.where(keep, v[0].double(), 0.0)
    return w / w.sum(), keep


def _check(counts, probs, keep):
    assert int(counts[~keep].sum()) == 0, "a token outside the kept set was drawn"
    if int(keep.sum()) == 1:  # a point mass: every draw is that token
        assert int(counts[keep].sum()) == int(counts.sum())
        return
    emp = counts.double() / counts.sum()
    tv = 0.5 * (emp - probs).abs().sum().item()
    chi2, p = chi_square_pvalue(counts, probs)
    assert tv < TV_MAX, f"total variation {tv:.5f}"
    assert p >= SIGNIFICANCE, f"chi-square {chi2:.1f}, p = {p:.2e}"


def _row(vocab=24, scale=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(1, vocab, generator=g) * scale, -1)


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.8}, {"top_k": 5, "top_p": 0.7}, {"min_p": 0.2}])
def test_filters_exact_distribution_small_vocab(filters):
    x = _row(vocab=8)
    counts = _draw(x, N, seed=11, **filters)
    probs, keep = _expected(x, **filters)
    _check(counts, probs, keep)


@gpu
@pytest.mark.parametrize("filters", [
    {}, {"top_p": 0.9}, {"top_p": 0.5}, {"top_k": 5}, {"top_k": 1}, {"min_p": 0.1},
    {"top_k": 8, "top_p": 0.7}, {"top_k": 8, "top_p": 0.7, "top_k_first": False},
    {"top_k": 10, "top_p": 0.8, "min_p": 0.05},
])
def test_filters_exact_distribution(filters):
    x = _row()
    counts = _draw(x, N, seed=11, **filters)
    probs, keep = _expected(x, **filters)
    _check(counts, probs, keep)


@gpu
def test_logits_with_temperature_exact_distribution():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 20, generator=g) * 2
    for filters in ({}, {"top_k": 6, "top_p": 0.9}):
        counts = _draw(logits, N, seed=5, from_logits=True, temperature=0.7, **filters)
        probs, keep = _expected(logits, True, temperature=0.7, **filters)
        _check(counts, probs, keep)


@gpu
def test_all_equal_and_unnormalised():
    x = torch.full((1, 16), 3.0)  # all equal, summing to 48: the race needs no normalisation
    counts = _draw(x, N, seed=2)
    _check(counts, torch.full((16,), 1 / 16, dtype=torch.float64), torch.ones(16, dtype=torch.bool))
    counts = _draw(x, N, seed=2, top_k=5)  # ties at the boundary: the five lowest indices
    keep = torch.arange(16) < 5
    _check(counts, torch.where(keep, 0.2, 0.0).double(), keep)


def test_kept_set_rule():
    v = torch.tensor([[0.1, 0.2, 0.2, 0.0, 0.2, 0.3]])
    # order: 5 (0.3), 1, 2, 4 (0.2, by index), 0 (0.1), 3 (0)
    assert ref.kept_mask(v, top_k=2).tolist() == [[False, True, False, False, False, True]]
    assert ref.kept_mask(v, top_k=4).tolist() == [[False, True, True, False, True, True]]
    # mass before: 5: 0, 1: .3, 2: .5, 4: .7, 0: .9 -> top_p 0.55 keeps 5, 1, 2
    assert ref.kept_mask(v, top_p=0.55).tolist() == [[False, True, True, False, False, True]]
    assert ref.kept_mask(v, top_p=1.0).tolist() == [[True, True, True, False, True, True]]
    assert ref.kept_mask(v, min_p=0.6).tolist() == [[False, True, True, False, True, True]]
    # top_k_first: top-2 = {5, 1}, mass .5; p = .7 of it = .35: 5 (before 0) and 1 (before .3) kept
    assert ref.kept_mask(v, top_k=2, top_p=0.7).tolist() == [[False, True, False, False, False, True]]
    # joint: p .35 of the whole row (1.0): 5 and 1 (before .3 < .35)
    assert ref.kept_mask(v, top_k=3, top_p=0.35, top_k_first=False).tolist() == [[False, True, False, False, False, True]]


@gpu
def test_speculative_target_distribution():
    """The first emitted token of chain speculative sampling is distributed as the target."""
    from moecomm.sampling import chain_speculative_sampling

    g = torch.Generator().manual_seed(0)
    vocab, n_spec, batch = 12, 2, N
    draft = torch.softmax(torch.randn(1, n_spec, vocab, generator=g), -1).expand(batch, -1, -1).contiguous()
    target = torch.softmax(torch.randn(1, n_spec + 1, vocab, generator=g), -1).expand(batch, -1, -1).contiguous()
    draft_ids = torch.multinomial(draft[:, 0], 1, generator=g)
    draft_ids = torch.cat([draft_ids, torch.multinomial(draft[:, 1], 1, generator=g)], 1)
    draft, target, draft_ids = draft.to(DEV), target.to(DEV), draft_ids.to(DEV)
    out, accepted, emitted = chain_speculative_sampling(draft, draft_ids, target, seed=9, offset=0)
    first = out[:, 0].long().cpu()
    assert bool((first >= 0).all())
    counts = torch.bincount(first, minlength=vocab)
    _, p = chi_square_pvalue(counts, target[0, 0].double().cpu())
    assert p >= SIGNIFICANCE
    assert bool((emitted <= accepted).all()) and bool((emitted <= n_spec).all())
