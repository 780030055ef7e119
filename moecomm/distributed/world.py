"""moecomm.distributed.init(): one process group from whatever started this process.

# W = world_size, R = rank, L = local_rank

Launchers, detected in this order:
- Ray actors of moecomm.ray.RayWorkerGroup: torchrun's variables, set by the actor before init;
- torchrun (and run_distributed): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT;
- MPI (Open MPI: OMPI_COMM_WORLD_SIZE; MPICH/Hydra: PMI_SIZE; PMIx: PMIX_RANK) through mpi4py: the
  local rank from a shared-memory split of COMM_WORLD (Open MPI's OMPI_COMM_WORLD_LOCAL_RANK can be
  out of order), rank 0 opens the rendezvous store on a free port and broadcasts host and port;
- none of these: a single process (world_size 1).

Rendezvous goes through a TCPStore that we open ourselves (port 0 lets the OS pick a free port with
no bind race), so that the health heartbeats (health.py) can use the same store.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _env
from ..errors import MoeCommError, MoeCommValueError, check_choice
from . import health

_OP = "moecomm.distributed.init"


class RendezvousError(MoeCommError, RuntimeError):
    """The ranks could not meet: the store was unreachable or a rank did not arrive in time."""


@dataclass
class World:
    """This process's place in the job.

    Attributes:
        rank: R, this process's global rank in [0, world_size).
        world_size: W, number of processes in the job.
        local_rank: L, index of this process among those on the same host.
        local_world_size: number of processes on this host.
        device: cuda:local_rank under NCCL, cpu under gloo.
        backend: "nccl" or "gloo".
        group: the world process group (torch.distributed's default group).
        launcher: "torchrun", "env" (torchrun-style variables, e.g. run_distributed), "mpi", "ray",
            "single", or "external" (a group someone else initialised, adopted by init()).
        master_addr, master_port: the rendezvous store's address.
        timeout_s: the timeout of every collective of this world, in seconds.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    group: dist.ProcessGroup | None
    launcher: str
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = 300.0
    ep_groups: dict[int, dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    # the rendezvous store; holding it keeps rank 0's store server alive as long as the world
    store: dist.Store | None = field(default=None, repr=False)


_WORLD: World | None = None


def current_world() -> World | None:
    """The World returned by the last init(), or None before init()/after shutdown()."""
    return _WORLD


def _mpi_env() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))


def _check_launcher_size(world_size: int, library: str) -> None:
    """Raise if the launcher started more ranks than the MPI library mpi4py loaded can see.

    MPICH's mpiexec with mpi4py on Open MPI's libmpi (or the reverse on some versions) starts N
    singletons of world_size 1 that each would run alone and "succeed": catch it here instead.
    """
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        raw = os.environ.get(var, "")
        if raw.isdigit() and int(raw) != world_size:
            lib = " ".join(library.strip().split("\n")[0].split(",")[0].split())[:60] or "unknown"
            raise MoeCommError(
                f"{_OP}: the launcher started {raw} ranks ({var}={raw}) but mpi4py's MPI sees a world of "
                f"{world_size}: mpi4py loaded an MPI library ({lib}) other than the launcher's. Use the "
                "mpiexec of that library, or point mpi4py at the launcher's (MPI4PY_LIBMPI=/path/to/libmpi.so; "
                "for a relocated Open MPI also OPAL_PREFIX)")


def _host_address() -> str:
    """An address of this host that the other hosts can reach (falls back to loopback)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    if addr.startswith("127."):
        # the hostname maps to loopback (common in /etc/hosts): ask the routing table instead
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("10.255.255.255", 1))  # UDP connect sends nothing
                return s.getsockname()[0]
        except OSError:
            return addr
    return addr


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise MoeCommValueError(f"{_OP}: environment variable {name} must be an integer, got {raw!r}") from None


def _detect(timeout_s: float, launcher_name: str | None) -> tuple[str, int, int, int, int, str, int, dist.Store | None]:
    """(launcher, rank, world_size, local_rank, local_world_size, addr, port, store opened here or None)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        local_ws = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world_size
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise MoeCommValueError(f"{_OP}: MASTER_ADDR and MASTER_PORT must be set when RANK and WORLD_SIZE are, "
                                    f"got MASTER_ADDR={os.environ.get('MASTER_ADDR')!r} MASTER_PORT={os.environ.get('MASTER_PORT')!r}")
        launcher = launcher_name or ("torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env")
        return launcher, rank, world_size, local_rank, local_ws, os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), None
    if _mpi_env():
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise MoeCommError(f"{_OP}: started by an MPI launcher but mpi4py is not importable ({exc}); "
                               "pip install mpi4py") from exc
        comm = MPI.COMM_WORLD
        rank, world_size = comm.Get_rank(), comm.Get_size()
        _check_launcher_size(world_size, MPI.Get_library_version())
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_ws = local.Get_rank(), local.Get_size()
        local.Free()
        store = None
        if rank == 0:
            addr = os.environ.get("MASTER_ADDR") or (_host_address() if world_size > local_ws else "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT", "0"))
            store = dist.TCPStore(addr, port, is_master=True,
                                  wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))
            info = (addr, store.port)
        else:
            info = None
        # the one MPI collective: rank 0's store address to everyone
        addr, port = comm.bcast(info, root=0)
        return "mpi", rank, world_size, local_rank, local_ws, addr, port, store
    return "single", 0, 1, 0, 1, "127.0.0.1", 0, None


