"""Naming the rank that failed: heartbeats and failure reports in the rendezvous store.

Without this, a rank whose peer died sees only "Connection closed by peer" or a timeout, and the
user must read N logs to find which rank broke. Each rank instead:

- publishes a heartbeat (its wall-clock time) under ``moecomm/hb/<rank>`` every
  HEARTBEAT_INTERVAL_S, from a daemon thread with its own store connection (so it never races the
  process group's use of the store);
- on a bad input, calls ``report_failure(exc)`` before it exits, which writes its error under
  ``moecomm/failed/<rank>``.

When a collective fails or times out, ``explain_failure(group, what, exc)`` reads those keys and
raises RankFailureError: "rank 1: all_to_all_single failed; rank 3 stopped responding (last
heartbeat 4.1 s ago)" or "rank 1: ...; rank 3 reported: MoeCommValueError: ...". Heartbeat ages
compare wall clocks of different hosts: on a cluster they are as exact as its clock sync (NTP:
milliseconds), far below the 3 s staleness threshold.
"""

# W = world_size; store keys: moecomm/hb/<rank> (wall-clock seconds), moecomm/failed/<rank> (text)

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from ..errors import MoeCommError

HEARTBEAT_INTERVAL_S = 0.5
# a heartbeat older than this means the rank is dead or wedged (6 missed beats: a loaded 2-core
# CI machine can delay a daemon thread by a second, never by three)
STALE_AFTER_S = 3.0
_PREFIX = "moecomm/"
# the report of a rank that failed only because another one did (see report_failure)
_SECONDARY = "RankFailureError: stopped because of rank(s)"


class RankFailureError(MoeCommError, RuntimeError):
    """A collective failed because another rank died, timed out or reported an error.

    Attributes:
        failed_ranks: the global ranks found dead or reporting an error (may be empty if unknown).
    """

    def __init__(self, message: str, failed_ranks: list[int]):
        super().__init__(message)
        self.failed_ranks = failed_ranks


