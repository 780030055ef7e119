"""RayWorkerGroup against an in-process local Ray cluster (one module: Ray costs seconds to start)."""

from __future__ import annotations

import os
import sys

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")

from moecomm.errors import MoeCommValueError  # noqa: E402
from moecomm.ray import RayWorkerGroup  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        # workers must import this module's functions (pickled by reference) and this moecomm
        paths = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": paths}})
    yield
    if started:
        ray.shutdown()


def _rank_sum(scale):
    import torch
    import torch.distributed as dist

    import moecomm.dist as mdist

    w = mdist.current_world()
    t = torch.tensor([float(w.rank)])
    dist.all_reduce(t)
    return w.rank, w.world_size, w.launcher, scale * t.item()


@pytest.mark.parametrize("n", [2, 4])
def test_group_runs_and_matches_reference(local_ray, n):
    with RayWorkerGroup(n, timeout_s=60) as group:
        assert [w["rank"] for w in group.worlds] == list(range(n))
        assert {w["launcher"] for w in group.worlds} == {"ray"}
        assert group.run(_rank_sum, 2) == [(r, n, "ray", 2.0 * n * (n - 1) / 2) for r in range(n)]
        stats = group.run_moe(tokens_per_rank=33, hidden=64, num_experts=10, top_k=3, intermediate=32, iters=1)
        assert [s["rank"] for s in stats] == list(range(n))
        assert all(s["ok"] and s["launcher"] == "ray" for s in stats), stats
    assert ray.is_initialized()  # the group did not own Ray: the fixture's cluster stays up


def test_closed_group_refuses_to_run(local_ray):
    group = RayWorkerGroup(1, timeout_s=30)
    group.close()
    with pytest.raises(MoeCommValueError, match="the group must be open"):
        group.run(_rank_sum, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_workers=0), "num_workers must be >= 1, got 0"),
    (dict(num_workers=2, gpus_per_worker=-1), "gpus_per_worker must be a number >= 0"),
    (dict(num_workers=2, backend="mpi"), "backend must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MoeCommValueError, match=match):
        RayWorkerGroup(**kwargs)
