"""Which rank holds which expert.

# E = num_experts, W = ep_size (ranks in the expert-parallel group)

Default placement: contiguous blocks, as even as possible; when E is not divisible by W the first
E % W ranks hold one expert more (E=10, W=4: ranks hold 3, 3, 2, 2 experts).
A custom placement is any map expert -> rank in which every rank's experts are listed in increasing
expert order (the local expert index is the position in that list).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MoeCommTypeError, MoeCommValueError


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert -> rank map of an expert-parallel group.

    Args:
        num_experts: E, the number of global experts.
        ep_size: W, the number of ranks in the group.
        expert_to_rank: optional [E] list of ranks; default contiguous blocks.
    """

    num_experts: int
    ep_size: int
    expert_to_rank: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        op = "ExpertPlacement"
        for name in ("num_experts", "ep_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise MoeCommTypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise MoeCommValueError(f"{op}: {name} must be >= 1, got {v}")
        if not self.expert_to_rank:
            object.__setattr__(self, "expert_to_rank", tuple(contiguous_placement(self.num_experts, self.ep_size)))
        else:
            e2r = tuple(int(r) for r in self.expert_to_rank)
            if len(e2r) != self.num_experts:
                raise MoeCommValueError(f"{op}: expert_to_rank must have {self.num_experts} entries, got {len(e2r)}")
            bad = [r for r in e2r if not 0 <= r < self.ep_size]
            if bad:
                raise MoeCommValueError(f"{op}: expert_to_rank entries must be in [0, {self.ep_size}), got {bad[0]}")
            object.__setattr__(self, "expert_to_rank", e2r)

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts held by ``rank``, increasing."""
        return [e for e, r in enumerate(self.expert_to_rank) if r == rank]

    def num_local_experts(self, rank: int) -> int:
        return sum(1 for r in self.expert_to_rank if r == rank)

    @property
    def max_local_experts(self) -> int:
        return max(self.num_local_experts(r) for r in range(self.ep_size))

    def expert_to_rank_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int32: rank of each global expert."""
        return torch.tensor(self.expert_to_rank, dtype=torch.int32, device=device)

    def expert_to_local_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int32: index of each global expert among its rank's local experts."""
        seen = [0] * self.ep_size
        local = []
        for r in self.expert_to_rank:
            local.append(seen[r])
            seen[r] += 1
        return torch.tensor(local, dtype=torch.int32, device=device)

    def describe(self) -> tuple:
        """A plain tuple that ranks compare at set-up to agree on the placement."""
        return (self.num_experts, self.ep_size, self.expert_to_rank)


def contiguous_placement(num_experts: int, ep_size: int) -> list[int]:
    """[E] ranks: contiguous blocks, the first E % W ranks one expert larger."""
    base, extra = divmod(num_experts, ep_size)
    out: list[int] = []
    for r in range(ep_size):
        out += [r] * (base + (1 if r < extra else 0))
    return out


def placement_from_list(num_experts: int, ep_size: int, expert_to_rank: Sequence[int] | None) -> ExpertPlacement:
    return ExpertPlacement(num_experts, ep_size, tuple(expert_to_rank) if expert_to_rank is not None else ())
