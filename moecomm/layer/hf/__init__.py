"""Hugging Face transformers integration: MoE blocks replaced by moecomm.MoE, in the blocks' own layout."""

from .blocks import BLOCKS, SUPPORTED_BLOCKS
from .convert import from_hf, patch_hf_model, unpatch_hf_model
from .patched import HFMoE

__all__ = ["BLOCKS", "HFMoE", "SUPPORTED_BLOCKS", "from_hf", "patch_hf_model", "unpatch_hf_model"]
