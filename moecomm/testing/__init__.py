"""Helpers shared by tests and benchmarks: timing, result records, Hopper compile checks, multi-process runs."""

from .aot import compile_for_hopper, run_without_interpreter
from .distributed import DistributedTestError, free_port, run_distributed
from .results import ResultWriter, environment_info
from .timing import Timing, bench, bench_interleaved, bench_sustained, graph_bench, host_us

__all__ = [
    "DistributedTestError",
    "ResultWriter",
    "Timing",
    "bench",
    "bench_interleaved",
    "bench_sustained",
    "compile_for_hopper",
    "environment_info",
    "free_port",
    "graph_bench",
    "host_us",
    "run_distributed",
    "run_without_interpreter",
]
