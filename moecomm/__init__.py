"""moecomm: Mixture-of-Experts communication and compute for PyTorch.

Importing moecomm is cheap: it imports nothing (not even torch) and starts nothing. The public names
below, and the subpackages, are loaded on first use.

    import moecomm
    moe = moecomm.MoE(hidden_size=1024, intermediate_size=2048, num_experts=8, top_k=2)
    y = moe(torch.randn(16, 1024))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "MoE": "moecomm.layer",
    "RoutingMethod": "moecomm.routing",
    "from_hf": "moecomm.layer.hf",
    "patch_hf_model": "moecomm.layer.hf",
    "unpatch_hf_model": "moecomm.layer.hf",
    "MoEConfig": "moecomm.layer",
    "MoeCommError": "moecomm.errors",
    "MoeCommValueError": "moecomm.errors",
    "MoeCommTypeError": "moecomm.errors",
}
_SUBMODULES = ("routing", "permute", "ep", "gemm", "allreduce", "sampling", "attention", "layer", "distributed", "jit",
               "apps", "testing", "errors")

__all__ = sorted(_LAZY) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"moecomm.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'moecomm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
