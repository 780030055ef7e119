"""Small helpers that tests and benchmarks share for building inputs and comparing outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def offsets_from_sizes(sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(sizes) + 1] int32 exclusive prefix sums: group e owns rows offsets[e]:offsets[e+1]."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + int(s))
    return torch.tensor(out, dtype=torch.int32, device=device)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| (Frobenius), computed in float64."""
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