class _Health:
    """This process's store connections and heartbeat thread (one per process)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, agent_store: bool):
        self.agent_store = agent_store  # torchrun's agent hosts the store, not rank 0
        self.rank = rank
        self.world_size = world_size
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: Any = None

    def _client(self, timeout_s: float) -> dist.TCPStore:
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"moecomm-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        try:
            # a short timeout: if the store's host goes away, a beat fails within 2 s and the thread
            # ends, instead of sitting in C++ until interpreter exit (which aborts the process)
            store = self._client(min(self.timeout_s, 2.0))
            while not self._stop.is_set():
                store.set(f"{_PREFIX}hb/{self.rank}", repr(time.time()))
                self._stop.wait(HEARTBEAT_INTERVAL_S)
        except Exception:  # the store host (rank 0) went away: nothing left to beat to
            return

    def reader(self) -> dist.TCPStore:
        # a short timeout: when the store host is dead, reading must fail fast, not wait 300 s
        if self._reader is None:
            self._reader = self._client(min(self.timeout_s, 5.0))
        return self._reader

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_INTERVAL_S + 3.0)
        self._thread = None
        self._reader = None


_HEALTH: _Health | None = None
# set once a collective failed in this process: shutdown() then skips its closing barrier
_FAILURE_SEEN = False


def failure_seen() -> bool:
    """True once explain_failure or report_failure ran in this process (the world is broken)."""
    return _FAILURE_SEEN


def start_health(host: str, port: int, rank: int, world_size: int, timeout_s: float, agent_store: bool = False) -> None:
    """Start this rank's heartbeat against the store at host:port (called by moecomm.distributed.init).

    Args:
        agent_store: True when torchrun's agent hosts the store (it outlives rank 0).
    """
    global _HEALTH, _FAILURE_SEEN
    stop_health()
    _FAILURE_SEEN = False
    _HEALTH = _Health(host, port, rank, world_size, timeout_s, agent_store)
    _HEALTH.start()


def stop_health() -> None:
    global _HEALTH
    if _HEALTH is not None:
        _HEALTH.stop()
    _HEALTH = None


def report_failure(exc: BaseException | str) -> None:
    """Publish this rank's error so that the other ranks' explain_failure names it.

    Call it before a rank exits on an error the others cannot see (a bad input on this rank only).
    Never raises: reporting is best effort and must not mask ``exc``.

    Args:
        exc: the exception (or a message) to publish, as "<type>: <message>".
    """
    global _FAILURE_SEEN
    _FAILURE_SEEN = True
    if _HEALTH is None:
        return
    if isinstance(exc, RankFailureError):
        # a consequence, not a cause: publish only whom it blames. Publishing its whole message (which
        # quotes the reports it read) made every rank quote every other's quotes: 150 KB from 9 ranks.
        text = f"{_SECONDARY} {exc.failed_ranks or 'unknown'}"
    else:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    try:
        store = _HEALTH.reader()
        store.set(f"{_PREFIX}failed/{_HEALTH.rank}", text.splitlines()[0][:2000] if text else "unknown error")
    except Exception:
        pass


def _scan(ranks: list[int]) -> tuple[dict[int, str], dict[int, float], str | None]:
    """(reported errors, heartbeat ages of stale ranks, store problem) for ``ranks``."""
    try:
        if _HEALTH is None:
            raise RuntimeError("moecomm.distributed health is not running")
        store = _HEALTH.reader()
        reported: dict[int, str] = {}
        stale: dict[int, float] = {}
        now = time.time()
        keys_failed = [f"{_PREFIX}failed/{r}" for r in ranks]
        keys_hb = [f"{_PREFIX}hb/{r}" for r in ranks]
        for r, kf, kh in zip(ranks, keys_failed, keys_hb):
            if r == _HEALTH.rank:
                continue
            if store.check([kf]):
                reported[r] = store.get(kf).decode(errors="replace")
            if store.check([kh]):
                age = now - float(store.get(kh).decode())
                if age > STALE_AFTER_S:
                    stale[r] = age
            else:
                stale[r] = float("inf")  # never beat: it died during start-up
        return reported, stale, None
    except Exception as exc:
        return {}, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def explain_failure(group: dist.ProcessGroup | None, what: str, exc: BaseException | None = None) -> None:
    """Raise RankFailureError naming the rank(s) that caused ``what`` to fail.

    Call it from an ``except`` around a collective (or use ``watch``). Reads the rendezvous store:
    error reports of ranks of ``group``, then heartbeats; a killed rank's heartbeat needs up to
    STALE_AFTER_S to go stale, so this waits up to that long for evidence. Without the health
    mechanism (no moecomm.distributed.init) it returns and the caller re-raises the original error.

    Args:
        group: the process group of the failed collective (None: the default group).
        what: the operation that failed, e.g. "EPDispatcher.dispatch: all_to_all_single".
        exc: the original exception, chained as the cause.

    Raises:
        RankFailureError, e.g. "rank 1: all_to_all_single failed; rank 3 stopped responding
        (last heartbeat 4.1 s ago)".
    """
    global _FAILURE_SEEN
    _FAILURE_SEEN = True
    if _HEALTH is None:
        return
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(_HEALTH.world_size))
    except Exception:  # the group was already torn down: look at the whole world
        ranks = list(range(_HEALTH.world_size))
    deadline = time.monotonic() + STALE_AFTER_S + 2 * HEARTBEAT_INTERVAL_S
    while True:
        reported, stale, store_problem = _scan(ranks)
        if reported or stale or store_problem or time.monotonic() > deadline:
            break
        time.sleep(HEARTBEAT_INTERVAL_S / 2)
    me = _HEALTH.rank
    cause = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc is not None else ""
    # the causes first; ranks that only stopped because of another are named only when no rank
    # reported a cause of its own
    causes = [r for r in sorted(reported) if not reported[r].startswith(_SECONDARY)]
    parts = [f"rank {r} reported: {reported[r]}" for r in causes or sorted(reported)]
    for r in sorted(stale):
        if r in reported:
            continue
        age = stale[r]
        parts.append(f"rank {r} stopped responding (no heartbeat ever)" if age == float("inf")
                     else f"rank {r} stopped responding (last heartbeat {age:.1f} s ago)")
    if store_problem is not None and _HEALTH.agent_store:
        parts.append(f"the rendezvous store (hosted by torchrun's agent) is unreachable, so the launcher "
                     f"most likely stopped ({store_problem})")
        failed = []
    elif store_problem is not None:
        parts.append(f"the rendezvous store (hosted by rank 0) is unreachable, so rank 0 most likely stopped "
                     f"({store_problem})")
        failed = [0]
    else:
        failed = sorted(set(causes or reported) | (set(stale) - set(reported)))
    if not parts:
        parts.append("no rank reported an error and every heartbeat is fresh (a rank is slow or stuck, "
                     "or the ranks called collectives in different orders)")
    raise RankFailureError(f"rank {me}: {what} failed{cause}; " + "; ".join(parts), failed) from exc


@contextlib.contextmanager
def watch(group: dist.ProcessGroup | None, what: str) -> Iterator[None]:
    """Turn a failing collective inside the block into a RankFailureError naming the culprit.

    Example:
        with watch(group, "EPDispatcher.dispatch: all_to_all_single"):
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    """
    try:
        yield
    except MoeCommError:
        raise  # our own errors (bad input on this rank) are already clear
    except Exception as exc:
        explain_failure(group, what, exc)
        raise
