"""`moecomm demo` as a new user meets it: its knobs, any -n, one line per failure, a missing launcher.

The failing runs here used to end in tracebacks: a missing mpiexec or Ray inside the CLI's traceback,
and `demo -n 9` (8 experts, a rank without any) in 152 KB of nested errors from 9 ranks, each quoting
the others' reports. Now each failure is one line: the failing rank's own error, and one line for the
ranks that stopped because of it.
"""

from __future__ import annotations

import sys

import pytest
import torch

from moecomm import cli
from moecomm.apps import ep_demo
from moecomm.apps.ep_demo import default_num_experts, failure_lines
from moecomm.errors import MoeCommValueError


def test_knobs_reach_the_ranks(capfd):
    rc = cli.main(["demo", "-n", "3", "--num-experts", "2", "--hidden", "32", "--intermediate", "16", "--top-k", "1",
                   "--tokens-per-rank", "5", "--iters", "2", "--seed", "7", "--dtype", "float32", "--timeout", "60"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert ("moecomm demo: 3 ranks (gloo, cpu, launcher local), 5 tokens/rank, hidden 32, 2 experts, top-1, "
            "intermediate 16, float32; median of 2 forwards") in out, out
    assert out.count("  ok") == 3, out  # rank 2 holds none of the 2 experts, and matches too


def test_one_device_knobs(capsys):
    assert cli.main(["demo", "--tokens-per-rank", "3", "--hidden", "16", "--intermediate", "8", "--num-experts", "4",
                     "--top-k", "3", "--iters", "1", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "MoE H=16 I=8 E=4 top-3, float32 on CPU" in out and "all checks passed" in out, out


def test_more_ranks_than_default_experts(capfd):
    assert [default_num_experts(n) for n in (1, 4, 8, 9, 16)] == [8, 8, 8, 9, 16]
    # the -n 9 of the issue, with its 8 experts: rank 8 holds none
    rc = cli.main(["demo", "-n", "9", "--num-experts", "8", "--tokens-per-rank", "4", "--hidden", "16",
                   "--intermediate", "8", "--iters", "1"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert out.count("  ok") == 9, out


def _forward_fails_on_rank_1(self, x):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise MoeCommValueError("MoE.forward: injected failure on rank 1")
    return _ORIGINAL_FORWARD(self, x)


_ORIGINAL_FORWARD = None


@pytest.mark.skipif(torch.version.cuda is not None, reason="injects the failure through fork (CPU-only torch)")
def test_a_failing_rank_is_one_line_and_the_others_one_more(monkeypatch, capfd):
    global _ORIGINAL_FORWARD
    from moecomm.layer import moe

    _ORIGINAL_FORWARD = moe.MoE.forward
    monkeypatch.setattr(moe.MoE, "forward", _forward_fails_on_rank_1)  # forked ranks inherit it
    assert cli.main(["demo", "-n", "4", "--tokens-per-rank", "4", "--hidden", "16", "--intermediate", "8",
                     "--iters", "1", "--timeout", "30"]) == 1
    captured = capfd.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("[demo]")]  # (a library's warning aside)
    assert err == ["[demo] rank 1 failed: MoeCommValueError: MoE.forward: injected failure on rank 1",
                   "[demo] ranks 0, 2-3 stopped because rank 1 failed (RankFailureError)"], captured.err
    assert "Traceback" not in captured.out + captured.err


def test_failure_lines():
    tb = "\nTraceback (most recent call last):\n  ...\n"
    assert failure_lines({
        0: "RankFailureError: rank 0: combine failed; rank 8 reported: X" + tb,
        3: "RankFailureError: rank 3: combine failed; rank 8 reported: X" + tb,
        8: "MoeCommValueError: expert_mlp: bad" + tb,
        5: "rank 5 exited with code -9 without reporting",
    }) == ["rank 5 failed: rank 5 exited with code -9 without reporting",
           "rank 8 failed: MoeCommValueError: expert_mlp: bad",
           "ranks 0, 3 stopped because ranks 5, 8 failed (RankFailureError)"]
    # no cause known: every rank's own line
    assert failure_lines({1: "RankFailureError: rank 1: x; rank 0 stopped responding" + tb}) == [
        "rank 1 failed: RankFailureError: rank 1: x; rank 0 stopped responding"]


def test_missing_mpiexec_is_one_line(monkeypatch, tmp_path, capsys):
    from moecomm.apps import mpiexec

    for var in ("MOECOMM_MPIEXEC", "MPI4PY_LIBMPI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.setattr(mpiexec, "_mpi4py_config", lambda: {})
    monkeypatch.setattr(mpiexec, "_python_prefixes", lambda: [])
    assert cli.main(["demo", "-n", "2", "--launcher", "mpirun"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("moecomm demo: launcher 'mpirun' needs mpiexec or mpirun; looked in "), captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err, captured.err
    assert "starting" not in captured.out  # nothing started
    # and `moecomm info` says so, found the same way
    assert dict(cli.info_rows())["launcher mpirun"].startswith("no: launcher 'mpirun' needs mpiexec or mpirun")


def test_missing_ray_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without Ray installed
    assert cli.main(["demo", "-n", "2", "--launcher", "ray"]) == 2
    err = capsys.readouterr().err
    assert err == "moecomm demo: launcher 'ray' needs Ray, which is not installed (pip install ray)\n", err


def test_bad_knob_is_one_line(capsys):
    assert cli.main(["demo", "-n", "2", "--top-k", "9"]) == 2
    assert capsys.readouterr().err == "moecomm demo: top_k must be <= num_experts (8), got 9\n"
    with pytest.raises(MoeCommValueError, match="timeout_s must be a number of seconds > 0, got 0"):
        ep_demo.main(2, timeout_s=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_is_one_line(capsys):
    assert cli.main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecomm demo: device 'cuda' needs a CUDA GPU, and torch sees none") and err.count("\n") == 1, err
