"""RayWorkerGroup: Ray actors that form one torch.distributed process group and run functions on it.

# W = num_workers (ranks), R = rank

    from moecomm.ray import RayWorkerGroup
    with RayWorkerGroup(4) as group:                   # Ray started in-process, 4 gloo ranks
        print(group.run(my_fn, 123))                   # [my_fn(123) on rank 0, ..., on rank 3]
        stats = run_on_group(group, tokens_per_rank=512)   # moecomm.apps.ep_demo: the EP layer, checked

Set-up: the driver asks actor 0 for its node's IP and a free port, hands that rendezvous address and
every actor's rank to the actors, and each actor calls moecomm.distributed.init() (launcher "ray") with
torchrun's variables set. Local ranks count the actors on each node. With gpus_per_worker > 0 Ray
restricts each actor to its own GPUs (CUDA_VISIBLE_DEVICES), so each actor's device is cuda:0 and
its LOCAL_RANK is 0.

An existing cluster (address=): before ray.init the driver resolves the address the way Ray will
("auto" reads RAY_ADDRESS or finds the local cluster; "localhost"/"127.0.0.1" become this node's IP
unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and opens one TCP connection to it, bounded by
connect_timeout_s: ray.init on an address nobody answers retries for minutes.

Ray is imported only when a RayWorkerGroup is created (importing moecomm.ray costs nothing).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..errors import MoeCommError, MoeCommTypeError, MoeCommValueError, check_positive_int

_OP = "RayWorkerGroup"
_ADDRESS_FORMS = "'auto', 'host:port' (the head's GCS port, 6379 by default) or 'ray://host[:port]' (Ray Client)"
_RAY_CLIENT_PORT = 10001


def _parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "ray://host[:port]"; None for "auto". Raises on anything else."""
    if address == "auto":
        return None
    rest, default_port = address, None
    if address.startswith("ray://"):
        rest, default_port = address[len("ray://"):].rstrip("/"), _RAY_CLIENT_PORT
    elif "://" in address:
        hint = (" (http://...:8265 is the dashboard / job-submission address; RayWorkerGroup joins "
                "the GCS at host:6379, or use 'auto' inside `ray job submit`)" if address.startswith("http") else "")
        raise MoeCommValueError(f"{_OP}: address must be {_ADDRESS_FORMS}, got {address!r}{hint}")
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port ("host", "[::1]")
        host, port = rest, ""
    host = host.strip("[]")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoeCommValueError(f"{_OP}: address must be {_ADDRESS_FORMS}, got {address!r}")
    return host, int(port)


def _dial_address(address: str) -> tuple[str, int] | None:
    """The (host, port) that ray.init(address=address) will connect to, or None if Ray finds none.

    Mirrors Ray's own resolution (RAY_ADDRESS for "auto", localhost rewritten to this node's IP) so
    that the reachability check tests what Ray will dial, not what the user typed.
    """
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address.startswith("ray://"):
        return _parse_address(address)
    given = _parse_address(address)  # format errors before Ray's
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # Ray's private helper moved: check the address as given
        return given
    try:
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError as exc:  # "auto" and no cluster on this node
        raise MoeCommError(f"{_OP}: address='auto' found no running Ray cluster ({exc}); start one with "
                           "`ray start --head` or pass its address") from exc
    except ValueError as exc:
        raise MoeCommValueError(f"{_OP}: address must be {_ADDRESS_FORMS}, got {address!r} ({exc})") from exc
    return _parse_address(resolved) if resolved else given


