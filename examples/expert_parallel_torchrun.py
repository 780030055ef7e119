"""The expert-parallel MoE layer under torchrun: each rank holds num_experts / world_size experts.

    torchrun --nproc-per-node 2 examples/expert_parallel_torchrun.py      # gloo on CPU, NCCL on GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 examples/expert_parallel_torchrun.py

Every rank builds the same full layer from one seed (in a real model: loads the same checkpoint),
then an expert-parallel layer over the world that keeps only its own experts. Each rank feeds its own
tokens; dispatch sends every token to the ranks holding its experts and combine brings the weighted
outputs back, so each rank's output equals what one process holding every expert computes.
"""

from __future__ import annotations

import torch

import moecomm
import moecomm.distributed as mdist


def main() -> None:
    world = mdist.init()  # reads torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ...; gloo on CPU, NCCL on GPUs
    try:
        rank, dev = world.rank, world.device
        ep_group = mdist.new_ep_groups(world, ep_size=world.world_size)  # one EP group of every rank
        hidden, intermediate, num_experts, top_k = 64, 32, 8, 2
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

        torch.manual_seed(0)  # the same weights on every rank
        full = moecomm.MoE(hidden, intermediate, num_experts, top_k, renormalize=True, dtype=dtype, device=dev)
        moe = moecomm.MoE(hidden, intermediate, num_experts, top_k, renormalize=True, dtype=dtype, device=dev,
                          ep_group=ep_group)
        with torch.no_grad():
            moe.gate.weight.copy_(full.gate.weight)  # the router is replicated
            moe.load_expert_weights(full.w_gate_up, full.w_down)  # keeps this rank's experts only

        x = torch.randn(16 + rank, hidden, generator=torch.Generator().manual_seed(rank)).to(dev, dtype)  # [T, H]
        with torch.no_grad():
            y = moe(x)  # [T, H]: route, dispatch, this rank's experts, combine
            err = (y.float() - full.reference_forward(x).float()).abs().max().item()
        errs = [None] * world.world_size
        torch.distributed.all_gather_object(errs, (moe.local_expert_ids, x.shape[0], err))
        if rank == 0:
            for r, (experts, tokens, e) in enumerate(errs):
                print(f"rank {r}: experts {experts}, {tokens} tokens, max |y - reference| = {e:.2e}")
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            print("expert-parallel output matches the one-process layer" if all(e <= tol for *_, e in errs)
                  else "MISMATCH", flush=True)
    finally:
        mdist.shutdown()


if __name__ == "__main__":
    main()
