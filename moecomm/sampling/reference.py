"""Pure-torch sampling: the truth in tests and the path on CPU.

# B = batch (output rows), R = distinct distribution rows (R = B without indices), V = vocab

What a sample is (the kernels implement exactly this, so reference and kernel draw the same token
from the same seed, up to the last-ulp rounding of exp/log/sums):

1. Values. From probabilities: v = probs (fp32). From logits: v = exp(logits / T - max) (fp32).
2. The kept set (one rule for every filter). Order the tokens by descending v, ties by ascending
   index (a stable descending sort). rank(i) is the token's position in that order and
   mass_before(i) the sum of v over the tokens before it. Token i is kept iff
       v_i > 0  and  rank(i) < top_k  and  mass_before(i) < top_p * S_ref  and  v_i >= min_p * max(v)
   where S_ref is the mass of the whole row ("joint") or of the top-k set ("top_k_first", the
   default: top-p applied to the top-k-renormalised distribution). So the kept set is always a
   prefix of that order: top-k keeps exactly k tokens, ties at the boundary go to the lowest
   indices; top-p keeps the shortest prefix whose mass reaches top_p (top_p = 1: every token with
   v > 0); top_k = 1 is the argmax, ties to the lowest index.
3. The draw: an exponential race. Every token gets E_i = -log(1 - u_i), u_i uniform from
   Philox4x32-7 (key = seed; counter = (i // 4, row or 0, offset lo, offset hi), lane i % 4); the
   sample is argmax over kept i of v_i / E_i (ties: lowest index). P(i wins) = v_i / sum_kept v, for
   any kept set, without normalising and without a prefix sum. The uniforms depend only on (seed,
   offset, row, token): with one seed per row (the row term is then 0), a request's tokens do not
   depend on its batch neighbours.
4. Bad rows (NaN, +-inf or negative probabilities, a sum of 0, NaN/+inf logits, a per-row
   parameter out of range): token 0, valid = False, log-prob NaN.
"""

from __future__ import annotations

import torch

# Philox4x32 constants (as triton.language.random) and the rounds we run: 7 is the smallest
# count the Random123 authors found Crush-resistant; the kernels and this file must agree.
PHILOX_ROUNDS = 7
_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# counter word c0 of the acceptance uniforms of chain_speculative_sampling (token keys use i // 4)
SPEC_COUNTER_BASE = 0x40000000
_TWO_M32 = 2.3283064365386963e-10  # 2**-32
_SERIES_BELOW = 0.00390625  # 2**-8: below it -log(1-u) by its series (1 - u would round)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a uint32 constant and uint32 values in int64.

    The 64-bit product wraps in int64 (two's complement, as torch's integer multiply does on CPU
    and GPU); its bits are the unsigned product's, so masking after the shift recovers both halves.
    tests/sampling checks the result against Triton's own Philox."""
    p = b * a
    return (p >> 32) & _M32, p & _M32


