"""The expert-parallel MoE layer on ranks that hold no expert (more ranks than experts, or a placement
that leaves a rank empty): such a rank routes and sends its tokens, receives none, runs no expert and
combines what comes back. Over gloo, against the single-process layer's reference_forward, exactly.

# T = tokens of a rank, H = hidden, I = intermediate, E = experts, k = top_k, W = ranks

Why the comparison can be torch.equal: tokens and expert weights are small integers and I = 1, so
every GEMM is exact in fp32 whatever its summation order (the gate_up sums are integers < 2^24, the
down "GEMM" is one product per output), silu and the routing weights are computed by the same
elementwise code on the same values on both paths, and with k = 2 a token's output is 0 + a + b,
the same in either order. A lost, doubled or misrouted row changes the output.
"""

from __future__ import annotations

import pytest
import torch

from moecomm.ep.placement import ExpertPlacement
from moecomm.layer import MoE
from moecomm.testing import run_distributed

H, I, K = 8, 1, 2


def _layer_rank(num_experts: int, expert_to_rank: tuple[int, ...], tokens_per_rank: tuple[int, ...]):
    import torch.distributed as dist

    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full layer on every rank
    full = MoE(H, I, num_experts, K, renormalize=True)
    with torch.no_grad():
        full.w_gate_up.copy_(torch.randint(-2, 3, full.w_gate_up.shape).float())
        full.w_down.copy_(torch.randint(-2, 3, full.w_down.shape).float())
    placement = ExpertPlacement(num_experts, W, expert_to_rank)
    ep = MoE(H, I, num_experts, K, renormalize=True, ep_group=dist.group.WORLD, placement=placement)
    ep.gate.weight.data.copy_(full.gate.weight)
    ep.load_expert_weights(full.w_gate_up, full.w_down)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(-3, 4, (tokens_per_rank[rank], H), generator=g).float()
    with torch.no_grad():
        y = ep(x)
        ref = full.reference_forward(x)
    routed_here = sum(int((ep.route(x).topk_ids.long() == e).sum()) for e in range(num_experts)) if x.numel() else 0
    return ep.num_local_experts, torch.equal(y, ref), (y - ref).abs().max().item() if y.numel() else 0.0, routed_here


@pytest.mark.parametrize("num_experts, expert_to_rank, tokens_per_rank, local", [
    # more ranks than experts (`moecomm demo -n 9` with 8 experts): contiguous placement leaves rank 2 empty
    (2, (), (7, 5, 6), [1, 1, 0]),
    # a placement that leaves ranks 0 and 2 empty, and rank 2 also has no tokens
    (3, (1, 3, 1), (4, 9, 0, 3), [0, 2, 0, 1]),
])
def test_ranks_without_experts_match_the_reference_exactly(num_experts, expert_to_rank, tokens_per_rank, local):
    # spawn: late in a full run the pytest process has threads, and a forked child can inherit a held lock
    outs = run_distributed(len(tokens_per_rank), _layer_rank, num_experts, expert_to_rank, tokens_per_rank,
                           timeout_s=180)
    assert [o[0] for o in outs] == local
    for rank, (_, equal, err, routed) in enumerate(outs):
        assert equal, (rank, err)
        assert routed == K * tokens_per_rank[rank]  # every token of every rank went somewhere
