"""The expert-parallel demo under torch.multiprocessing: 2 and 4 ranks against the reference."""

from __future__ import annotations

import pytest

from moecomm.apps.ep_demo import DemoConfig, format_table, main, run_rank
from moecomm.errors import MoeCommValueError
from moecomm.testing import run_distributed

# small but not trivial: 3 experts per rank on 2 ranks and an uneven 3/3/2/2... split on 4 ranks
# (E=10), odd token count, so that empty and uneven splits go through all_to_all_single
SMALL = DemoConfig(tokens_per_rank=33, hidden=64, num_experts=10, top_k=3, intermediate=32, iters=1, verbose=False)


# spawn: what every multi-rank test uses; fork: what the CPU demo uses to skip per-rank imports
@pytest.mark.parametrize("world_size, start_method", [(2, "spawn"), (4, "fork")])
def test_expert_parallel_matches_reference(world_size, start_method):
    outs = run_distributed(world_size, run_rank, SMALL, backend=None, timeout_s=120, start_method=start_method)
    for stats in outs:
        assert [s["rank"] for s in stats] == list(range(world_size))
        for s in stats:
            # fp32 on both paths: same arithmetic, summation order aside (tolerance in demo.TOLERANCES)
            assert s["ok"], s
            assert s["max_err"] < 1e-4, s
            assert s["bytes_sent"] % (64 * 4) == 0 and 0 <= s["bytes_sent"] <= 33 * (world_size - 1) * 64 * 4
    assert outs[0] == outs[-1]  # every rank gathered the same table


def test_main_local_prints_the_table(capsys):
    assert main(2, "local", tokens_per_rank=16, hidden=32, num_experts=4, top_k=2, intermediate=16, iters=1)
    out = capsys.readouterr().out
    assert "[demo] starting 2 ranks with launcher local" in out
    assert "moecomm demo: 2 ranks (gloo, cpu, launcher local)" in out
    assert "all ranks match the reference" in out
    assert out.count("  ok") == 2


def test_format_table_rows():
    s = dict(rank=0, tokens=512, route_ms=1.0, dispatch_ms=2.0, experts_ms=3.0, combine_ms=4.0, total_ms=10.0,
             bytes_sent=2_000_000, max_err=0.0, ok=True, backend="gloo", device="cpu", launcher="env",
             dtype="float32", world_size=2)
    text = format_table([s, dict(s, rank=1, total_ms=20.0, ok=False)], DemoConfig())
    assert "MISMATCH" in text and "25600" in text  # 512 tokens / 20 ms for rank 1
    assert "51200" in text  # 1024 tokens over the slowest rank's 20 ms


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(n=2, launcher="slurm"), "launcher must be one of"),
    (dict(n=2, top_k=9), r"top_k must be <= num_experts \(8\), got 9"),
    (dict(n=2, dtype="int8"), "dtype must be one of"),
    (dict(n=2, hidden=0), "hidden must be >= 1, got 0"),
])
def test_main_bad_arguments(kwargs, match):
    with pytest.raises(MoeCommValueError, match=match):
        main(**kwargs)


@pytest.mark.multigpu
def test_expert_parallel_on_gpus_bf16():
    # NCCL, one GPU per rank, bf16 at the demo's real shape (tolerance: demo.TOLERANCES[bfloat16])
    cfg = DemoConfig(tokens_per_rank=512, hidden=1024, num_experts=8, top_k=2, intermediate=1024, iters=3,
                     dtype="bfloat16", verbose=False)
    outs = run_distributed(2, run_rank, cfg, backend=None, timeout_s=300)
    assert all(s["ok"] and s["backend"] == "nccl" for s in outs[0]), outs[0]