def _check_reachable(address: str, dial: tuple[str, int], timeout_s: float) -> None:
    """One TCP connection to the address Ray will dial, bounded by timeout_s; raises MoeCommError naming it."""
    host, port = dial
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = f"no answer in {timeout_s:g} s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    given = repr(address)
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        given += f" (RAY_ADDRESS={os.environ['RAY_ADDRESS']!r})"
    msg = (f"{_OP}: the Ray cluster at address={given} cannot be reached: a connection to {host}:{port} failed "
           f"({reason}); is the head running there (`ray status --address {host}:{port}`)?")
    effective = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    typed = _parse_address(effective) if effective else None
    if typed is not None and typed[0] in ("localhost", "127.0.0.1", "::1") and host != typed[0]:
        msg += (f" Ray dials localhost addresses at this node's IP ({host}): a head that listens on loopback "
                "only (ray start --node-ip-address=127.0.0.1 with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) needs "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in this process too, set before Ray is imported")
    raise MoeCommError(msg)


def _ray_root() -> str:
    """Where a Ray started in this process keeps its sessions: $RAY_TMPDIR or $TMPDIR (else /tmp), + /ray."""
    import tempfile

    return os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")


def _session_dir(ray: Any) -> str | None:
    try:  # no public API names the session folder; this one has been stable since Ray 1.x
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        return None


def _remove_session(session_dir: str, keep_root: bool) -> None:
    """Remove the session folder of the Ray this group started and stopped (logs, sockets: ~0.2 MB a
    run, never removed by Ray), its session_latest link, and the ray/ folder if the group made it."""
    import shutil

    root = os.path.dirname(session_dir)
    shutil.rmtree(session_dir, ignore_errors=True)
    latest = os.path.join(root, "session_latest")
    if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(session_dir):
        os.unlink(latest)
    if not keep_root:
        try:
            os.rmdir(root)  # only if empty: another Ray may have started meanwhile
        except OSError:
            pass


class _Worker:
    """One rank: a Ray actor holding its moecomm.distributed World."""

    def node_address(self) -> tuple[str, int]:
        """(this node's IP as Ray sees it, a free TCP port on it): used for rank 0 only."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ip, port

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def setup(self, rank: int, world_size: int, local_rank: int, local_world_size: int, addr: str, port: int,
              backend: str | None, timeout_s: float | None, env: dict[str, str]) -> dict:
        os.environ.update(env)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
        from ..distributed import init

        w = init(backend=backend, timeout_s=timeout_s, launcher="ray")
        return dict(rank=w.rank, world_size=w.world_size, local_rank=w.local_rank, device=str(w.device),
                    backend=w.backend, launcher=w.launcher)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        from ..distributed import report_failure

        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            report_failure(exc)  # the other ranks' errors then name this rank
            raise

    def shutdown(self) -> None:
        from ..distributed import shutdown

        shutdown()


class RayWorkerGroup:
    """W Ray actors forming one process group (gloo on CPUs, NCCL when each has a GPU).

    Args:
        num_workers: W, number of actors = ranks.
        gpus_per_worker: GPUs Ray reserves for each actor (0: CPU only, gloo).
        address: an existing cluster: "auto" (RAY_ADDRESS, as set by `ray job submit`, else the
            cluster started on this node by `ray start`), "host:port" (the head's GCS port, 6379 by
            default) or "ray://host:10001" (Ray Client, needs ray[client]). Its workers must be able
            to import moecomm. None starts Ray in this process (ray.init(num_cpus=...,
            include_dashboard=False), RAY_AUTH_MODE=disabled unless set). If this process is already
            connected to Ray, that connection is used (and left open); an address that names
            another cluster is then an error.
        cpus_per_worker: CPUs Ray reserves per actor.
        backend: "nccl" or "gloo" for moecomm.distributed.init (default: its choice).
        timeout_s: the group's collective timeout (default MOECOMM_TIMEOUT_S).
        env: extra environment variables set in every actor before init.
        setup_timeout_s: bound on starting the actors and forming the group.
        connect_timeout_s: bound on reaching address= before ray.init is called.

    Raises:
        MoeCommValueError if address is not one of the forms above; MoeCommError if Ray is not
        installed, the address cannot be reached within connect_timeout_s, ray.init fails, or the
        group does not form within setup_timeout_s.
    """

    def __init__(self, num_workers: int, gpus_per_worker: float = 0, address: str | None = None, *,
                 cpus_per_worker: float = 1, backend: str | None = None, timeout_s: float | None = None,
                 env: dict[str, str] | None = None, setup_timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0):
        check_positive_int(_OP, "num_workers", num_workers)
        for name, v in (("gpus_per_worker", gpus_per_worker), ("cpus_per_worker", cpus_per_worker)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise MoeCommValueError(f"{_OP}: {name} must be a number >= 0, got {v!r}")
        if address is not None and not isinstance(address, str):
            raise MoeCommTypeError(f"{_OP}: address must be a str or None, got {type(address).__name__}")
        if address is not None:
            _parse_address(address)  # the form, before Ray is imported
        for name, v in (("setup_timeout_s", setup_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise MoeCommValueError(f"{_OP}: {name} must be a number of seconds > 0, got {v!r}")
        if backend is not None and backend not in ("nccl", "gloo"):
            raise MoeCommValueError(f"{_OP}: backend must be one of ['nccl', 'gloo'] or None, got {backend!r}")
        try:
            import ray
        except ImportError as exc:
            raise MoeCommError(f"{_OP}: needs Ray, which is not importable ({exc}); pip install ray") from exc
        self._ray = ray
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._setup_timeout_s = setup_timeout_s
        self._owns_ray = False
        self._session_dir: str | None = None  # Ray's session folder, when this group started Ray
        self._ray_root_was_there = True
        self._actors: list[Any] = []
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes ~/.ray/auth_token
        if address is not None:
            dial = _dial_address(address)
            if dial is not None:
                _check_reachable(address, dial, float(connect_timeout_s))
            if ray.is_initialized():
                self._check_same_cluster(address, dial)
        if not ray.is_initialized():
            if address is None:
                # the raylet and its workers inherit this environment: let them import what the
                # driver imports (moecomm from a checkout, functions defined in test modules)
                old = os.environ.get("PYTHONPATH")
                paths = [p for p in sys.path if p and os.path.isdir(p)]
                os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
                self._ray_root_was_there = os.path.exists(_ray_root())
                try:
                    ray.init(num_cpus=max(int(num_workers * cpus_per_worker + 0.999), 1),
                             num_gpus=int(num_workers * gpus_per_worker + 0.999) if gpus_per_worker else 0,
                             include_dashboard=False, log_to_driver=True)
                    self._session_dir = _session_dir(ray)
                finally:
                    if old is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = old
            else:
                try:
                    ray.init(address=address)
                except Exception as exc:
                    raise MoeCommError(f"{_OP}: ray.init(address={address!r}) failed: "
                                       f"{type(exc).__name__}: {exc}") from exc
            self._owns_ray = True
        try:
            self._start(gpus_per_worker, cpus_per_worker, backend, timeout_s, env or {})
        except BaseException:
            self.close()
            raise

    def _check_same_cluster(self, address: str, dial: tuple[str, int] | None) -> None:
        """This process is already connected to Ray: refuse an address that names another cluster."""
        if dial is None or address.startswith("ray://"):
            return  # nothing to compare with (Ray Client connections do not expose the GCS address)
        try:
            connected = self._ray.get_runtime_context().gcs_address
            connected_port = int(connected.rpartition(":")[2])
        except Exception:  # an older Ray without gcs_address: keep the existing connection
            return
        if connected_port != dial[1]:
            raise MoeCommValueError(f"{_OP}: address must name the cluster this process is already connected to "
                                    f"({connected}), got {address!r} (dials {dial[0]}:{dial[1]}); call "
                                    "ray.shutdown() first, or pass address=None to use that connection")

    def _start(self, gpus: float, cpus: float, backend: str | None, timeout_s: float | None,
               env: dict[str, str]) -> None:
        ray = self._ray
        actor_cls = ray.remote(_Worker)
        self._actors = [actor_cls.options(num_cpus=cpus, num_gpus=gpus).remote() for _ in range(self.num_workers)]
        t = self._setup_timeout_s
        try:
            addr, port = ray.get(self._actors[0].node_address.remote(), timeout=t)
            ips = ray.get([a.node_ip.remote() for a in self._actors], timeout=t)
        except ray.exceptions.GetTimeoutError as exc:
            raise MoeCommError(f"{_OP}: {self.num_workers} actors did not start within {t:.0f} s "
                               f"(does the cluster have {self.num_workers} x {cpus} CPUs, {gpus} GPUs free?)") from exc
        local_rank, local_size, seen = [], [], {}
        for ip in ips:
            local_rank.append(seen.get(ip, 0))
            seen[ip] = seen.get(ip, 0) + 1
        local_size = [seen[ip] for ip in ips]
        if gpus:  # each actor sees only its own GPU(s), as cuda:0
            local_rank, local_size = [0] * len(ips), [1] * len(ips)
        refs = [a.setup.remote(r, self.num_workers, local_rank[r], local_size[r], addr, port, backend, timeout_s, env)
                for r, a in enumerate(self._actors)]
        try:
            self.worlds = ray.get(refs, timeout=t)
        except ray.exceptions.GetTimeoutError as exc:
            raise MoeCommError(f"{_OP}: the {self.num_workers} actors did not form a process group within "
                               f"{t:.0f} s (rendezvous at {addr}:{port})") from exc

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every worker (inside its initialised process group).

        Args:
            fn: a picklable function; it may call moecomm.distributed.current_world() or init() (returns
                the existing World) and use torch.distributed collectives.

        Returns:
            [W] results, in rank order.

        Raises:
            the first worker's exception (Ray's RayTaskError wrapping it); a collective stuck on a
            dead worker ends within the group's timeout.
        """
        if not self._actors:
            raise MoeCommValueError(f"{_OP}.run: the group must be open, got a closed group")
        refs = [a.run.remote(fn, args, kwargs) for a in self._actors]
        return self._ray.get(refs)

    def close(self) -> None:
        """Leave the process group, stop the actors, and stop Ray if this group started it."""
        ray = self._ray
        if self._actors:
            try:
                ray.get([a.shutdown.remote() for a in self._actors], timeout=30)
            except Exception:  # a dead actor cannot shut down; killing it below is enough
                pass
            for a in self._actors:
                ray.kill(a)
        self._actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
        if self._session_dir is not None:
            _remove_session(self._session_dir, self._ray_root_was_there)
            self._session_dir = None

    def __enter__(self) -> RayWorkerGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["RayWorkerGroup"]
