"""The drop-in MoE layer (moe.py), its decode CUDA graphs (graphs.py) and model integrations (hf/)."""

from .config import MoEConfig
from .moe import MoE, SharedExpertMLP

__all__ = ["MoE", "MoEConfig", "SharedExpertMLP"]
