"""moecomm.distributed under torch.multiprocessing: init, EP groups, agreement, dead and failing ranks."""

from __future__ import annotations

import re

import pytest
import torch

import moecomm.distributed as mdist
import moecomm.distributed.health  # noqa: F401  (mdist.health.STALE_AFTER_S)
from moecomm.errors import MoeCommValueError
from moecomm.testing import DistributedTestError, run_distributed

import dist_workers as W


@pytest.mark.parametrize("world_size", [2, 4])
def test_init_env_launcher(world_size):
    outs = run_distributed(world_size, W.world_info, backend=None, timeout_s=90)
    for r, o in enumerate(outs):
        assert (o["rank"], o["world_size"], o["local_rank"], o["local_world_size"]) == (r, world_size, r, world_size)
        assert (o["backend"], o["device"], o["launcher"], o["same"]) == ("gloo", "cpu", "env", True)
        assert o["sum"] == [world_size * (world_size + 1) / 2] * 3


def test_init_single_process_idempotent_and_shutdown():
    w = mdist.init(timeout_s=20)
    try:
        assert (w.rank, w.world_size, w.launcher, w.backend) == (0, 1, "single", "gloo")
        assert mdist.init() is w and mdist.current_world() is w
        assert mdist.new_ep_groups(w, 1) is w.group
    finally:
        mdist.shutdown()
    assert mdist.current_world() is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="mpi"), "backend must be one of"),
    (dict(timeout_s=0), "timeout_s must be a number of seconds > 0"),
    (dict(timeout_s="10"), "timeout_s must be a number of seconds > 0"),
])
def test_init_bad_arguments(kwargs, match):
    with pytest.raises(MoeCommValueError, match=match):
        mdist.init(**kwargs)


def test_init_env_backend_override(monkeypatch):
    monkeypatch.setenv("MOECOMM_DIST_BACKEND", "nccl-ish")
    with pytest.raises(ValueError, match="MOECOMM_DIST_BACKEND must be nccl or gloo"):
        mdist.init()


def test_init_bad_env(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MoeCommValueError, match="RANK must be an integer, got 'zero'"):
        mdist.init()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(MoeCommValueError, match="MASTER_ADDR and MASTER_PORT must be set"):
        mdist.init()


def test_new_ep_groups_side_by_side():
    outs = run_distributed(4, W.ep_groups, 2, backend=None, timeout_s=90)
    assert [o[0] for o in outs] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o[1] for o in outs] == [1.0, 1.0, 5.0, 5.0]


def test_new_ep_groups_must_divide():
    w = mdist.World(0, 4, 0, 4, torch.device("cpu"), "gloo", None, "env")
    with pytest.raises(MoeCommValueError, match=r"ep_size must divide world_size 4, got 3 \(divisors: \[1, 2, 4\]\)"):
        mdist.new_ep_groups(w, 3)
    with pytest.raises(MoeCommValueError, match="ep_size must be >= 1, got 0"):
        mdist.new_ep_groups(w, 0)
    assert mdist.ep_group_ranks(8, 4, 5) == [4, 5, 6, 7]


@pytest.mark.parametrize("field, bad_rank, expected", [
    ("num_experts", 2, "EPDispatcher: ranks disagree on num_experts: ranks 0, 1, 3 have 8, rank 2 has 16"),
    ("dtype", 1, "EPDispatcher: ranks disagree on dtype: ranks 0, 2, 3 have torch.bfloat16, rank 1 has torch.float16"),
])
def test_config_disagreement_raises_on_every_rank(field, bad_rank, expected):
    outs = run_distributed(4, W.disagree, field, bad_rank, backend=None, timeout_s=90)
    assert outs == [f"MoeCommValueError: {expected}"] * 4


