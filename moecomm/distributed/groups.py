"""Expert-parallel groups: the world cut into equal, contiguous blocks of ranks.

# W = world_size, P = ep_size, D = W / P data-parallel replicas

With W = 8 and P = 4: EP groups [0, 1, 2, 3] and [4, 5, 6, 7], side by side; each holds all experts
once, and the two replicas process different tokens (data parallelism).
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from ..errors import MoeCommValueError, check_positive_int
from .world import World

_OP = "new_ep_groups"


def ep_group_ranks(world_size: int, ep_size: int, rank: int) -> list[int]:
    """The global ranks of ``rank``'s EP group: [rank // P * P, ... + P)."""
    first = rank // ep_size * ep_size
    return list(range(first, first + ep_size))


def new_ep_groups(world: World, ep_size: int) -> dist.ProcessGroup | None:
    """Create the W / P expert-parallel groups and return the one this rank belongs to.

    Every rank must call it, with the same ep_size (dist.new_group is collective: every rank creates
    every group, in the same order). Cached per ep_size on ``world``.

    Args:
        world: from moecomm.distributed.init().
        ep_size: P, ranks per EP group; must divide world.world_size. P == world_size returns the
            world group.

    Returns:
        This rank's EP group (ranks [rank // P * P, rank // P * P + P)).
    """
    check_positive_int(_OP, "ep_size", ep_size)
    if world.world_size % ep_size != 0:
        raise MoeCommValueError(
            f"{_OP}: ep_size must divide world_size {world.world_size}, got {ep_size} "
            f"(divisors: {[d for d in range(1, world.world_size + 1) if world.world_size % d == 0]})")
    if ep_size in world.ep_groups:
        return world.ep_groups[ep_size]
    if ep_size == world.world_size:
        world.ep_groups[ep_size] = world.group
        return world.group
    mine = None
    timeout = datetime.timedelta(seconds=world.timeout_s)
    for first in range(0, world.world_size, ep_size):
        ranks = list(range(first, first + ep_size))
        g = dist.new_group(ranks=ranks, timeout=timeout)
        if world.rank in ranks:
            mine = g
    world.ep_groups[ep_size] = mine
    return mine
