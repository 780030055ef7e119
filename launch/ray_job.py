"""A Ray job: the expert-parallel MoE layer on a Ray cluster's workers.

On a cluster (one GPU per worker):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launch/ray_job.py --address auto --workers 8 --gpus-per-worker 1
On this machine (Ray started in-process, CPU workers over gloo):
    python launch/ray_job.py --workers 4
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="an existing cluster ('auto' inside `ray job submit`); default: start Ray here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--tokens-per-rank", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    a = p.parse_args(argv)

    from moecomm.apps.ep_demo import DemoConfig, format_table, run_on_group
    from moecomm.apps.ray import RayWorkerGroup

    with RayWorkerGroup(a.workers, gpus_per_worker=a.gpus_per_worker, address=a.address) as group:
        stats = run_on_group(group, a.tokens_per_rank, a.hidden, a.num_experts, a.top_k)
    print(format_table(stats, DemoConfig(a.tokens_per_rank, a.hidden, a.num_experts, a.top_k)))
    return 0 if all(s["ok"] for s in stats) else 1


if __name__ == "__main__":
    sys.exit(main())
