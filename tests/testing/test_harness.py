"""The shared harness: timing, result records, run_distributed, the Hopper compile check."""

import json

import pytest
import torch
import torch.distributed as dist

from moecomm.testing import DistributedTestError, ResultWriter, bench, bench_interleaved, bench_sustained, run_distributed


def test_bench_cpu_reports_median_within_spread():
    x = torch.randn(256, 256)
    t = bench(lambda a: a @ a, [(x,), (x.clone(),)], warmup=2, rep=9, device="cpu")
    assert t.num_samples == 9
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms


def test_bench_interleaved_calls_in_turn_and_times_each():
    """Every round calls each implementation once, in order, on the same rotated input; a slow
    implementation's median shows it, a fast one's does not."""
    import time

    calls = []

    def slow(i):
        calls.append(("slow", i))
        time.sleep(0.004)

    def fast(i):
        calls.append(("fast", i))

    sets = [(0,), (1,), (2,)]
    t = bench_interleaved({"slow": slow, "fast": fast}, sets, warmup=2, rep=6)
    assert set(t) == {"slow", "fast"} and t["slow"].num_samples == t["fast"].num_samples == 6
    assert t["slow"].median_ms >= 4.0 > t["fast"].median_ms
    assert len(calls) == 2 * (2 + 6)
    assert [c[0] for c in calls] == ["slow", "fast"] * 8
    assert all(calls[2 * r][1] == calls[2 * r + 1][1] == r % 3 for r in range(8))  # same input per round


def test_bench_sustained_times_the_second_half_of_alternating_blocks():
    """After a short estimate of each, the implementations run in alternating blocks of about
    block_ms (within [min_calls, max_calls] calls), rounds forward and backward in turn; only each
    block's second half is timed."""
    import itertools
    import time

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    def fast():
        calls.append("fast")

    t = bench_sustained({"slow": slow, "fast": fast}, block_ms=10.0, rounds=3, min_calls=6, max_calls=40)
    runs = [(name, len(list(g))) for name, g in itertools.groupby(calls)]
    assert runs[:2] == [("slow", 7), ("fast", 7)]  # the estimates: 2 warm-up + 5 timed calls each
    # rounds: slow fast | fast slow | slow fast (the two middle blocks of each run back to back)
    # 10 ms / ~2 ms -> 5 calls, raised to min_calls 6; fast capped at max_calls 40
    assert runs[2:] == [("slow", 6), ("fast", 80), ("slow", 12), ("fast", 40)]
    assert t["slow"].num_samples == 3 * 3 and t["fast"].num_samples == 3 * 20
    assert t["slow"].median_ms >= 2.0 > t["fast"].median_ms


def test_result_writer_appends_json_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    w = ResultWriter(path)
    w.write(op="x", median_ms=1.5)
    w.write(op="y", median_ms=2.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["op"] for r in lines] == ["x", "y"]
    assert lines[0]["median_ms"] == 1.5 and "torch" in lines[0] and "device" in lines[0]


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    return dist.get_rank()


def test_run_distributed_returns_each_rank_result():
    out = run_distributed(2, _allreduce_rank, timeout_s=60)
    assert out == [(0, 3.0), (1, 3.0)]


def test_run_distributed_names_failing_rank():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(2, _fail_on_rank_one, timeout_s=60)
    assert list(info.value.failures) == [1]
    assert "planted failure" in str(info.value)