def test_agreement_messages_without_processes():
    from moecomm.distributed.agreement import disagreement_message

    assert disagreement_message("X", [{"a": 1}, {"a": 1}], [0, 1]) is None
    msg = disagreement_message("X", [{"a": 1, "b": "gloo"}, {"a": 2, "b": "nccl"}], [4, 5])
    assert msg == "X: ranks disagree on a: rank 4 has 1, rank 5 has 2; ranks disagree on b: rank 4 has 'gloo', rank 5 has 'nccl'"
    msg = disagreement_message("X", [{"a": 1}, {}], [0, 1])
    assert msg == "X: ranks disagree on a: rank 0 has 1, rank 1 has <not given>"


def test_dead_rank_fails_the_others_naming_it():
    timeout_s = 10.0
    with pytest.raises(DistributedTestError) as info:
        run_distributed(3, W.die_mid_run, 1, timeout_s, backend=None, timeout_s=60)
    failures = info.value.failures
    assert sorted(failures) == [0, 1, 2], failures
    assert "exited with code -9" in failures[1]
    for r in (0, 2):
        assert "RankFailureError" in failures[r], failures[r]
        assert f"rank {r}: all_reduce #5 failed" in failures[r], failures[r]
        assert "rank 1 stopped responding (last heartbeat" in failures[r], failures[r]
        gave_up = float(re.search(r"gave up after ([0-9.]+) s", failures[r]).group(1))
        assert gave_up <= timeout_s, failures[r]  # within the collective timeout, never a hang


def test_bad_input_rank_named_by_the_others():
    timeout_s = 10.0
    outs = run_distributed(3, W.bad_input, 2, timeout_s, backend=None, timeout_s=60)
    reason = "MoeCommValueError: EPDispatcher.dispatch: topk_ids must be in [0, 8), got 9"
    assert outs[2][0] == reason
    for r in (0, 1):
        msg, waited = outs[r]
        assert msg.startswith(f"RankFailureError: rank {r}: EPDispatcher.dispatch: all_to_all_single failed"), msg
        assert f"rank 2 reported: {reason}" in msg, msg
        assert waited < timeout_s, (msg, waited)  # fail fast: the report is read, no timeout waited out


def test_stuck_rank_times_out_instead_of_hanging():
    timeout_s = 3.0
    outs = run_distributed(2, W.stuck_rank, 1, timeout_s, backend=None, timeout_s=60)
    msg, waited = outs[0]
    assert msg.startswith("RankFailureError: rank 0: all_reduce failed"), msg
    assert "no rank reported an error and every heartbeat is fresh" in msg, msg
    # the collective's timeout, then at most the staleness window of explain_failure
    assert timeout_s * 0.9 <= waited <= timeout_s + mdist.health.STALE_AFTER_S + 3, waited


def test_explain_failure_and_report_without_init_do_nothing():
    mdist.report_failure(RuntimeError("x"))  # no world: nowhere to report, must not raise
    assert mdist.explain_failure(None, "all_reduce", RuntimeError("x")) is None
    with pytest.raises(RuntimeError, match="boom"), mdist.watch(None, "op"):
        raise RuntimeError("boom")  # without the health store the original error goes through


@pytest.mark.multigpu
def test_init_picks_nccl_with_one_gpu_per_rank():
    outs = run_distributed(2, W.world_info, backend=None, timeout_s=120)
    assert [(o["backend"], o["device"]) for o in outs] == [("nccl", "cuda:0"), ("nccl", "cuda:1")]
    assert outs[0]["sum"] == [3.0] * 3


def test_init_adopts_an_existing_group():
    outs = run_distributed(2, W.adopted, backend="gloo", timeout_s=90)
    assert outs == [((0, 2, "external", True), True), ((1, 2, "external", True), True)]


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_mpi_world_smaller_than_the_launcher_is_an_error(monkeypatch, var):
    from moecomm.distributed.world import _check_launcher_size

    for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "4")
    _check_launcher_size(4, "MPICH Version: 5.0.2\n")  # agrees: nothing to say
    with pytest.raises(mdist.world.MoeCommError, match=(
            rf"the launcher started 4 ranks \({var}=4\) but mpi4py's MPI sees a world of 1: mpi4py loaded an MPI "
            r"library \(Open MPI v5.0.11\) other than the launcher's")):
        _check_launcher_size(1, "Open MPI v5.0.11\nmore\n")
