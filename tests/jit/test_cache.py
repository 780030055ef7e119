"""moecomm.jit.cache: the cross-process lock (bounded wait naming the lock file), atomic publish, and
several processes writing one file at once without losing or corrupting an entry."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from moecomm.errors import MoeCommValueError
from moecomm.jit import cache

# Workers are forked: they only touch files (no torch work), and fork starts in milliseconds on 2 cores.
_ctx = multiprocessing.get_context("fork")


def test_lock_wait_is_bounded_and_names_the_lock_file(tmp_path):
    entry = tmp_path / "entry.json"
    with cache.lock(entry) as held:
        assert held == tmp_path / "entry.json.lock" and held.exists()
        # flock is per open file: a second open in this process conflicts like another process would
        t0 = time.monotonic()
        with pytest.raises(cache.CacheLockTimeout, match=r"could not take the lock .*entry\.json\.lock within 0\.2 s"):
            with cache.lock(entry, timeout_s=0.2):
                pass
        assert 0.15 < time.monotonic() - t0 < 5
    with cache.lock(entry, timeout_s=0.2):  # released: free again at once
        pass
    assert issubclass(cache.CacheLockTimeout, TimeoutError)


def _hold_lock(path, ready, seconds):
    with cache.lock(path):
        ready.set()
        time.sleep(seconds)


def test_lock_waits_for_another_process_then_takes_it(tmp_path):
    entry = tmp_path / "entry"
    ready = _ctx.Event()
    p = _ctx.Process(target=_hold_lock, args=(entry, ready, 0.5))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(cache.CacheLockTimeout):
            with cache.lock(entry, timeout_s=0.05):
                pass
        t0 = time.monotonic()
        with cache.lock(entry, timeout_s=30):
            waited = time.monotonic() - t0
        assert waited > 0.1
    finally:
        p.join(30)
    assert p.exitcode == 0


def test_atomic_write_replaces_through_a_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "blob.bin"
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b)))
    cache.atomic_write(path, b"one")
    cache.atomic_write(path, "two")
    assert path.read_bytes() == b"two"
    assert [b for _, b in replaced] == [path, path]
    assert all(Path(a).parent == path.parent and Path(a).name.endswith(".tmp") for a, _ in replaced)
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    cache.atomic_write(path, b"old")

    def boom(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["blob.bin"]


def test_cache_root_is_under_the_cache_dir_never_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    assert cache.cache_root("cuda") == tmp_path / "cuda" and cache.cache_root() == tmp_path
    import moecomm

    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(Path(moecomm.__file__).parent / "cachedir"))
    with pytest.raises(MoeCommValueError, match="MOECOMM_CACHE_DIR must be outside the installed package"):
        cache.cache_root("cuda")


def _merge_many(path, worker, rounds, start):
    start.wait(30)
    for i in range(rounds):
        def add(old, i=i):
            table = old if isinstance(old, dict) else {}
            table[f"w{worker}-{i}"] = [worker, i]
            table["shared"] = table.get("shared", 0) + 1  # the same entry, written by everyone
            return table

        cache.update_json(path, add)


def test_processes_merging_into_one_file_lose_nothing(tmp_path):
    """4 processes x 25 read-modify-writes of one JSON file, all started together: every entry
    survives, the shared counter counts every write, and the file is complete JSON throughout."""
    path = tmp_path / "table.json"
    workers, rounds = 4, 25
    start = _ctx.Event()
    procs = [_ctx.Process(target=_merge_many, args=(path, w, rounds, start)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    seen_valid = 0
    while any(p.is_alive() for p in procs):
        if path.exists():  # a reader never sees half a file
            json.loads(path.read_text())
            seen_valid += 1
        time.sleep(0.002)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    table = json.loads(path.read_text())
    assert table["shared"] == workers * rounds
    assert {k for k in table if k != "shared"} == {f"w{w}-{i}" for w in range(workers) for i in range(rounds)}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _create_once(path, counter, start):
    start.wait(30)

    def create():
        with open(counter, "a") as f:  # O_APPEND: each creation adds one line
            f.write("x\n")
        time.sleep(0.2)  # a slow compile: the others arrive while it runs
        return b"payload"

    cache.get_or_create(path, create)


def test_get_or_create_fills_an_entry_once_across_processes(tmp_path):
    path, counter = tmp_path / "k.bin", tmp_path / "count"
    start = _ctx.Event()
    procs = [_ctx.Process(target=_create_once, args=(path, counter, start)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert path.read_bytes() == b"payload" and counter.read_text() == "x\n"
    assert cache.get_or_create(path, lambda: b"never") == (path, False)
