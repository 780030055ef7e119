"""The MoE layer with an expert-parallel group in static-capacity mode (cuda_graph_tokens) under
torch.compile(fullgraph=True): its dispatch and combine are EPDispatcher's static-mode custom ops
(moecomm/ep/nccl/static_ops.py). CPU: two gloo ranks (the layer at EP size 1 uses the local permute
and exposes no force_exchange, so the exchange path needs two ranks), compiled == eager, and eager
== the one-process reference layer."""

# T = num_tokens (this rank), H = hidden, I = intermediate, E = num_experts, k = top_k

from __future__ import annotations

import torch

from moecomm.layer import MoE
from moecomm.testing import run_distributed

H, I, E, K = 32, 16, 7, 2


def _rank(graph_tokens: int) -> tuple:
    import torch.distributed as dist

    torch.manual_seed(0)
    full = MoE(H, I, E, K, renormalize=True, shared_expert_intermediate_size=16)  # the same on every rank
    moe = MoE(H, I, E, K, renormalize=True, shared_expert_intermediate_size=16, ep_group=dist.group.WORLD,
              cuda_graph_tokens=graph_tokens)
    moe.gate.weight.data.copy_(full.gate.weight)
    moe.shared_experts.load_state_dict(full.shared_experts.state_dict())
    moe.load_expert_weights(full.w_gate_up, full.w_down)
    x = torch.randn(5 + 3 * dist.get_rank(), H)  # 5 and 8 tokens: both <= graph_tokens, static mode
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        eager = moe(x)
        err = (eager - full.reference_forward(x)).abs().max().item()
        torch._dynamo.reset()
        traced = torch.compile(moe, fullgraph=True, dynamic=False, backend=record)(x)
        torch._dynamo.reset()
        compiled = torch.compile(moe, fullgraph=True, dynamic=False, backend="aot_eager")(x)
    ops = sorted({t for t in targets if "ep_static" in t})
    return (moe.dispatcher.max_tokens, err, torch.equal(traced, eager), torch.equal(compiled, eager),
            (compiled - eager).abs().max().item(), ops)


def test_moe_ep_static_mode_compiled_fullgraph_two_ranks():
    results = run_distributed(2, _rank, 16)
    for max_tokens, err, traced_equal, compiled_equal, diff, ops in results:
        assert max_tokens == 16
        assert err < 1e-4, results
        assert ops == ["moecomm.ep_static_combine.default", "moecomm.ep_static_dispatch.default"], ops
        assert traced_equal and compiled_equal, results  # the same kernels in the same order: bit for bit
