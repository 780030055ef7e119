"""Token sampling without sorting: rejection-free exponential races over pivot-bracketed kept sets.

    from moecomm.sampling import top_k_top_p_sampling_from_logits      # flashinfer.sampling's names
    tokens = top_k_top_p_sampling_from_logits(logits, top_k=50, top_p=0.9)
    out = sample(logits, temperature=0.7, top_p=0.9, return_logprobs=True)   # fused pipeline
"""

from .api import (
    SampleOutput,
    min_p_sampling_from_probs,
    sampling_from_logits,
    sampling_from_probs,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_k_sampling_from_probs,
    top_k_top_p_sampling_from_logits,
    top_k_top_p_sampling_from_probs,
    top_p_renorm_probs,
    top_p_sampling_from_probs,
)
from .pipeline import MinP, SamplingPipeline, Temperature, TopK, TopP, sample
from .speculative import chain_speculative_sampling

__all__ = [
    "MinP",
    "SampleOutput",
    "SamplingPipeline",
    "Temperature",
    "TopK",
    "TopP",
    "chain_speculative_sampling",
    "min_p_sampling_from_probs",
    "sample",
    "sampling_from_logits",
    "sampling_from_probs",
    "softmax",
    "top_k_mask_logits",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
]
