"""RayWorkerGroup against an in-process local Ray cluster and against an existing one (address=).

One module: Ray costs seconds to start. The existing cluster is a `ray start --head --block` of our
own, on loopback, in a temporary directory, stopped by its pid (never `ray stop`, which stops every
Ray on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")

from moecomm.errors import MoeCommError, MoeCommValueError  # noqa: E402
from moecomm.apps.ep_demo import run_on_group  # noqa: E402
from moecomm.apps.ray import RayWorkerGroup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_START_TIMEOUT_S = 60
DRIVER_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        # workers must import this module's functions (pickled by reference) and this moecomm
        paths = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": paths}})
    yield
    if started:
        ray.shutdown()


def _rank_sum(scale):
    import torch
    import torch.distributed as dist

    import moecomm.distributed as mdist

    w = mdist.current_world()
    t = torch.tensor([float(w.rank)])
    dist.all_reduce(t)
    return w.rank, w.world_size, w.launcher, scale * t.item()


@pytest.mark.parametrize("n", [2, 4])
def test_group_runs_and_matches_reference(local_ray, n):
    with RayWorkerGroup(n, timeout_s=60) as group:
        assert [w["rank"] for w in group.worlds] == list(range(n))
        assert {w["launcher"] for w in group.worlds} == {"ray"}
        assert group.run(_rank_sum, 2) == [(r, n, "ray", 2.0 * n * (n - 1) / 2) for r in range(n)]
        stats = run_on_group(group, tokens_per_rank=33, hidden=64, num_experts=10, top_k=3, intermediate=32, iters=1)
        assert [s["rank"] for s in stats] == list(range(n))
        assert all(s["ok"] and s["launcher"] == "ray" for s in stats), stats
    assert ray.is_initialized()  # the group did not own Ray: the fixture's cluster stays up


def test_closed_group_refuses_to_run(local_ray):
    group = RayWorkerGroup(1, timeout_s=30)
    group.close()
    with pytest.raises(MoeCommValueError, match="the group must be open"):
        group.run(_rank_sum, 1)


def test_address_of_another_cluster_while_connected_is_refused(local_ray):
    with socket.socket() as s:  # something answers there, but it is not the cluster we are connected to
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MoeCommValueError, match=rf"address must name the cluster this process is already "
                                                    rf"connected to \(\S+\), got '127.0.0.1:{port}'"):
            RayWorkerGroup(1, address=f"127.0.0.1:{port}")
    assert ray.is_initialized()  # the existing connection is left alone


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_workers=0), "num_workers must be >= 1, got 0"),
    (dict(num_workers=2, gpus_per_worker=-1), "gpus_per_worker must be a number >= 0"),
    (dict(num_workers=2, backend="mpi"), "backend must be one of"),
    (dict(num_workers=2, address="head"), r"address must be 'auto', 'host:port' .* got 'head'"),
    (dict(num_workers=2, address="http://head:8265"), "8265 is the dashboard / job-submission address"),
    (dict(num_workers=2, address="head:port"), "got 'head:port'"),
    (dict(num_workers=2, address="auto", connect_timeout_s=0),
     "connect_timeout_s must be a number of seconds > 0, got 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MoeCommValueError, match=match):
        RayWorkerGroup(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (Ray's workers may leave the process group, not the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # exited meanwhile
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
                pids.append(int(entry.name))
    return pids


def _stop_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to our `ray start --block`, which stops the processes it started; then SIGKILL to any left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in _session_members(proc.pid):  # started with start_new_session: its session id is its pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    """An existing Ray cluster: (GCS address, environment for drivers). Loopback only, 2 CPUs."""
    if not Path("/proc").is_dir():
        pytest.skip("stopping our own Ray cluster reads /proc (Linux)")
    # Ray rewrites 127.0.0.1 to this node's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
    # with it, every Ray port of the head listens on loopback only (checked with ss), and drivers
    # need it too, or they dial the rewritten address.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="moecomm-ray-")  # short: Ray's unix sockets live under it (107-byte limit)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
           # 0: any free port; the fixed defaults (8265, 52365) would collide with another Ray here
           "--dashboard-port=0", "--dashboard-agent-listen-port=0"]
    if importlib.util.find_spec("grpc") is not None:  # ray[client] installed: its server starts too, on 10001
        cmd.append(f"--ray-client-server-port={_free_port()}")
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not start within {CLUSTER_START_TIMEOUT_S} s "
                            f"(exit code {proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_cluster(proc, temp_dir)


# A driver of its own (as a user's script would be): the pytest process may hold the in-process
# cluster of the tests above, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is read when Ray is imported.
_DRIVER = """
import json, sys
import torch, torch.distributed as dist
import moecomm.distributed as mdist
from moecomm.apps.ep_demo import run_on_group
from moecomm.apps.ray import RayWorkerGroup

