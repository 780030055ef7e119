"""Grouped GEMM and the experts' gated MLP (moecomm::grouped_mm, moecomm::expert_mlp)."""

from .api import LAYOUTS, grouped_mm
from .mlp import expert_mlp
from .reference import expert_mlp_reference, grouped_mm_reference

__all__ = ["LAYOUTS", "expert_mlp", "expert_mlp_reference", "grouped_mm", "grouped_mm_reference"]
