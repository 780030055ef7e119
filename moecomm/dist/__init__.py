"""Process groups from torchrun / MPI / Ray / a single process; EP groups; agreement and fault naming.

    world = moecomm.dist.init()                  # reads the launcher's environment
    ep_group = moecomm.dist.new_ep_groups(world, ep_size=4)
    check_agreement(ep_group, "MyLayer", num_experts=8)
"""

from .agreement import check_agreement
from .health import RankFailureError, explain_failure, report_failure, watch

__all__ = ["RankFailureError", "check_agreement", "explain_failure", "report_failure", "watch"]
