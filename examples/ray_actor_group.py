"""A Ray actor group that forms one process group and runs the expert-parallel MoE layer on it.

    python examples/ray_actor_group.py                   # starts Ray in this process, 2 CPU actors (gloo)
    python examples/ray_actor_group.py --workers 4 --gpus-per-worker 1    # on a GPU node (NCCL)
    python examples/ray_actor_group.py --address auto    # on the cluster of `ray start` / `ray job submit`

RayWorkerGroup(W) starts W actors, gives each its rank and a rendezvous address, and each calls
moecomm.distributed.init(): inside group.run(fn), fn runs on every actor with torch.distributed ready.
The Ray it started (and its session folder) is stopped and removed when the group closes.
"""

from __future__ import annotations

import argparse


def ep_forward(hidden: int, intermediate: int, num_experts: int, top_k: int, tokens: int) -> dict:
    """Runs on every actor: the expert-parallel layer on this rank's tokens, against the one-process layer."""
    import torch

    import moecomm
    import moecomm.distributed as mdist

    world = mdist.current_world()  # the World the group's init() made on this actor
    dev = world.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same weights on every actor
    full = moecomm.MoE(hidden, intermediate, num_experts, top_k, renormalize=True, dtype=dtype, device=dev)
    moe = moecomm.MoE(hidden, intermediate, num_experts, top_k, renormalize=True, dtype=dtype, device=dev,
                      ep_group=world.group)
    with torch.no_grad():
        moe.gate.weight.copy_(full.gate.weight)
        moe.load_expert_weights(full.w_gate_up, full.w_down)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(world.rank)).to(dev, dtype)
        err = (moe(x).float() - full.reference_forward(x).float()).abs().max().item()
    return dict(rank=world.rank, experts=moe.local_expert_ids, device=str(dev), max_err=err)


def main(argv=None) -> list[dict]:
    from moecomm.apps.ray import RayWorkerGroup

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--address", default=None, help="an existing Ray cluster ('auto', 'host:6379'); default: start one")
    args = p.parse_args(argv)
    with RayWorkerGroup(args.workers, gpus_per_worker=args.gpus_per_worker, address=args.address) as group:
        results = group.run(ep_forward, 64, 32, 8, 2, 16)  # one dict per actor, in rank order
    for r in results:
        print(f"rank {r['rank']} on {r['device']}: experts {r['experts']}, max |y - reference| = {r['max_err']:.2e}")
    tol = 1e-4 if results[0]["device"] == "cpu" else 5e-2
    print("every actor matches the one-process layer" if all(r["max_err"] <= tol for r in results) else "MISMATCH")
    return results


if __name__ == "__main__":
    main()
