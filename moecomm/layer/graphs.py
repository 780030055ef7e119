"""CUDA graphs of a layer's forward, one per token count, captured once that count repeats.

# T = num_tokens

A decode step runs a layer on a handful of tokens: its GPU work takes tens of microseconds, while
Python and about ten kernel launches take several hundred. Replaying a CUDA graph costs one launch.
GraphRunner keeps one graph per T (captured the second time a T is seen, so a one-off prompt length
never pays for a capture) and replays it: copy x into the graph's input, replay, clone the output.

    runner = GraphRunner()
    y = runner(x, key, fn)          # fn(x [T, H]) -> [T, H], no host sync inside
    if y is None:                   # not captured (yet): run it directly
        y = fn(x)

The caller decides when a graph may be used (CUDA tensor, no autograd, not while torch.compile
traces or another graph is captured) and passes ``key``, something that changes when the tensors fn
reads are replaced (their data pointers): a new key drops every graph, so a graph never reads freed
weights. Updating weights in place needs nothing: the graph reads the same memory.

Graphs of one runner share a memory pool: they replay one at a time on the caller's stream, so
their intermediates may share memory; the outputs they return are clones, so callers own them. A
runner must not be replayed from two streams at once (a layer is not run concurrently with itself).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from ..jit.backend import warn_once

_MAX_SEEN = 4096  # distinct token counts remembered before the count table is cleared


class _Entry:
    __slots__ = ("graph", "x", "y")

    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, y: torch.Tensor):
        self.graph, self.x, self.y = graph, x, y


class GraphRunner:
    """Per-token-count CUDA graphs of ``fn``.

    Args:
        max_graphs: graphs kept at once; the least recently used is dropped beyond it.
        min_calls: a T is captured at its min_calls-th call (earlier calls return None).
        name: for the warning logged if a capture fails (graphs are then off for this runner).
    """

    def __init__(self, *, max_graphs: int = 16, min_calls: int = 2, name: str = "moecomm"):
        self.max_graphs = max_graphs
        self.min_calls = min_calls
        self.name = name
        self.failed: str | None = None  # why graphs are off, after a capture failed
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._seen: dict[tuple, int] = {}
        self._key: Any = None
        self._pool = None
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    def __deepcopy__(self, memo):  # a copied layer owns different tensors: it starts without graphs
        return GraphRunner(max_graphs=self.max_graphs, min_calls=self.min_calls, name=self.name)

    def __getstate__(self):
        return {"max_graphs": self.max_graphs, "min_calls": self.min_calls, "name": self.name}

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (their memory returns to the caching allocator)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def __call__(self, x: torch.Tensor, key: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """fn(x) replayed from a graph, or None when there is no graph for x's shape (yet).

        fn: x -> tensor; launches kernels only (no host sync, no data-dependent shapes); the same
        function for the same key.
        """
        if self.failed is not None:
            return None
        if key != self._key:
            self.clear()
            self._key = key
        shape = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(shape)
        if entry is None:
            n = self._seen.get(shape, 0) + 1
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            self._seen[shape] = n
            if n < self.min_calls:
                return None
            entry = self._capture(x, shape, fn)
            if entry is None:
                return None
        else:
            self._graphs.move_to_end(shape)
        entry.x.copy_(x)
        entry.graph.replay()
        return entry.y.clone()

    def _capture(self, x: torch.Tensor, shape: tuple, fn) -> _Entry | None:
        # Static tensors are made outside inference mode, so that the graph also serves callers in
        # plain no_grad mode (an inference tensor cannot be written to outside inference mode).
        with torch.inference_mode(False), torch.no_grad():
            static_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            static_x.copy_(x)
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                fn(static_x)  # warm-up: kernels compile and launch configs are chosen outside the capture
            torch.cuda.current_stream(x.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    static_y = fn(static_x)
            except Exception as exc:  # a capture that fails must not fail the forward: run it directly
                self.failed = f"{type(exc).__name__}: {exc}"
                self.clear()
                warn_once(f"graph-capture-{self.name}", f"{self.name}: CUDA-graph capture failed ({self.failed}); "
                          "running every forward directly from now on")
                return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        entry = _Entry(graph, static_x, static_y)
        self._graphs[shape] = entry
        self.captures += 1
        return entry
