"""Top-k gating: router logits [num_tokens, num_experts] -> topk_ids, topk_weights.

    from moecomm.routing import route, RoutingMethod
    topk_ids, topk_weights = route(router_logits, top_k=2, renormalize=True)  # Mixtral
"""

from .api import Routing, RoutingMethod, route

__all__ = ["Routing", "RoutingMethod", "route"]