def _choose_backend(requested: str | None, store: dist.Store, rank: int, world_size: int, local_rank: int,
                    timeout_s: float) -> str:
    if requested is not None:
        return check_choice(_OP, "backend", requested, ("nccl", "gloo"))
    forced = _env.dist_backend()
    if forced is not None:
        return forced
    has_gpu = torch.cuda.is_available() and torch.cuda.device_count() > local_rank and dist.is_nccl_available()
    if world_size == 1:
        return "nccl" if has_gpu else "gloo"
    # NCCL only if EVERY rank has its GPU: each rank publishes its answer, then reads all of them
    store.set(f"moecomm/gpu/{rank}", "1" if has_gpu else "0")
    keys = [f"moecomm/gpu/{r}" for r in range(world_size)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise RendezvousError(f"{_OP}: ranks {missing} did not arrive within {timeout_s:.0f} s "
                              f"(MOECOMM_TIMEOUT_S / timeout_s)") from exc
    return "nccl" if all(store.get(k) == b"1" for k in keys) else "gloo"


def init(backend: str | None = None, timeout_s: float | None = None, *, launcher: str | None = None) -> World:
    """Join (or create) the job's process group from the launcher's environment; return the World.

    Idempotent: a second call returns the same World. If torch.distributed was initialised by
    someone else, that group is adopted (without the health heartbeats: explain_failure then
    cannot name ranks).

    Args:
        backend: "nccl" or "gloo"; default MOECOMM_DIST_BACKEND, else NCCL when every rank has a GPU
            (device cuda:local_rank), gloo otherwise (device cpu).
        timeout_s: timeout of the rendezvous and of every collective, in seconds; default
            MOECOMM_TIMEOUT_S (300). A dead rank makes the others raise after at most this long.
        launcher: the name World.launcher reports when the environment is RANK/WORLD_SIZE/MASTER_*
            (e.g. "ray", set by moecomm.apps.ray inside its actors); default torchrun or env.

    Returns:
        World (rank, world_size, local_rank, local_world_size, device, backend, group, launcher).

    Example:
        world = moecomm.distributed.init()          # under torchrun, mpiexec, Ray, or a plain python
        ep_group = moecomm.distributed.new_ep_groups(world, ep_size=world.world_size)
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if backend is not None:
        check_choice(_OP, "backend", backend, ("nccl", "gloo"))
    if timeout_s is None:
        timeout_s = _env.timeout_s()
    elif isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise MoeCommValueError(f"{_OP}: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    timeout_s = float(timeout_s)
    td = datetime.timedelta(seconds=timeout_s)

    if dist.is_initialized():  # adopted: somebody else made the group
        rank, ws = dist.get_rank(), dist.get_world_size()
        be = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank) if be == "nccl" else torch.device("cpu")
        _WORLD = World(rank, ws, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", ws)), device, be,
                       dist.group.WORLD, "external", timeout_s=timeout_s)
        return _WORLD

    launcher, rank, world_size, local_rank, local_ws, addr, port, store = _detect(timeout_s, launcher)
    agent = store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if world_size == 1 and launcher in ("single", "env", "torchrun") and port == 0:
        store = dist.HashStore()
    elif store is None:
        # torchrun's agent already serves a store at MASTER_PORT; otherwise rank 0 serves it
        try:
            store = dist.TCPStore(addr, port, is_master=(rank == 0 and not agent), wait_for_workers=False,
                                  timeout=td)
        except Exception as exc:
            raise RendezvousError(f"{_OP}: rank {rank} could not reach the rendezvous store at {addr}:{port} "
                                  f"within {timeout_s:.0f} s ({type(exc).__name__}: {exc})") from exc
    be = _choose_backend(backend, store, rank, world_size, local_rank, timeout_s)
    if be == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    prefix = f"moecomm/pg/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    kwargs = {"device_id": device} if be == "nccl" else {}
    t0 = time.monotonic()
    try:
        dist.init_process_group(be, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                                timeout=td, **kwargs)
    except Exception as exc:
        raise RendezvousError(f"{_OP}: rank {rank} of {world_size} could not form the {be} group within "
                              f"{timeout_s:.0f} s (waited {time.monotonic() - t0:.1f} s): {exc}") from exc
    if world_size > 1:
        health.start_health(addr, port if port else store.port, rank, world_size, timeout_s, agent_store=agent)
    _WORLD = World(rank, world_size, local_rank, local_ws, device, be, dist.group.WORLD, launcher,
                   master_addr=addr, master_port=port if port else getattr(store, "port", 0), timeout_s=timeout_s,
                   store=store)
    return _WORLD


def shutdown() -> None:
    """Leave the process group and stop the heartbeat; init() may be called again afterwards.

    On a healthy world every rank stops its heartbeat, then all meet in a barrier, so that rank 0
    (the store's host) cannot exit while another rank still writes to its store. After a failure
    (explain_failure or report_failure ran here) the barrier is skipped: a dead peer would hold it for the whole timeout.
    """
    global _WORLD
    health.stop_health()
    ours = dist.is_initialized() and (_WORLD is None or _WORLD.launcher != "external")
    if ours and _WORLD is not None and _WORLD.world_size > 1 and not health.failure_seen():
        try:
            if _WORLD.backend == "gloo":  # bounded: a rank that skipped shutdown costs 10 s, not the timeout
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=min(_WORLD.timeout_s, 10.0)))
            else:
                dist.barrier()
        except Exception:  # a peer already gone: nothing left to protect
            pass
    if ours:
        dist.destroy_process_group()
    _WORLD = None
