"""Process groups from torchrun / MPI / Ray / a single process; EP groups; agreement and fault naming.

    world = moecomm.distributed.init()                        # reads the launcher's environment
    ep_group = moecomm.distributed.new_ep_groups(world, ep_size=world.world_size)
    moecomm.distributed.check_agreement(ep_group, "MyLayer", num_experts=8)
    with moecomm.distributed.watch(ep_group, "MyLayer: all_to_all_single"):
        ...                                            # a dead rank -> RankFailureError naming it
    moecomm.distributed.shutdown()
"""

from . import health
from .agreement import check_agreement
from .groups import ep_group_ranks, new_ep_groups
from .health import RankFailureError, explain_failure, report_failure, watch
from .symmetric import SymmetricBuffer, SymmetricBufferError, eligibility, open_symmetric, open_virtual
from .world import RendezvousError, World, current_world, init, shutdown

__all__ = [
    "health",
    "RankFailureError",
    "RendezvousError",
    "SymmetricBuffer",
    "SymmetricBufferError",
    "World",
    "check_agreement",
    "current_world",
    "eligibility",
    "ep_group_ranks",
    "explain_failure",
    "init",
    "new_ep_groups",
    "open_symmetric",
    "open_virtual",
    "report_failure",
    "shutdown",
    "watch",
]
