"""`moecomm demo` jobs started by a launcher: Ctrl-C ends them cleanly, and they leave no temporary files.

Ctrl-C: a terminal sends SIGINT to the foreground process group; here the demo runs in a session of its
own and the test signals that group, as a terminal would. Before, torchrun and its 4 ranks each printed
a traceback (136 lines). Temporary files: torchrun made a /tmp/torchelastic_* folder per run and a
local Ray a /tmp/ray/session_* folder, never removed; each run here gets a fresh TMPDIR, which must be
as empty afterwards as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--tokens-per-rank=8", "--hidden=32", "--intermediate=16", "--iters=1", "--timeout=60"]
TIMEOUT_S = 240


def _env(tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=str(tmpdir))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    for var in ("RAY_TMPDIR", "MOECOMM_BACKEND"):
        env.pop(var, None)
    return env


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pid.isdigit() and marker in cmd and "moecomm" in cmd:
            found.append(int(pid))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_ctrl_c_during_a_torchrun_demo_is_a_short_clean_exit(tmp_path):
    seed = str(40000 + os.getpid() % 10000)  # marks this test's processes
    try:
        _ctrl_c_demo(tmp_path, seed)
    finally:  # whatever failed (a timeout included), no rank of a 100000-step demo outlives the test
        for pid in _processes_with(f"--seed={seed}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _ctrl_c_demo(tmp_path, seed: str) -> None:
    cmd = [sys.executable, "-m", "moecomm.cli", "demo", "-n", "4", "--launcher", "torchrun", "--iters=100000",
           f"--seed={seed}", "--timeout=60", "--hidden=64", "--intermediate=32", "--tokens-per-rank=64"]
    # SIGINT as a terminal leaves it: a suite started as a background job of a non-interactive shell
    # (`cmd &`) inherits SIGINT ignored, and so would the demo, which would then run to its timeout
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        deadline = time.monotonic() + 120
        for line in p.stdout:  # wait until the ranks are at work
            lines.append(line)
            if "running 1 checked" in line or time.monotonic() > deadline:
                break
        assert any("running 1 checked" in line for line in lines), "".join(lines) + p.stderr.read()
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        t0 = time.monotonic()
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (out, err)
    assert err.strip() == "moecomm demo: interrupted", err
    assert "Traceback" not in out + err and len(out.splitlines()) <= 2, out
    assert took < 30, took
    # the ranks get the same SIGINT and exit on their own; on a loaded 2-core machine that can take
    # a few seconds after the demo returned: wait for it, bounded
    deadline = time.monotonic() + 20
    while _processes_with(f"--seed={seed}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(f"--seed={seed}") == [], "ranks or torchrun outlived the demo by 20 s"
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)  # torchrun's log folder went too


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_a_demo_leaves_the_temporary_directory_as_it_found_it(launcher, tmp_path):
    if launcher == "ray":
        pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    # short: Ray's socket paths under TMPDIR/ray/session_*/sockets/ must fit AF_UNIX's 107 bytes
    tmpdir = Path(tempfile.mkdtemp(prefix="mc-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        (tmpdir / "already-here").write_text("x")  # what was there stays
        p = subprocess.run([sys.executable, "-m", "moecomm.cli", "demo", "-n", "2", "--launcher", launcher, *SMALL],
                           cwd=tmp_path, env=_env(tmpdir), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert f"launcher {launcher})" in p.stdout, p.stdout
        assert sorted(os.listdir(tmpdir)) == ["already-here"], sorted(os.listdir(tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
