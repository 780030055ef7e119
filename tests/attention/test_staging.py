"""The plan metadata's staging ring (_common.Staging), driven on a CPU through stand-ins for its CUDA
calls: a pinned host buffer is never rewritten while a copy out of it may still be in flight (across
stream switches, reallocations and plans that raised between ensure() and upload()), and the event
calls stay at one record and one query per _GROUP plans (each is a driver call: several us of host
time on the GPU host, more than most of plan()'s Python).

The stand-in GPU: each stream completes its copies in order, a random number per plan (sometimes
none: a host far ahead); an event marks its stream's queue when recorded; synchronize() waits,
i.e. completes that stream's work up to the mark.
"""

from __future__ import annotations

import random
import types

import pytest
import torch

from moecomm.attention._common import Staging


class FakeStream:
    def __init__(self, name: str):
        self.name, self.queued, self.done = name, 0, 0


class FakeEvent:
    def __init__(self, log: list):
        self.log, self.stream, self.mark = log, None, 0

    def record(self, stream: FakeStream) -> None:
        self.log.append("record")
        self.stream, self.mark = stream, stream.queued

    def query(self) -> bool:
        self.log.append("query")
        return self.stream.done >= self.mark

    def synchronize(self) -> None:
        self.log.append("synchronize")
        self.stream.done = max(self.stream.done, self.mark)


class FakeStaging(Staging):
    """Staging with the CUDA calls replaced (the class docstring names them)."""

    def __init__(self, size: int, streams: list[FakeStream]):
        self.log: list = []
        self.streams = streams
        self.current = streams[0]
        self.in_flight: dict = {}  # id of a host buffer -> (stream, position in its queue) of its last copy
        super().__init__(types.SimpleNamespace(type="cuda", index=0), size)

    def _new_host(self, size):
        return torch.zeros(size, dtype=torch.int32)

    def _new_dev(self, size):
        return torch.zeros(size, dtype=torch.int32)

    def _new_event(self):
        return FakeEvent(self.log)

    def _copy(self, dst, src):
        dst.copy_(src)
        self.current.queued += 1
        self.in_flight[src.untyped_storage().data_ptr()] = (self.current, self.current.queued)

    def _current_handle(self):
        return self.current.name

    def _current_stream(self):
        return self.current


def drive(st: FakeStaging, plans: int, seed: int, switch: float = 0.05, skip_upload: float = 0.05,
          progress=(0, 0, 1, 2, 8)) -> None:
    """plans x (the GPU progresses; maybe a stream switch; ensure; check the buffer is free; write;
    maybe upload; check the device copy)."""
    rng = random.Random(seed)
    for p in range(plans):
        for s in st.streams:
            s.done = min(s.queued, s.done + rng.choice(progress))
        if rng.random() < switch:
            st.current = rng.choice(st.streams)
        grow = rng.random() < 0.01 and st.size < 4096  # now and then a reallocation (it doubles the size)
        size = st.size + 1 if grow else rng.choice([100, 200, 256])
        st.ensure(size)
        stream, mark = st.in_flight.get(st.host.untyped_storage().data_ptr(), (None, 0))
        assert stream is None or stream.done >= mark, f"plan {p}: host buffer {st._slot} rewritten while its copy is in flight"
        st.host_np[:size] = p
        if rng.random() < skip_upload:  # a plan that raised after ensure()
            continue
        st.upload(size)
        assert int(st.dev[0]) == p and int(st.dev[size - 1]) == p


@pytest.mark.parametrize("seed", range(4))
def test_no_buffer_rewritten_in_flight(seed):
    st = FakeStaging(256, [FakeStream("a"), FakeStream("b"), FakeStream("c")])
    drive(st, 3000, seed)
    assert "synchronize" in st.log  # the host did run ahead of the stand-in GPU


def test_guards_are_what_keeps_buffers_safe(monkeypatch):
    """The same drive with the group guard taken away fails: the test above checks something."""
    monkeypatch.setattr(FakeStaging, "_enter_group", lambda self, group: None)
    with pytest.raises(AssertionError, match="rewritten while its copy is in flight"):
        drive(FakeStaging(256, [FakeStream("a"), FakeStream("b")]), 3000, 0)


def test_one_record_and_one_query_per_group():
    """One stream, a GPU that keeps up: per _GROUP plans one event record and one query, no wait."""
    st = FakeStaging(256, [FakeStream("a")])
    plans = 400
    drive(st, plans, 0, switch=0.0, skip_upload=0.0, progress=(1000,))
    records, queries = st.log.count("record"), st.log.count("query")
    assert records <= plans // Staging._GROUP + 1 and queries <= plans // Staging._GROUP + 1, (records, queries)
    assert "synchronize" not in st.log
