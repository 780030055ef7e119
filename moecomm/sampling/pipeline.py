"""A composable sampling pipeline: temperature -> softmax -> top-k -> top-p -> min-p -> sample.

    pipe = SamplingPipeline([Temperature(0.7), TopK(50), TopP(0.9), MinP(0.05)], return_logprobs=True)
    out = pipe(logits)                       # SampleOutput(tokens, valid, logprobs), one kernel
    out = sample(logits, temperature=0.7, top_k=50, top_p=0.9)   # the same, as one call

Fusion: every step of a pipeline is folded into ONE kernel launch when the steps compose into the
kernel's rule (reference.py): temperature and softmax fuse into the value computation; top-k then
top-p is "top_k_first" (top-p on the top-k-renormalised distribution), top-p then top-k is
"joint" (both prefixes of the same order: the shorter wins); min-p commutes with renormalisation
(it is relative to the row maximum), so it fuses anywhere. A top-p step after a min-p step
measures its mass on the min-p set, which the kernel does not: the pipeline then renormalises the
min-p set first (one extra pass in torch) and fuses the rest. Steps of one kind may appear once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoeCommTypeError, MoeCommValueError
from . import api


@dataclass(frozen=True)
class Temperature:
    """Divide the logits by ``value`` (float > 0 or [B] tensor)."""
    value: object


@dataclass(frozen=True)
class TopK:
    """Keep the ``value`` most probable tokens (int >= 1 or [B] tensor)."""
    value: object


@dataclass(frozen=True)
class TopP:
    """Keep the shortest prefix of mass ``value`` (float in (0, 1] or [B] tensor)."""
    value: object


@dataclass(frozen=True)
class MinP:
    """Keep tokens with probability >= ``value`` * max (float in [0, 1] or [B] tensor)."""
    value: object


_STEPS = (Temperature, TopK, TopP, MinP)


class SamplingPipeline:
    """Sampling steps applied in order, fused into one kernel where the rule allows (module doc).

    Args:
        steps: a sequence of Temperature / TopK / TopP / MinP (each kind at most once; Temperature
            first when present, and only for logits input).
        return_logprobs: also return the log-probability of each chosen token under the
            temperature-scaled softmax before filtering.
    """

    def __init__(self, steps=(), return_logprobs: bool = False):
        steps = tuple(steps)
        seen = set()
        for s in steps:
            if not isinstance(s, _STEPS):
                raise MoeCommTypeError(f"SamplingPipeline: steps must be Temperature, TopK, TopP or MinP, got {type(s).__name__}")
            if type(s) in seen:
                raise MoeCommValueError(f"SamplingPipeline: steps must hold each kind once, got {type(s).__name__} twice")
            seen.add(type(s))
        if any(isinstance(s, Temperature) for s in steps[1:]):
            raise MoeCommValueError("SamplingPipeline: Temperature must be the first step, got it later")
        self.steps = steps
        self.return_logprobs = bool(return_logprobs)

    def _plan(self):
        kinds = [type(s) for s in self.steps]
        get = {type(s): s.value for s in self.steps}
        top_k_first = True
        if TopK in get and TopP in get:
            top_k_first = kinds.index(TopK) < kinds.index(TopP)
        prerenorm_minp = TopP in get and MinP in get and kinds.index(MinP) < kinds.index(TopP)
        return get, top_k_first, prerenorm_minp

    def __call__(self, logits=None, *, probs=None, indices=None, generator=None, seed=None, offset=None) -> api.SampleOutput:
        """Sample one token per row from ``logits`` or ``probs`` ([R, V]); see SampleOutput."""
        if (logits is None) == (probs is None):
            raise MoeCommValueError("SamplingPipeline: exactly one of logits and probs must be given, got "
                                    f"{'both' if logits is not None else 'neither'}")
        get, top_k_first, prerenorm_minp = self._plan()
        if probs is not None and Temperature in get:
            raise MoeCommValueError("SamplingPipeline: Temperature needs logits, got probs")
        min_p = get.get(MinP)
        from_logits = logits is not None
        x = logits if from_logits else probs
        if prerenorm_minp:
            # top-p after min-p: renormalise the min-p set explicitly, then fuse the rest
            x = api.softmax(x, get.get(Temperature)) if from_logits else x.float()
            mp = min_p if not isinstance(min_p, torch.Tensor) else min_p.reshape(-1, 1).float()
            x = torch.where(x >= mp * x.amax(-1, keepdim=True), x, 0.0)
            from_logits, min_p = False, None
            get = {k: v for k, v in get.items() if k is not Temperature}
        op = "SamplingPipeline"
        return api._run_sample(op, x, from_logits, indices, get.get(TopK), get.get(TopP), min_p, get.get(Temperature),
                               top_k_first, generator, seed, offset, self.return_logprobs)


def sample(logits=None, *, probs=None, temperature=None, top_k=None, top_p=None, min_p=None,
           filter_apply_order: str = "top_k_first", indices=None, generator=None, seed=None, offset=None,
           return_logprobs: bool = False) -> api.SampleOutput:
    """One fused call: temperature, softmax, top-k, top-p (top_k_first or joint), min-p, sample.

    Args:
        logits or probs: [R, V] fp32/fp16/bf16 (exactly one). temperature, top_k, top_p, min_p:
            scalars, [B] tensors or None (off). Others as top_k_top_p_sampling_from_logits.

    Returns:
        SampleOutput(tokens [B], valid [B], logprobs [B] or None).
    """
    first = api._order("sample", filter_apply_order)
    if (logits is None) == (probs is None):
        raise MoeCommValueError("sample: exactly one of logits and probs must be given")
    from_logits = logits is not None
    if not from_logits and temperature is not None:
        raise MoeCommValueError("sample: temperature needs logits, got probs")
    return api._run_sample("sample", logits if from_logits else probs, from_logits, indices, top_k, top_p, min_p,
                           temperature, first, generator, seed, offset, bool(return_logprobs))
