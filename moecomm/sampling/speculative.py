"""chain_speculative_sampling: verify a chain of draft tokens against the target model.

# B = batch, n = draft tokens per request, V = vocab

Leviathan et al. / Chen et al. speculative sampling. Draft token j of a request is accepted when
u_j * q(d_j) < p(d_j) (u_j uniform, q the draft's and p the target's probability: accept with
probability min(1, p / q)); the first rejection at position e emits a token from the residual
max(0, p_e - q_e) (renormalised; the race below needs no normalisation), and when all n are
accepted a bonus token from p_n. The emitted tokens are then distributed exactly as p.

All of it is a handful of batched torch ops plus one sampling kernel for the final token: no
host sync, CUDA-graph and torch.compile safe. The uniforms come from the same Philox stream as
the token draws (counter word 0 offset by reference.SPEC_COUNTER_BASE, so they never overlap).
"""

from __future__ import annotations

import torch

from ..errors import MoeCommValueError, check_tensor
from . import api, reference


def chain_speculative_sampling(
    draft_probs,
    draft_token_ids,
    target_probs,
    maybe_output_accepted_token_num: torch.Tensor | None = None,
    maybe_output_emitted_draft_token_num: torch.Tensor | None = None,
    deterministic: bool = True,
    generator=None,
    seed=None,
    offset=None,
):
    """Verify draft tokens against the target distribution (flashinfer.sampling's function).

    Args:
        draft_probs: [B, n, V] fp32/fp16/bf16, the draft model's distribution at each position.
        draft_token_ids: [B, n] int32/int64, the draft tokens.
        target_probs: [B, n + 1, V], the target model's distributions (one more: the bonus).
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: [B] int32 or None;
            when given, the counts are ADDED to them in place (FlashInfer's contract).
        deterministic: accepted and ignored (deterministic always).
        generator, seed, offset: as the other sampling functions (seed [B]: per request).

    Returns:
        (output_token_ids [B, n + 1] int32: the accepted draft tokens, then the token emitted at
         the first rejection (or the bonus token), then -1;
         output_accepted_token_num [B] int32: draft tokens that would be accepted each on its own;
         output_emitted_draft_token_num [B] int32: leading draft tokens accepted (emitted)).
    """
    op = "chain_speculative_sampling"
    draft_probs = check_tensor(op, "draft_probs", draft_probs, ndim=3, dtype=api._PROB_DTYPES)
    batch, num_spec, vocab = draft_probs.shape
    dev = draft_probs.device
    draft_token_ids = check_tensor(op, "draft_token_ids", draft_token_ids, dtype=api._INDEX_DTYPES,
                                   shape=(batch, num_spec), device=dev)
    target_probs = check_tensor(op, "target_probs", target_probs, dtype=api._PROB_DTYPES,
                                shape=(batch, num_spec + 1, vocab), device=dev)
    for name, t in (("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
                    ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num)):
        if t is not None:
            check_tensor(op, name, t, shape=(batch,), device=dev)
    if vocab < 1:
        raise MoeCommValueError(f"{op}: draft_probs must have a vocabulary of at least 1, got shape {list(draft_probs.shape)}")
    st, sv, ot, ov, per_row = api._rng(op, generator, seed, offset, batch, dev, draft_probs.is_cuda)
    seed_t = st if st is not None else torch.full((1,), sv, dtype=torch.int64, device=dev)
    offset_t = ot if ot is not None else torch.full((1,), ov, dtype=torch.int64, device=dev)

    ids = draft_token_ids.long().clamp(0, vocab - 1)  # [B, n]
    u = reference.speculative_uniforms(batch, num_spec, seed_t, offset_t, per_row)  # [B, n]
    q = draft_probs.gather(2, ids[..., None])[..., 0].float()  # [B, n]
    p = target_probs[:, :num_spec].gather(2, ids[..., None])[..., 0].float()
    accept = u * q < p  # accept with probability min(1, p / q)
    accepted = accept.sum(1, dtype=torch.int32)
    emitted = torch.cumprod(accept.to(torch.int32), 1).sum(1, dtype=torch.int32)  # leading accepts
    pos = emitted.long()  # [B] where the final token is drawn
    tgt = target_probs.gather(1, pos[:, None, None].expand(batch, 1, vocab))[:, 0].float()  # [B, V]
    drf = draft_probs.gather(1, pos.clamp(max=max(num_spec - 1, 0))[:, None, None].expand(batch, 1, vocab))[:, 0].float() \
        if num_spec > 0 else torch.zeros_like(tgt)
    resid = torch.where((pos < num_spec)[:, None], (tgt - drf).clamp_min(0.0), tgt)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, tgt)  # p == q: the residual is empty
    final = api.sampling_from_probs(resid, seed=st if st is not None else sv, offset=ot if ot is not None else ov)
    j = torch.arange(num_spec + 1, device=dev)[None, :]
    padded = torch.cat([draft_token_ids.to(torch.int32), torch.full((batch, 1), -1, dtype=torch.int32, device=dev)], 1)
    out = torch.where(j < emitted[:, None], padded, torch.where(j == emitted[:, None], final[:, None].to(torch.int32), -1))
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num.add_(accepted.to(maybe_output_accepted_token_num.dtype))
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num.add_(emitted.to(maybe_output_emitted_draft_token_num.dtype))
        emitted = maybe_output_emitted_draft_token_num
    return out, accepted, emitted
