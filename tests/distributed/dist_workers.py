"""Functions run on every rank by the tests of tests/distributed (module level, so spawn can pickle them)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist


def world_info(backend=None, timeout_s=30.0):
    import moecomm.distributed as mdist

    w = mdist.init(backend=backend, timeout_s=timeout_s)
    again = mdist.init()
    t = torch.full((3,), float(w.rank + 1), device=w.device)
    dist.all_reduce(t)
    out = dict(rank=w.rank, world_size=w.world_size, local_rank=w.local_rank, local_world_size=w.local_world_size,
               device=str(w.device), backend=w.backend, launcher=w.launcher, same=again is w, sum=t.tolist())
    mdist.shutdown()
    return out


def ep_groups(ep_size):
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=30.0)
    g = mdist.new_ep_groups(w, ep_size)
    members = dist.get_process_group_ranks(g)
    t = torch.tensor([float(w.rank)])
    dist.all_reduce(t, group=g)  # sums only within the EP group
    mdist.shutdown()
    return members, t.item()


def ep_groups_bad(ep_size):
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=30.0)
    try:
        mdist.new_ep_groups(w, ep_size)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        mdist.shutdown()
    return "no error"


def disagree(field, bad_rank):
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=30.0)
    fields = dict(num_experts=8, hidden=64, dtype=torch.bfloat16, placement=(8, w.world_size, (0, 0, 1, 1)))
    if w.rank == bad_rank:
        fields[field] = {"num_experts": 16, "hidden": 128, "dtype": torch.float16, "placement": (8, 2, (0, 1, 0, 1))}[field]
    try:
        mdist.check_agreement(w.group, "EPDispatcher", **fields)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        mdist.shutdown()
    return "no error"


def die_mid_run(victim, timeout_s):
    """Every rank loops over all_reduce; ``victim`` SIGKILLs itself at iteration 5."""
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=timeout_s)
    t = torch.ones(1024)
    for i in range(10_000):
        if w.rank == victim and i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        t_iter = time.monotonic()
        try:
            with mdist.watch(w.group, f"all_reduce #{i}"):
                dist.all_reduce(t)
        except mdist.RankFailureError as exc:
            # how long this rank took to give up, from the start of the collective the victim missed
            raise mdist.RankFailureError(f"{exc} [gave up after {time.monotonic() - t_iter:.1f} s]",
                                         exc.failed_ranks) from exc
    return "finished"


def bad_input(bad_rank, timeout_s):
    """``bad_rank`` meets a bad input, reports it and exits; the others are in a collective."""
    import moecomm.distributed as mdist
    from moecomm.errors import MoeCommValueError

    w = mdist.init(timeout_s=timeout_s)
    t = torch.ones(16)
    with mdist.watch(w.group, "warm-up all_reduce"):
        dist.all_reduce(t)
    if w.rank == bad_rank:
        exc = MoeCommValueError("EPDispatcher.dispatch: topk_ids must be in [0, 8), got 9")
        mdist.report_failure(exc)
        # return rather than raise so that run_distributed hands back every rank's result; the
        # process exits right after, which is what the others' collective notices
        return f"{type(exc).__name__}: {exc}", 0.0
    t0 = time.monotonic()
    try:
        with mdist.watch(w.group, "EPDispatcher.dispatch: all_to_all_single"):
            dist.all_reduce(t)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - t0
    return "no error", time.monotonic() - t0


def stuck_rank(stuck, timeout_s):
    """``stuck`` sleeps instead of joining the collective: the others must give up after timeout_s."""
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=timeout_s)
    t = torch.ones(8)
    dist.all_reduce(t)  # everyone connected
    if w.rank == stuck:
        time.sleep(timeout_s + 6)  # alive (heartbeats go on) but never joins
        return "slept", 0.0
    t0 = time.monotonic()
    try:
        with mdist.watch(w.group, "all_reduce"):
            dist.all_reduce(t)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - t0
    return "no error", time.monotonic() - t0


def adopted():
    """torch.distributed already initialised (by run_distributed): init() adopts that group."""
    import moecomm.distributed as mdist

    w = mdist.init()
    out = (w.rank, w.world_size, w.launcher, w.group is dist.group.WORLD)
    mdist.shutdown()  # must leave the group it did not create alone
    return out, dist.is_initialized()