def philox4x32(seed: torch.Tensor, c0, c1, c2, c3, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 of triton.language.random.philox, in int64 tensors holding uint32 values.

    seed: int64 (any shape broadcasting with the counters); c0..c3: int64 tensors or ints in [0, 2**32).
    Returns the four uint32 outputs as int64 tensors.
    """
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64, device=seed.device) for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hb, lb = _mul_hi_lo(_ROUND_B, c2)
        ha, la = _mul_hi_lo(_ROUND_A, c0)
        c0, c2, c1, c3 = hb ^ c1 ^ k0, ha ^ c3 ^ k1, lb, la
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> fp32 uniform in (0, 1]: (r + 0.5) * 2**-32, as the kernels round it."""
    return (r.to(torch.float32) + 0.5) * _TWO_M32


def exponential_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """E = -log(1 - u) in fp32; by its series where 1 - u would lose the small u's precision."""
    series = u * (1.0 + u * (0.5 + u * 0.33333334))
    return torch.where(u < _SERIES_BELOW, series, -torch.log(1.0 - u))


def race_exponentials(num_rows: int, vocab: int, seed: torch.Tensor, offset: torch.Tensor, per_row_seed: bool) -> torch.Tensor:
    """[B, V] fp32 exponentials E of every (output row, token).

    seed, offset: int64 [1] or [B] (broadcast). per_row_seed: the row index is left out of the
    counter (then a row's numbers depend on its own seed and offset only).
    """
    dev = seed.device
    rows = torch.arange(num_rows, device=dev, dtype=torch.int64)[:, None]  # [B, 1]
    quads = torch.arange((vocab + 3) // 4, device=dev, dtype=torch.int64)[None, :]  # [1, V/4]
    s = seed.reshape(-1, 1).expand(num_rows, 1) if seed.numel() == 1 else seed.reshape(-1, 1)
    o = offset.reshape(-1, 1).expand(num_rows, 1) if offset.numel() == 1 else offset.reshape(-1, 1)
    c1 = torch.zeros_like(rows) if per_row_seed else rows
    outs = philox4x32(s, quads, c1, o & _M32, (o >> 32) & _M32)  # one call per quad of tokens
    r = torch.stack(outs, -1).reshape(num_rows, 4 * quads.shape[1])[:, :vocab]  # token i: quad i // 4, lane i % 4
    return exponential_from_uniform(uniform_from_bits(r))


def speculative_uniforms(num_rows: int, num_spec: int, seed: torch.Tensor, offset: torch.Tensor, per_row_seed: bool) -> torch.Tensor:
    """[B, n] fp32 uniforms in (0, 1] for the acceptance tests of chain_speculative_sampling."""
    dev = seed.device
    rows = torch.arange(num_rows, device=dev, dtype=torch.int64)[:, None]
    j = torch.arange(num_spec, device=dev, dtype=torch.int64)[None, :]
    s = seed.reshape(-1, 1).expand(num_rows, 1) if seed.numel() == 1 else seed.reshape(-1, 1)
    o = offset.reshape(-1, 1).expand(num_rows, 1) if offset.numel() == 1 else offset.reshape(-1, 1)
    c1 = torch.zeros_like(rows) if per_row_seed else rows
    r = philox4x32(s, SPEC_COUNTER_BASE + j, c1, o & _M32, (o >> 32) & _M32)[0]
    return uniform_from_bits(r)


def _per_row(x, num_rows: int, dtype, device) -> torch.Tensor:
    """A scalar or [B] parameter as a [B] tensor."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).reshape(-1).expand(num_rows) if x.numel() == 1 else x.to(device=device, dtype=dtype)
    return torch.full((num_rows,), x, dtype=dtype, device=device)


def values(x: torch.Tensor, from_logits: bool, temperature=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [R, V] fp32, bad [R] bool): the values the kept set and the race are defined on."""
    x = x.float()
    if not from_logits:
        bad = (torch.isnan(x) | (x < 0) | torch.isinf(x)).any(-1) | (x.sum(-1, dtype=torch.float64) <= 0)
        return x, bad
    inv_t = 1.0 / _per_row(1.0 if temperature is None else temperature, x.shape[0], torch.float32, x.device)
    xs = x * inv_t[:, None]
    m = xs.amax(-1, keepdim=True)
    bad = (torch.isnan(x) | (x == float("inf"))).any(-1) | ~torch.isfinite(m[:, 0]) | torch.isnan(m[:, 0])
    v = torch.exp2((xs - torch.where(torch.isfinite(m), m, 0.0)) * 1.4426950408889634)
    return torch.nan_to_num(v, nan=0.0), bad


def kept_mask(v: torch.Tensor, top_k=None, top_p=None, min_p=None, top_k_first: bool = True) -> torch.Tensor:
    """[R, V] bool: the kept set of rule 2 (float64 sums), one row per row of v."""
    num_rows, vocab = v.shape
    dev = v.device
    vs, order = torch.sort(v, dim=-1, descending=True, stable=True)  # [R, V]
    vs64 = vs.double()
    keep = vs > 0
    rank = torch.arange(vocab, device=dev)[None, :]
    if top_k is not None:
        k = _per_row(top_k, num_rows, torch.int64, dev)[:, None]
        keep &= rank < k
    if top_p is not None:
        p = _per_row(top_p, num_rows, torch.float64, dev)[:, None]
        before = torch.cumsum(vs64, -1) - vs64
        if top_k is not None and top_k_first:
            s_ref = torch.where(rank < k, vs64, 0.0).sum(-1, keepdim=True)
        else:
            s_ref = vs64.sum(-1, keepdim=True)
        keep &= (p >= 1) | (before < p * s_ref)
    if min_p is not None:
        mp = _per_row(min_p, num_rows, torch.float32, dev)[:, None]
        keep &= vs >= mp * vs[:, :1]
    out = torch.zeros_like(keep)
    out.scatter_(1, order, keep)
    return out


def param_ok(num_rows: int, device, top_k=None, top_p=None, min_p=None, temperature=None) -> torch.Tensor:
    """[B] bool: the per-row parameters are in range (top_k >= 1, 0 < top_p <= 1, 0 <= min_p <= 1, T > 0)."""
    ok = torch.ones(num_rows, dtype=torch.bool, device=device)
    if top_k is not None:
        ok &= _per_row(top_k, num_rows, torch.int64, device) >= 1
    if top_p is not None:
        p = _per_row(top_p, num_rows, torch.float32, device)
        ok &= (p > 0) & (p <= 1)
    if min_p is not None:
        mp = _per_row(min_p, num_rows, torch.float32, device)
        ok &= (mp >= 0) & (mp <= 1)
    if temperature is not None:
        ok &= _per_row(temperature, num_rows, torch.float32, device) > 0
    return ok


def sample(
    x: torch.Tensor,
    *,
    from_logits: bool,
    indices: torch.Tensor | None = None,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    top_k_first: bool = True,
    seed: torch.Tensor,
    offset: torch.Tensor,
    per_row_seed: bool = False,
    out_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sampling family in one function (rules 1-4 of this module's docstring).

    Args:
        x: [R, V] probabilities or logits. indices: [B] int rows of x per output row, or None (B = R).
        temperature, top_k, top_p, min_p: scalars, [B] tensors, or None (that filter is off).
        seed, offset: int64 [1] or [B] tensors. per_row_seed: seed holds one value per output row.

    Returns:
        (tokens [B] out_dtype, valid [B] bool, logprob [B] fp32: log of the chosen token's
        probability under the temperature-scaled softmax / normalised probs, before filtering).
    """
    num_rows = indices.shape[0] if indices is not None else x.shape[0]
    vocab = x.shape[1]
    dev = x.device
    rows = indices.long() if indices is not None else torch.arange(num_rows, device=dev)
    row_ok = (rows >= 0) & (rows < x.shape[0])  # a bad index: an invalid row (the kernel's rule)
    rows = rows.clamp(0, max(x.shape[0] - 1, 0))
    if from_logits and temperature is not None and isinstance(temperature, torch.Tensor) and temperature.numel() > 1:
        t_rows = temperature  # per output row: values are computed per output row
        v, bad = values(x[rows], True, t_rows)
    else:
        v, bad = values(x, from_logits, temperature)
        v, bad = v[rows], bad[rows]
    ok = ~bad & row_ok & param_ok(num_rows, dev, top_k, top_p, min_p, temperature)
    e = race_exponentials(num_rows, vocab, seed, offset, per_row_seed)  # [B, V]
    plain = top_k is None and top_p is None and min_p is None
    if plain and from_logits:
        # Gumbel-max in the log domain (one pass in the kernel): argmax of x / T - log E
        inv_t = 1.0 / _per_row(1.0 if temperature is None else temperature, num_rows, torch.float32, dev)
        xs = x.float()[rows] * inv_t[:, None]
        key = torch.where(xs > float("-inf"), xs - torch.log(e), float("-inf"))
    else:
        keep = kept_mask(v, top_k, top_p, min_p, top_k_first) if not plain else v > 0
        key = torch.where(keep, v / e, -1.0)
    tokens = torch.argmax(key, dim=-1)  # first maximal index: ties to the lowest index
    tokens = torch.where(ok, tokens, 0)
    s = v.double().sum(-1)
    chosen = v.gather(1, tokens[:, None])[:, 0].double()
    logprob = torch.where(ok, torch.log(chosen) - torch.log(s), float("nan")).float()
    return tokens.to(out_dtype), ok, logprob


def filter_probs(
    x: torch.Tensor, *, from_logits: bool, temperature=None, top_k=None, top_p=None, mask_logits: bool = False,
) -> torch.Tensor:
    """Renormalised kept probabilities [R, V] fp32 (softmax, top_k_renorm_probs, top_p_renorm_probs),
    or with mask_logits the logits where kept and -inf elsewhere (top_k_mask_logits).

    Bad rows: zeros (renorm) or the input unchanged (mask)."""
    if mask_logits:
        xf = x.float()
        bad = torch.isnan(xf).any(-1)
        vs, order = torch.sort(xf, dim=-1, descending=True, stable=True)
        k = _per_row(top_k, x.shape[0], torch.int64, x.device)[:, None]
        keep_sorted = torch.arange(x.shape[1], device=x.device)[None, :] < k
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        out = torch.where(keep, xf, float("-inf")).to(x.dtype)
        ok = ~bad & param_ok(x.shape[0], x.device, top_k=top_k)
        return torch.where(ok[:, None], out, x)
    v, bad = values(x, from_logits, temperature)
    ok = ~bad & param_ok(x.shape[0], x.device, top_k=top_k, top_p=top_p, temperature=temperature)
    if top_k is None and top_p is None:
        keep = v > 0
    else:
        keep = kept_mask(v, top_k, top_p, None, True)
    kept = torch.where(keep, v, 0.0)
    out = (kept.double() / kept.double().sum(-1, keepdim=True)).float()
    return torch.where(ok[:, None], out, 0.0)
