"""Symmetric buffers: one same-sized device buffer per rank, every rank's buffer mapped in every process.

    with open_symmetric(1 << 20, group) as buf:       # collective over the group
        buf.local                                     # uint8 [nbytes], this rank's buffer (zeroed)
        buf.peer_ptrs                                 # int64 [W] on the device: rank r's buffer here
        kernel(..., buf.peer_ptrs, ...)               # kernels read/write peers through these

    bufs = open_virtual(1 << 20, world_size=4, device="cuda")   # W virtual ranks on one GPU (tests)

Shape legend: W = world_size, nbytes = bytes per rank's buffer.

Mechanism (chosen on evidence): CUDA IPC handles through the CUDA driver API via ctypes
(cuMemAlloc of our own, cuIpcGetMemHandle, cuIpcOpenMemHandle with
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS, cuIpcCloseMemHandle, cuMemFree), reusing the driver loader of
moecomm.jit.cuda, with the 64-byte handles exchanged through the process group (all_gather_object,
gloo or NCCL). Why not torch.distributed._symmetric_memory (empty / rendezvous / get_buffer /
signal pad, present in torch 2.11 and 2.13): its rendezvous needs a group whose backend it
supports (NCCL or NVSHMEM; gloo groups, which our CPU tests and mixed jobs use, are not), it gives
one buffer per process so W virtual ranks on one GPU (how kernels are tested on a single H200)
cannot be built with it, and its allocator and backend choice move between torch releases (2.11
on the GPU machines, 2.13 here). The driver calls are few, stable since CUDA 4.1, and need no
package beyond torch (the same reason moecomm.jit.cuda launches through the driver API).

Why cuMemAlloc of our own rather than a tensor of torch's caching allocator: an IPC handle maps a
whole allocation, and the caching allocator packs many tensors into one segment (so the peers
would map our neighbours too, and a process may not open one allocation twice); with
expandable_segments (PYTORCH_CUDA_ALLOC_CONF) its memory is not cudaMalloc'ed and IPC handles do
not exist for it at all. Our own allocation is exactly one buffer, freed deterministically by
close() (the open/close-100-times test checks that device memory does not grow). ``local`` is a
torch view of it (through __cuda_array_interface__, no copy); it and every view must not be used
after close().

Memory ordering is not this module's business: it maps memory. Kernels that synchronise through the
buffers use system-scope release/acquire on their flags (see kernels/allreduce/).

Virtual ranks (open_virtual): W buffers in one process on one device; peer_ptrs are plain device
pointers (no IPC: a process cannot open its own handle). Kernels are then launched once per virtual
rank on W streams (or once for all ranks), all resident at once.

Eligibility (``eligibility(group)``): one node (hostnames agree), a distinct GPU per rank, peer
access between every pair (torch.cuda.can_device_access_peer where the peer's device is visible,
then a real probe: open a small symmetric buffer, every rank writes a rank-coded pattern, every rank
reads every peer's); decided once per (group, device) and cached; a refusal is logged once with the
reason, and callers use NCCL. Never a silent no-op.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import socket
import threading
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MoeCommError, MoeCommTypeError, MoeCommValueError, UnsupportedHardwareError

log = logging.getLogger("moecomm")

ALIGN = 128  # bytes: cuMemAlloc gives >= 256-byte alignment; kernels rely on 128 (one cache line)
MAX_WORLD_SIZE = 32  # the kernels' peer-pointer tables (kernels/allreduce/*.cu MAX_PEERS)
PROBE_NBYTES = 4096
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_IPC_HANDLE_BYTES = 64


class SymmetricBufferError(MoeCommError, RuntimeError):
    """Opening, exchanging or using a symmetric buffer failed (the message says which step and why)."""


class _IpcHandle(ctypes.Structure):
    # raw bytes: a c_char array field would read back only up to its first NUL (handles hold NULs)
    _fields_ = [("reserved", ctypes.c_ubyte * _IPC_HANDLE_BYTES)]

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), _IPC_HANDLE_BYTES)

    @classmethod
    def from_bytes(cls, data: bytes) -> _IpcHandle:
        if len(data) != _IPC_HANDLE_BYTES:
            raise SymmetricBufferError(f"moecomm.distributed.symmetric: an IPC handle must be {_IPC_HANDLE_BYTES} "
                                       f"bytes, got {len(data)}")
        h = cls()
        ctypes.memmove(ctypes.addressof(h), data, _IPC_HANDLE_BYTES)
        return h


class _Ipc:
    """The driver calls of this module, bound once on top of moecomm.jit.cuda's driver loader."""

    def __init__(self) -> None:
        from ..jit import cuda

        self.drv = cuda._get_driver()
        lib = self.drv.lib

        def fn(*names: str):
            for n in names:
                f = getattr(lib, n, None)
                if f is not None:
                    return f
            raise SymmetricBufferError(f"moecomm.distributed.symmetric: the CUDA driver lacks {names[0]}")

        self.mem_alloc = fn("cuMemAlloc_v2", "cuMemAlloc")
        self.mem_alloc.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        self.mem_free = fn("cuMemFree_v2", "cuMemFree")
        self.mem_free.argtypes = [ctypes.c_uint64]
        self.get_handle = fn("cuIpcGetMemHandle")
        self.get_handle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]
        self.open_handle = fn("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.open_handle.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        self.close_handle = fn("cuIpcCloseMemHandle")
        self.close_handle.argtypes = [ctypes.c_uint64]
        self.address_range = fn("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        self.address_range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.c_uint64]

    def check(self, rc: int, what: str) -> None:
        try:
            self.drv.check(rc, what)
        except MoeCommError as exc:
            raise SymmetricBufferError(f"moecomm.distributed.symmetric: {exc}") from None


_ipc_lock = threading.Lock()
_ipc: _Ipc | None = None


def _get_ipc() -> _Ipc:
    global _ipc
    with _ipc_lock:
        if _ipc is None:
            _ipc = _Ipc()
        return _ipc


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _RawView:
    """__cuda_array_interface__ of ``nbytes`` bytes at ``ptr``: torch.as_tensor wraps it without a copy."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def _view(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(_RawView(ptr, nbytes), device=device)
    if t.data_ptr() != ptr or t.numel() != nbytes:  # as_tensor must wrap, never copy
        raise SymmetricBufferError(f"moecomm.distributed.symmetric: torch.as_tensor copied the buffer at {ptr:#x} "
                                   "instead of wrapping it")
    return t


class _Allocation:
    """One cuMemAlloc'ed buffer on one device; free() is idempotent."""

    def __init__(self, nbytes: int, device: torch.device):
        self.device, self.nbytes = device, nbytes
        ipc = _get_ipc()
        torch.cuda.init()
        ptr = ctypes.c_uint64()
        with ipc.drv.current(device.index):
            ipc.check(ipc.mem_alloc(ctypes.byref(ptr), _round_up(nbytes, ALIGN)), f"cuMemAlloc({nbytes})")
        self.ptr = ptr.value
        if self.ptr % ALIGN:
            self.free()
            raise SymmetricBufferError(f"moecomm.distributed.symmetric: cuMemAlloc returned {self.ptr:#x}, not "
                                       f"{ALIGN}-byte aligned")

    def handle(self) -> bytes:
        ipc = _get_ipc()
        h = _IpcHandle()
        with ipc.drv.current(self.device.index):
            ipc.check(ipc.get_handle(ctypes.byref(h), self.ptr), "cuIpcGetMemHandle")
        return h.to_bytes()

    def free(self) -> None:
        if self.ptr:
            ipc = _get_ipc()
            with ipc.drv.current(self.device.index):
                ipc.check(ipc.mem_free(self.ptr), "cuMemFree")
            self.ptr = 0


def _open_peer(handle: bytes, device: torch.device, rank: int) -> int:
    ipc = _get_ipc()
    h = _IpcHandle.from_bytes(handle)
    ptr = ctypes.c_uint64()
    with ipc.drv.current(device.index):
        ipc.check(ipc.open_handle(ctypes.byref(ptr), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                  f"cuIpcOpenMemHandle(rank {rank}'s buffer)")
    return ptr.value


def _close_peer(ptr: int, device: torch.device, rank: int) -> None:
    ipc = _get_ipc()
    with ipc.drv.current(device.index):
        ipc.check(ipc.close_handle(ptr), f"cuIpcCloseMemHandle(rank {rank}'s buffer)")


def export_allocation(ptr: int, device: torch.device) -> tuple[bytes, int]:
    """(IPC handle of the allocation holding device pointer ``ptr``, ptr's offset in it).

    For tensors of torch's caching allocator (a CUDA graph's inputs, say): the handle maps the whole
    cudaMalloc'ed segment, so peers add the offset. Raises SymmetricBufferError where the memory has
    no IPC handle (expandable segments, cudaMallocAsync pools).
    """
    ipc = _get_ipc()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    h = _IpcHandle()
    with ipc.drv.current(device.index):
        ipc.check(ipc.address_range(ctypes.byref(base), ctypes.byref(size), ptr), f"cuMemGetAddressRange({ptr:#x})")
        ipc.check(ipc.get_handle(ctypes.byref(h), base.value), f"cuIpcGetMemHandle(allocation at {base.value:#x})")
    return h.to_bytes(), ptr - base.value


def open_allocation(handle: bytes, device: torch.device, rank: int) -> int:
    """Map a peer's allocation (a handle from export_allocation) here; its base pointer. A process may
    map one allocation once: callers keep a dictionary of handles they opened."""
    return _open_peer(handle, device, rank)


def close_allocation(ptr: int, device: torch.device, rank: int) -> None:
    """Unmap what open_allocation mapped."""
    _close_peer(ptr, device, rank)


class SymmetricBuffer:
    """One rank's view of W same-sized device buffers, one per rank, all mapped in this process.

    Attributes:
        rank, world_size: this rank and W (the group's, or the virtual group's).
        nbytes: bytes of every rank's buffer.
        device: the CUDA device of ``local``.
        local: uint8 [nbytes], this rank's own buffer (zeroed at open), 128-byte aligned.
        peer_ptrs: int64 [W] on ``device``: every rank's buffer base as mapped in THIS process, in
            rank order (peer_ptrs[rank] == local.data_ptr()).

    close() is idempotent; after it, local / peer_ptrs / peer_view raise. Use as a context manager.
    """

    def __init__(self, *, rank: int, world_size: int, nbytes: int, device: torch.device, local: torch.Tensor,
                 ptrs: list[int], closer: Any, virtual: bool):
        self.rank, self.world_size, self.nbytes, self.device = rank, world_size, nbytes, device
        self.virtual = virtual  # True: from open_virtual (W ranks in this process), no IPC
        self._local: torch.Tensor | None = local
        self._ptrs = list(ptrs)
        self._peer_ptrs: torch.Tensor | None = torch.tensor(self._ptrs, dtype=torch.int64, device=device)
        self._closer = closer
        self._views: dict[int, torch.Tensor] = {}

    def _alive(self, what: str) -> None:
        if self._local is None:
            raise SymmetricBufferError(f"moecomm.distributed.symmetric: {what} of a closed SymmetricBuffer "
                                       f"(rank {self.rank} of {self.world_size}, {self.nbytes} bytes)")

    @property
    def closed(self) -> bool:
        return self._local is None

    @property
    def local(self) -> torch.Tensor:
        self._alive("local")
        return self._local

    @property
    def peer_ptrs(self) -> torch.Tensor:
        self._alive("peer_ptrs")
        return self._peer_ptrs

    @property
    def ptrs(self) -> list[int]:
        """peer_ptrs as host ints (rank order)."""
        self._alive("ptrs")
        return list(self._ptrs)

    def peer_view(self, rank: int) -> torch.Tensor:
        """uint8 [nbytes]: rank ``rank``'s buffer as mapped here (a torch view, no copy; valid until close).

        Reading a peer's data through it orders only with this process's streams: the peer must have
        finished writing (a host barrier after its stream synchronised, or a device flag).
        """
        self._alive("peer_view")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise MoeCommValueError(f"SymmetricBuffer.peer_view: rank must be an int in [0, {self.world_size}), "
                                    f"got {rank!r}")
        if rank == self.rank:
            return self._local
        v = self._views.get(rank)
        if v is None:
            v = self._views[rank] = _view(self._ptrs[rank], self.nbytes, self.device)
        return v

    def close(self) -> None:
        """Release this rank's view: wait for this device's work, unmap the peers, free (collective for
        open_symmetric: a barrier keeps every rank's buffer alive until no peer uses it). Idempotent."""
        if self._local is None:
            return
        self._local = self._peer_ptrs = None
        self._views.clear()
        closer, self._closer = self._closer, None
        closer(self)

    def __enter__(self) -> SymmetricBuffer:
        self._alive("__enter__")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        kind = "virtual " if self.virtual else ""
        return (f"SymmetricBuffer({kind}rank {self.rank}/{self.world_size}, {self.nbytes} bytes, {self.device}, "
                f"{state})")


def _check_open_args(op: str, nbytes: Any, device: Any) -> torch.device:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise MoeCommTypeError(f"{op}: nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 1:
        raise MoeCommValueError(f"{op}: nbytes must be >= 1, got {nbytes}")
    if not torch.cuda.is_available():
        raise UnsupportedHardwareError(f"{op}: needs a CUDA device; none is visible (torch.cuda.is_available() is "
                                       "False)")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise MoeCommValueError(f"{op}: device must be a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def open_virtual(nbytes: int, world_size: int, device: Any = None) -> list[SymmetricBuffer]:
    """W virtual ranks in this process on one GPU: W buffers of ``nbytes`` and their W views.

    Args:
        nbytes: bytes of each rank's buffer (>= 1); each is allocated rounded up to 128 bytes.
        world_size: W, 1..32.
        device: the CUDA device (default: the current one).

    Returns [W] SymmetricBuffer, element r being rank r's view (peer_ptrs identical on all of them).
    The memory is freed when the last of the W is closed.

        bufs = open_virtual(1 << 20, 4, "cuda")
    """
    op = "moecomm.distributed.open_virtual"
    dev = _check_open_args(op, nbytes, device)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= MAX_WORLD_SIZE:
        raise MoeCommValueError(f"{op}: world_size must be an int in [1, {MAX_WORLD_SIZE}], got {world_size!r}")
    allocs: list[_Allocation] = []
    try:
        for _ in range(world_size):
            allocs.append(_Allocation(nbytes, dev))
    except BaseException:
        for a in allocs:
            a.free()
        raise
    ptrs = [a.ptr for a in allocs]
    locals_ = [_view(p, nbytes, dev) for p in ptrs]
    for t in locals_:
        t.zero_()
    torch.cuda.current_stream(dev).synchronize()
    remaining = {"open": world_size}

    def closer(buf: SymmetricBuffer) -> None:
        remaining["open"] -= 1
        if remaining["open"] == 0:
            torch.cuda.synchronize(dev)  # no kernel of any virtual rank still reads a buffer
            for a in allocs:
                a.free()

    return [SymmetricBuffer(rank=r, world_size=world_size, nbytes=nbytes, device=dev, local=locals_[r], ptrs=ptrs,
                            closer=closer, virtual=True) for r in range(world_size)]


def open_symmetric(nbytes: int, group: dist.ProcessGroup | None = None, *, device: Any = None) -> SymmetricBuffer:
    """Allocate this rank's buffer, exchange IPC handles over ``group``, open every peer's. Collective.

    Args:
        nbytes: bytes of each rank's buffer (>= 1, the same on every rank: checked).
        group: the process group (default: the world); gloo or NCCL.
        device: this rank's CUDA device (default: the current one).

    Returns this rank's SymmetricBuffer. Raises SymmetricBufferError naming the rank whose handle
    could not be opened (every rank raises: the failures are gathered, so none is left waiting).

        with open_symmetric(1 << 20, group) as buf:
            ...
    """
    op = "moecomm.distributed.open_symmetric"
    dev = _check_open_args(op, nbytes, device)
    if not dist.is_available() or not dist.is_initialized():
        raise SymmetricBufferError(f"{op}: needs an initialised process group (moecomm.distributed.init()); "
                                   "for ranks in one process use open_virtual")
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size > MAX_WORLD_SIZE:
        raise MoeCommValueError(f"{op}: the group's world_size must be <= {MAX_WORLD_SIZE}, got {world_size}")

    err, handle, alloc = None, b"", None
    try:
        alloc = _Allocation(nbytes, dev)
        local = _view(alloc.ptr, nbytes, dev)
        local.zero_()
        torch.cuda.current_stream(dev).synchronize()  # zeroed before any peer can see it
        handle = alloc.handle()
    except Exception as exc:  # reported through the exchange, so that no peer waits for us
        err = f"{type(exc).__name__}: {exc}"
    infos: list[Any] = [None] * world_size
    dist.all_gather_object(infos, {"nbytes": nbytes, "handle": handle, "error": err}, group=group)
    problems = [f"rank {r}: {i['error']}" for r, i in enumerate(infos) if i["error"]]
    sizes = {i["nbytes"] for i in infos}
    if len(sizes) > 1:
        problems.append("nbytes differs across ranks: " + ", ".join(f"rank {r} {i['nbytes']}" for r, i in enumerate(infos)))

    ptrs, opened = [0] * world_size, []
    if not problems:
        try:
            for r, i in enumerate(infos):
                if r == rank:
                    ptrs[r] = alloc.ptr
                else:
                    ptrs[r] = _open_peer(i["handle"], dev, r)
                    opened.append(r)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        outcome: list[Any] = [None] * world_size
        dist.all_gather_object(outcome, err, group=group)
        problems = [f"rank {r}: {e}" for r, e in enumerate(outcome) if e]
    if problems:
        for r in opened:
            _close_peer(ptrs[r], dev, r)
        if alloc is not None:
            dist.barrier(group=group)  # no peer still maps our buffer
            alloc.free()
        raise SymmetricBufferError(f"{op}: opening a {nbytes}-byte symmetric buffer over {world_size} ranks failed: "
                                   + "; ".join(problems))

    def closer(buf: SymmetricBuffer) -> None:
        torch.cuda.synchronize(dev)  # our kernels no longer touch any buffer
        for r in opened:
            _close_peer(ptrs[r], dev, r)
        dist.barrier(group=group)  # every peer has unmapped ours (and finished its kernels)
        alloc.free()

    return SymmetricBuffer(rank=rank, world_size=world_size, nbytes=nbytes, device=dev, local=local, ptrs=ptrs,
                           closer=closer, virtual=False)


# --------------------------------------------------------------------------- eligibility


@dataclasses.dataclass(frozen=True)
class RankFacts:
    """What one rank reports for the eligibility decision."""

    hostname: str
    device_uuid: str
    # peer access from this rank's device to each other rank's device: True / False, or None when
    # the peer's device is not visible here (CUDA_VISIBLE_DEVICES): then only the probe decides
    peer_access: tuple[bool | None, ...]


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Whether IPC kernels may run over a group, and if not, why (a sentence naming the ranks)."""

    ok: bool
    reason: str


def decide(facts: list[RankFacts]) -> Eligibility:
    """The decision from every rank's facts, before the probe: pure, the same on every rank."""
    hosts = {f.hostname for f in facts}
    if len(hosts) > 1:
        by = ", ".join(f"rank {r} on {f.hostname}" for r, f in enumerate(facts))
        return Eligibility(False, f"the ranks span {len(hosts)} hosts ({by}); IPC buffers need one node")
    seen: dict[str, int] = {}
    for r, f in enumerate(facts):
        if f.device_uuid in seen:
            return Eligibility(False, f"ranks {seen[f.device_uuid]} and {r} share one GPU ({f.device_uuid}); "
                                      "spinning kernels of two processes on one GPU deadlock")
        seen[f.device_uuid] = r
    for r, f in enumerate(facts):
        for s, ok in enumerate(f.peer_access):
            if ok is False:
                return Eligibility(False, f"rank {r}'s GPU cannot access rank {s}'s GPU "
                                          "(torch.cuda.can_device_access_peer is False: PCIe without P2P?)")
    return Eligibility(True, "one node, a GPU per rank, peer access between every pair")


def _local_facts(group: dist.ProcessGroup | None, device: torch.device) -> tuple[str, str]:
    return socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid)


def _peer_access(device: torch.device, uuids: list[str]) -> tuple[bool | None, ...]:
    visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    out: list[bool | None] = []
    for u in uuids:
        j = visible.get(u)
        if j is None:
            out.append(None)
        elif j == device.index:
            out.append(True)
        else:
            out.append(bool(torch.cuda.can_device_access_peer(device.index, j)))
    return tuple(out)


def probe(group: dist.ProcessGroup | None, device: torch.device) -> str | None:
    """The real test: open a small symmetric buffer, every rank writes (rank + 1) * 7 + i mod 251 into
    its own, every rank reads every peer's through its mapping. None when all match, else why not.
    Collective (every rank returns the same answer)."""
    err = None
    try:
        buf = open_symmetric(PROBE_NBYTES, group, device=device)
    except Exception as exc:
        return str(exc)
    try:
        i = torch.arange(PROBE_NBYTES, device=device)
        buf.local.copy_(((buf.rank + 1) * 7 + i) % 251)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        for r in range(buf.world_size):
            want = ((r + 1) * 7 + i) % 251
            if not torch.equal(buf.peer_view(r).to(torch.int64), want):
                err = f"rank {buf.rank} read wrong bytes from rank {r}'s buffer"
                break
    except Exception as exc:
        err = f"rank {buf.rank}: {type(exc).__name__}: {exc}"
    finally:
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # everyone has read before anyone closes
        buf.close()
    errs: list[Any] = [None] * buf.world_size
    dist.all_gather_object(errs, err, group=group)
    bad = [e for e in errs if e]
    return "; ".join(bad) if bad else None


_eligibility: dict[tuple[Any, int], Eligibility] = {}
_eligibility_lock = threading.Lock()


def eligibility(group: dist.ProcessGroup | None = None, *, device: Any = None) -> Eligibility:
    """Whether IPC buffers and their kernels may be used over ``group`` on this rank's ``device``.

    Decided once per (group, device) and cached; collective on the first call (gathers every rank's
    host, GPU and peer-access facts, then runs ``probe``). A refusal is logged once (WARNING, logger
    'moecomm') with the reason; the callers then use NCCL.
    """
    if not torch.cuda.is_available():
        return Eligibility(False, "no CUDA device is visible")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (group if group is not None else "world", dev.index)
    with _eligibility_lock:
        if key in _eligibility:
            return _eligibility[key]
    if not dist.is_available() or not dist.is_initialized():
        res = Eligibility(False, "no process group is initialised")
    else:
        host, uuid = _local_facts(group, dev)
        world_size = dist.get_world_size(group)
        pairs: list[Any] = [None] * world_size
        dist.all_gather_object(pairs, (host, uuid), group=group)
        access = _peer_access(dev, [u for _, u in pairs])
        facts: list[Any] = [None] * world_size
        dist.all_gather_object(facts, RankFacts(host, uuid, access), group=group)
        res = decide(facts)
        if res.ok:
            why = probe(group, dev)
            if why is not None:
                res = Eligibility(False, f"the IPC probe failed: {why}")
    with _eligibility_lock:
        _eligibility[key] = res
    if not res.ok:
        log.warning("moecomm: IPC buffers are not used over this group (%s): %s; NCCL is used instead",
                    f"{dist.get_world_size(group) if dist.is_initialized() else 1} ranks", res.reason)
    return res


def forget_eligibility() -> None:
    """Forget the cached decisions (tests)."""
    with _eligibility_lock:
        _eligibility.clear()
