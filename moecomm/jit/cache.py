"""The on-disk cache every kernel family shares: a cross-process file lock and atomic publish.

Ranks of one job start at once and all want the same tuned configuration or compiled kernel. Two
rules keep them from corrupting or duplicating each other's work:

- Publish atomically: an entry is written to a temporary file in the same directory, fsync'ed, then
  renamed over its name (os.replace is atomic within one file system), so a reader sees the old file
  or the new one, never half of one. A crash leaves at worst a stray ``*.tmp`` file.
- Read-modify-write and expensive fills under a lock: ``lock(path)`` takes an exclusive fcntl.flock
  on ``<path>.lock``. Without it, two processes merging their entries into one JSON file each write
  the file they read plus their own entry, and one entry is lost; two processes compiling the same
  kernel both pay for it. The wait is bounded (MOECOMM_TIMEOUT_S, 300 s by default): a holder that
  hangs makes the others raise an error naming the lock file instead of hanging the job. flock locks
  die with their process, so a crashed holder never leaves a stale lock behind.

Everything lives under ``cache_root()`` (MOECOMM_CACHE_DIR, ``~/.cache/moecomm``), never inside the
installed package (it may be read-only, and is shared by every user of the environment).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import _env
from ..errors import MoeCommError, MoeCommValueError


class CacheLockTimeout(MoeCommError, TimeoutError):
    """Another process held a cache lock for longer than the bounded wait."""


_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cache_root(kind: str = "") -> Path:
    """The cache directory of one kernel family (``cache_root("gemm")``), or the root itself.

    Raises MoeCommValueError when MOECOMM_CACHE_DIR points inside the installed moecomm package.
    """
    root = _env.cache_dir()
    resolved = root.resolve()
    if resolved == _PACKAGE_DIR or _PACKAGE_DIR in resolved.parents:
        raise MoeCommValueError(f"moecomm cache: MOECOMM_CACHE_DIR must be outside the installed package "
                                f"{_PACKAGE_DIR}, got {root}")
    return root / kind if kind else root


@contextlib.contextmanager
def lock(path: str | os.PathLike, timeout_s: float | None = None, poll_s: float = 0.01) -> Iterator[Path]:
    """Hold the exclusive cross-process lock of ``path`` (the file ``<path>.lock``) inside the block.

    Args:
        path: the cache entry the lock guards (it need not exist).
        timeout_s: the longest wait for another holder; default MOECOMM_TIMEOUT_S.
        poll_s: first sleep between tries (doubles up to 0.2 s).

    Raises CacheLockTimeout (a TimeoutError) naming the lock file when the wait runs out.
    The lock is per open file, not per thread: two threads of one process must not share one.
    """
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    wait = _env.timeout_s() if timeout_s is None else float(timeout_s)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        sleep = poll_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            now = time.monotonic()
            if now >= deadline:
                raise CacheLockTimeout(
                    f"moecomm cache: could not take the lock {lock_path} within {wait:g} s: another process holds "
                    "it (compiling or tuning the same entry). If no moecomm process is running, delete that file; "
                    "MOECOMM_TIMEOUT_S sets the wait")
            time.sleep(min(sleep, max(deadline - now, 0.0)))
            sleep = min(sleep * 2, 0.2)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Publish ``data`` at ``path`` atomically: a temp file in the same directory, fsync, os.replace.

    Readers see the previous file or the complete new one. Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (best effort)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value at ``path``; FileNotFoundError / ValueError as json raises them."""
    return json.loads(Path(path).read_text())


def update_json(path: str | os.PathLike, update: Callable[[Any], Any], *, timeout_s: float | None = None,
                indent: int | None = 1) -> Any:
    """Read-modify-write one JSON file under its lock, published atomically; returns the new value.

    ``update(old)`` receives the current value (None when the file is missing or unreadable) and
    returns the value to write. Concurrent callers are serialised, so none loses another's change.
    """
    path = Path(path)
    with lock(path, timeout_s):
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        new = update(old)
        atomic_write(path, json.dumps(new, indent=indent, sort_keys=True))
    return new


def get_or_create(path: str | os.PathLike, create: Callable[[], bytes], *,
                  timeout_s: float | None = None) -> tuple[Path, bool]:
    """The cache file ``path``, created by ``create()`` under its lock when missing.

    Returns (path, created). A process that finds the file never takes the lock; processes that
    miss wait on the lock, and all but the first then find the file the first published.
    """
    path = Path(path)
    if path.is_file():
        return path, False
    with lock(path, timeout_s):
        if path.is_file():  # another process published it while we waited
            return path, False
        atomic_write(path, create())
    return path, True


def run_compiler(cmd: list[str], out: Path, error: type[Exception], who: str, src: Path, timeout_s: float) -> bytes:
    """Run a compiler command that writes ``out``; return the file's bytes. Any failure raises
    ``error`` with the command line and the compiler's output (``who``: the module, for the message)."""
    import subprocess

    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{who}: could not run the compiler ({exc})\n$ {' '.join(cmd)}") from exc
    if res.returncode != 0 or not out.is_file():
        raise error(f"{who}: compiling {src} failed (exit {res.returncode})\n$ {' '.join(cmd)}\n"
                    f"{(res.stderr + res.stdout).strip()}")
    return out.read_bytes()
