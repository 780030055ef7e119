"""Hugging Face transformers integration: MoE blocks replaced by moecomm.MoE, sharing their weights."""

from .convert import SUPPORTED_BLOCKS, from_hf, patch_hf_model

__all__ = ["SUPPORTED_BLOCKS", "from_hf", "patch_hf_model"]