def rank_sum(scale):
    w = mdist.current_world()
    t = torch.tensor([float(w.rank)])
    dist.all_reduce(t)
    return [w.rank, w.world_size, w.local_rank, w.launcher, scale * t.item()]

import os, ray
out = {}
with RayWorkerGroup(2, address=sys.argv[1], timeout_s=60, setup_timeout_s=60) as group:
    out["gcs"] = ray.get_runtime_context().gcs_address  # the cluster joined
    out["worlds"] = group.worlds
    out["sum"] = group.run(rank_sum, 2)
    out["moe"] = run_on_group(group, tokens_per_rank=33, hidden=64, num_experts=10, top_k=3, intermediate=32, iters=1)
out["after_close"] = ray.is_initialized()
os.environ["RAY_ADDRESS"] = sys.argv[1]  # as `ray job submit` sets it
with RayWorkerGroup(2, address="auto", timeout_s=60, setup_timeout_s=60) as group:  # RAY_ADDRESS, as in a Ray job
    out["auto"] = group.run(rank_sum, 3)
    out["gcs_auto"] = ray.get_runtime_context().gcs_address
print("RESULT " + json.dumps(out), flush=True)
"""


def test_existing_cluster_by_address(ray_cluster):
    address, env = ray_cluster
    env = dict(env, MOECOMM_TIMEOUT_S="60")
    try:
        p = subprocess.run([sys.executable, "-c", _DRIVER, address], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the driver did not finish within {DRIVER_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stdout + p.stderr
    out = json.loads(lines[0][len("RESULT "):])
    assert out["gcs"] == address
    assert [(w["rank"], w["local_rank"], w["launcher"], w["backend"]) for w in out["worlds"]] == [
        (0, 0, "ray", "gloo"), (1, 1, "ray", "gloo")]
    assert out["sum"] == [[r, 2, r, "ray", 2.0] for r in range(2)]  # 2 * (0 + 1)
    assert [s["rank"] for s in out["moe"]] == [0, 1]
    assert all(s["ok"] and s["launcher"] == "ray" for s in out["moe"]), out["moe"]  # equal to the reference
    assert out["after_close"] is False  # the group that connected also disconnected
    assert out["auto"] == [[r, 2, r, "ray", 3.0] for r in range(2)] and out["gcs_auto"] == address
    # the head listens on loopback only: its GCS port refuses connections on this host's network address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the outgoing interface
            host_ip = s.getsockname()[0]
    except OSError:  # no network: nothing but loopback to listen on
        host_ip = "127.0.0.1"
    if not host_ip.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((host_ip, int(address.rpartition(":")[2])), timeout=2).close()


def test_unreachable_address_fails_fast_naming_it():
    with socket.socket() as s:  # bound, not listening: connections to this port are refused
        s.bind(("", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(MoeCommError, match=rf"address='127.0.0.1:{port}' cannot be reached: a connection to "
                                               rf"\S+:{port} failed \(ConnectionRefusedError"):
            RayWorkerGroup(2, address=f"127.0.0.1:{port}", connect_timeout_s=5)
        assert time.monotonic() - t0 < 5  # refused at once, not Ray's minutes of retries
