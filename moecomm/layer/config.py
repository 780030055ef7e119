"""MoEConfig: what an MoE layer computes, as one frozen object validated once; and the checks of the
arguments that say where the layer lives (dtype, device, expert placement).

# H = hidden, I = intermediate (per expert), E = num_experts, k = top_k, S = shared-expert intermediate

Every rule about a layer's arguments is written here, once; the grouped top-k rules (n_group,
topk_group) are moecomm.routing.groups.check_groups, which route() applies to its own arguments.
A config holds effective values: defaults are filled in (n_group 1 and topk_group n_group under
SIGMOID_GROUPED_TOPK, cuda_graph_tokens from MOECOMM_CUDA_GRAPH_TOKENS, materialize_min_rows from
"auto"), so two layers with equal configs compute the same thing.

    cfg = MoEConfig(hidden_size=1024, intermediate_size=2048, num_experts=8, top_k=2, renormalize=True)
    moe = MoE.from_config(cfg, dtype=torch.bfloat16, device="cuda")
    moe.config == cfg                                   # True; dataclasses.replace(cfg, top_k=1) re-validates
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import _env
from ..errors import MoeCommTypeError, MoeCommValueError, UnsupportedHardwareError, check_choice, check_positive_int
from ..ep.placement import ExpertPlacement
from ..routing import RoutingMethod
from ..routing.groups import check_groups

__all__ = ["MoEConfig", "SUPPORTED_DTYPES", "check_dtype", "check_device", "check_placement"]

_OP = "MoE"
ACTIVATIONS = ("silu", "gelu")
# The layer's parameter dtypes: what the router, the grouped GEMM and dispatch run in (fp32
# accumulation inside). float64 is refused rather than half-supported: the routing and GEMM kernels
# have no fp64 path, and the fp64 truth of the tests is their own float64 loop, not the layer.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Routed rows (T * k) from which dispatch materializes them for the GEMMs (see MoE's docstring).
# Measured on an H100 (benchmarks/RESULTS.md): Mixtral-8x7B (I 14336) at 4096 tokens 6% faster
# copied than gathered; Qwen3-30B-A3B (I 768) 28% slower: the copy (4H bytes per row) only pays
# where each row carries much GEMM work (6HI FLOPs), so it is on by default from I >= 4096 only.
DEFAULT_MATERIALIZE_MIN_ROWS = 4096
MATERIALIZE_MIN_INTERMEDIATE = 4096


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """What one MoE layer computes (the arguments of moecomm.MoE but dtype, device, ep_group, placement).

    Attributes (see moecomm.MoE for their meaning):
        hidden_size, intermediate_size, num_experts, top_k: H, I, E, k (ints >= 1, k <= E).
        routing: a RoutingMethod. renormalize: bool. routed_scaling_factor: a finite float.
        n_group, topk_group: SIGMOID_GROUPED_TOPK only (filled in: 1 and n_group); None otherwise.
        activation: "silu" or "gelu". shared_expert_intermediate_size: S >= 0 (0: none).
        shared_expert_gate: Qwen2-MoE's sigmoid gate on the shared expert (needs S > 0).
        cuda_graph_tokens: int >= 0 (None reads MOECOMM_CUDA_GRAPH_TOKENS).
        materialize_min_rows: int >= 1 or None ("auto": 4096 when I >= 4096, else None).

    Raises MoeCommTypeError / MoeCommValueError ("MoE: <arg> must be <expected>, got <actual>").
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    routing: RoutingMethod = RoutingMethod.SOFTMAX_TOPK
    renormalize: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    activation: str = "silu"
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    cuda_graph_tokens: int | None = None
    materialize_min_rows: int | None | str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            check_positive_int(_OP, name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise MoeCommValueError(f"{_OP}: top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        if not isinstance(self.routing, RoutingMethod):
            raise MoeCommTypeError(f"{_OP}: routing must be a moecomm.RoutingMethod, got {self.routing!r}")
        n_group, topk_group = self.n_group, self.topk_group
        if self.routing == RoutingMethod.SIGMOID_GROUPED_TOPK:
            n_group, topk_group = check_groups(_OP, self.num_experts, self.top_k, n_group, topk_group)
        elif n_group is not None or topk_group is not None:
            raise MoeCommValueError(
                f"{_OP}: n_group and topk_group must be None with routing {self.routing.name}, got {n_group}, {topk_group}"
            )
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise MoeCommValueError(f"{_OP}: routed_scaling_factor must be a finite number, got {scale!r}")
        check_choice(_OP, "activation", self.activation, ACTIVATIONS)
        check_positive_int(_OP, "shared_expert_intermediate_size", self.shared_expert_intermediate_size, minimum=0)
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise MoeCommValueError(f"{_OP}: shared_expert_gate needs shared_expert_intermediate_size > 0, got 0")
        graph_tokens = _env.cuda_graph_tokens() if self.cuda_graph_tokens is None else self.cuda_graph_tokens
        check_positive_int(_OP, "cuda_graph_tokens", graph_tokens, minimum=0)
        rows = self.materialize_min_rows
        if rows == "auto":
            rows = DEFAULT_MATERIALIZE_MIN_ROWS if self.intermediate_size >= MATERIALIZE_MIN_INTERMEDIATE else None
        elif rows is not None:
            check_positive_int(_OP, "materialize_min_rows", rows)
        # the effective values (frozen: set once, here)
        for name, value in (("n_group", n_group), ("topk_group", topk_group), ("renormalize", bool(self.renormalize)),
                            ("routed_scaling_factor", float(scale)), ("shared_expert_gate", bool(self.shared_expert_gate)),
                            ("cuda_graph_tokens", graph_tokens), ("materialize_min_rows", rows)):
            object.__setattr__(self, name, value)


def check_dtype(dtype: Any) -> torch.dtype:
    """The layer's parameter dtype: one of SUPPORTED_DTYPES; None is torch's default dtype."""
    if dtype is None:
        default = torch.get_default_dtype()
        if default not in SUPPORTED_DTYPES:
            raise MoeCommTypeError(
                f"{_OP}: dtype must be {' or '.join(map(_name, SUPPORTED_DTYPES))}, got {_name(default)} "
                "(torch's default dtype, as dtype=None): pass dtype= explicitly"
            )
        return default
    if not isinstance(dtype, torch.dtype):
        raise MoeCommTypeError(f"{_OP}: dtype must be a torch.dtype, got {dtype!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise MoeCommTypeError(f"{_OP}: dtype must be {' or '.join(map(_name, SUPPORTED_DTYPES))}, got {_name(dtype)}")
    return dtype


def check_device(device: Any) -> torch.device | None:
    """The layer's device: one this machine has (cpu, meta, a present CUDA GPU); None is torch's default."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MoeCommValueError(f"{_OP}: device must be a torch.device or a name like 'cpu', 'cuda', 'cuda:1', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UnsupportedHardwareError(
                f"{_OP}: device must be one this machine has, got {device!r}: no CUDA GPU is visible "
                f"(torch {torch.__version__}, {built}); use device='cpu' (the reference path)"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UnsupportedHardwareError(
                f"{_OP}: device must be one this machine has, got {device!r}: {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
            )
    elif dev.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # a backend torch knows but this machine lacks
            raise UnsupportedHardwareError(f"{_OP}: device must be one this machine has, got {device!r} ({exc})") from None
    return dev


def check_placement(placement: Any, num_experts: int, ep_size: int) -> ExpertPlacement:
    """The placement of E experts over the EP group (None: contiguous blocks)."""
    if placement is None:
        return ExpertPlacement(num_experts, ep_size)
    if not isinstance(placement, ExpertPlacement):
        raise MoeCommTypeError(f"{_OP}: placement must be an ExpertPlacement, got {type(placement).__name__}")
    if placement.num_experts != num_experts or placement.ep_size != ep_size:
        raise MoeCommValueError(
            f"{_OP}: placement must cover num_experts={num_experts} on ep_size={ep_size}, "
            f"got num_experts={placement.num_experts}, ep_size={placement.ep_size}"
        )
    return placement
