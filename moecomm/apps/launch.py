"""Run a launcher (torchrun, mpiexec) as a child job of `moecomm demo`: the ranks speak, the launcher does not.

    rc = run_job(torchrun_command(4, ["-m", "moecomm.apps.ep_demo"], log_dir), env, timeout_s=300,
                 launcher="torchrun")

What the user sees of a job is its ranks' output (progress, rank 0's table, one line per failing
rank), passed through as it comes. The launcher's own output is launcher internals: torchrun logs
its bookkeeping and, when a rank fails or on Ctrl-C, prints its own traceback and a 30-line failure
report; MPICH's mpiexec prints a BAD TERMINATION banner. Those lines are dropped and replaced by one
line of ours (which rank ended first, with which code).

Ctrl-C: the job runs in a process group of its own, so that a terminal's SIGINT reaches only this
process, which then sends one SIGINT to the whole job (launcher and ranks), hides what they print
while they stop, waits a few seconds, kills what is left and returns 130. The job's temporary files
(torchrun's log folder, given as --log-dir) live in a folder that the caller removes afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

INTERRUPTED = 130  # the shell's code for "ended by SIGINT"
TIMED_OUT = 124  # timeout(1)'s code
_STOP_GRACE_S = 10.0  # after SIGINT, how long the job may take to stop before it is killed

# torchrun's log lines: "E1201 12:03:35.095000 20899 .../torch/distributed/elastic/...py:1002] ..."
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")
# from torchrun's first failure line: "failed (exitcode: 1) local_rank: 1 (pid: 20944) of binary: ..."
_TORCHRUN_FIRST_FAILURE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
# MPICH's banner: a row of '=' and "=   BAD TERMINATION ...", "=   EXIT CODE: 1" lines
_MPICH_BANNER = re.compile(r"^=+\s*$|^=   ")


def torchrun_command(n: int, program: Sequence[str], log_dir: str) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=n --log-dir=log_dir <program>``.

    Args:
        n: ranks on this node.
        program: what each rank runs, e.g. ["-m", "moecomm.apps.ep_demo", "--iters=3"].
        log_dir: torchrun's log folder (else it makes /tmp/torchelastic_* and never removes it).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            f"--log-dir={log_dir}", *program]


class _Forward(threading.Thread):
    """Copies one of the job's streams to ours, line by line, leaving the launcher's lines out."""

    def __init__(self, src, dst, launcher: str, muted: threading.Event):
        super().__init__(daemon=True)
        self.src, self.dst, self.launcher, self.muted = src, dst, launcher, muted
        self.first_failure: tuple[int, int] | None = None  # torchrun: (local rank, exit code)
        self._launcher_failed = False

    def run(self) -> None:
        for line in self.src:
            if self.muted.is_set() or self._dropped(line):
                continue
            try:
                self.dst.write(line)
                self.dst.flush()
            except (OSError, ValueError):  # our stream closed: keep draining so the job never blocks
                pass

    def _dropped(self, line: str) -> bool:
        if self.launcher == "torchrun":
            if _TORCHRUN_LOG.match(line):
                m = _TORCHRUN_FIRST_FAILURE.search(line)
                if m and self.first_failure is None:
                    self.first_failure = (int(m.group(2)), int(m.group(1)))
                if line[0] == "E" or "closing signal" in line or "death signal" in line:
                    self._launcher_failed = True  # what follows is torchrun's traceback and report
                return True
            return self._launcher_failed
        if self.launcher == "mpirun":
            return bool(_MPICH_BANNER.match(line))
        return False


def _signal_job(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``pid`` (Linux: /proc; elsewhere none). torchrun
    starts its workers in sessions of their own, so a signal to the launcher's group misses them."""
    children: dict[int, list[tuple[int, str]]] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        st = _stat(e)
        if st is not None:
            children.setdefault(st[0], []).append((e, st[1]))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c[0])
    return out


def _kill(tree: list[tuple[int, str]], sig: int) -> None:
    for pid, started in tree:
        st = _stat(pid)
        if st is None or st[1] != started:  # gone, or its number reused by another process
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_job(p: subprocess.Popen) -> None:
    """SIGINT to the whole job, a grace period, then SIGKILL to what is left of it (the launcher's
    group, and every process it started, found while it still runs)."""
    tree = _descendants(p.pid)
    _signal_job(p, signal.SIGINT)
    _kill(tree, signal.SIGINT)  # workers in sessions of their own get the SIGINT too
    try:
        p.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_job(p, signal.SIGKILL)  # ranks that outlived their launcher are in its group too
    _kill(tree, signal.SIGKILL)
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_job(cmd: Sequence[str], env: dict[str, str], *, timeout_s: float, launcher: str) -> int:
    """Run ``cmd`` (a launcher command), pass its ranks' output through, return its exit code.

    Args:
        cmd: the launcher command line.
        env: its environment.
        timeout_s: hard bound on the whole job; past it the job is stopped (TIMED_OUT returned).
        launcher: "torchrun" or "mpirun": whose lines to leave out.

    Returns:
        the launcher's exit code; INTERRUPTED (130) after Ctrl-C (the job stopped, nothing printed:
        the caller says it); TIMED_OUT (124) past timeout_s. A failure is reported in one line on stderr.
    """
    muted = threading.Event()
    p = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, start_new_session=True)
    fwd = [_Forward(p.stdout, sys.stdout, launcher, muted), _Forward(p.stderr, sys.stderr, launcher, muted)]
    for f in fwd:
        f.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                rc = p.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    muted.set()
                    _stop_job(p)
                    print(f"[demo] {launcher} did not finish within {timeout_s:.0f} s: stopped it", file=sys.stderr,
                          flush=True)
                    return TIMED_OUT
    except KeyboardInterrupt:
        muted.set()  # what the job prints while it stops is tracebacks of interrupted ranks
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        try:
            _stop_job(p)
        finally:
            signal.signal(signal.SIGINT, previous)
        return INTERRUPTED
    finally:
        for f in fwd:
            f.join(timeout=2)
    first = next((f.first_failure for f in fwd if f.first_failure is not None), None)
    if rc != 0 and first is not None:
        print(f"[demo] {launcher}: local rank {first[0]} ended first, with exit code {first[1]}; the others were "
              "stopped", file=sys.stderr, flush=True)
    return rc


__all__ = ["INTERRUPTED", "TIMED_OUT", "run_job", "torchrun_command"]
