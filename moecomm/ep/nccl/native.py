"""The throughput mode's host orchestration in one C call per phase (kernels/ep/native.c).

# W = ep_size, T = tokens, H = hidden, S / R = rows sent / received

    rt = runtime(group, device)          # None: this process takes the Python path (why: logged once)
    d = dispatch(rt, x, ids, w, ...)     # two C calls: plan + count exchange + sync; pack + a2a + expand
    y = combine(rt, expert_out, handle)  # one C call: sum + a2a + sum

Why: a round trip through Python queues 7 Triton launches (~11 us of host time each on the H200
host, Triton's launcher and ours), 3 c10d all_to_all_singles (~23 us each) and a device-to-host copy;
with the Python between them 420-780 us of host time, where its kernels take ~180 us: at T 4096 the
eager round trip waited on the host. Here each phase runs the same Python wrappers (plan.py's
plan_send, pack_send, expand_received, the combine's gather_sum) with moecomm.jit.launch's
Launcher in record mode: a launch appends (kernel family, grid, argument values) to an int64
program instead of launching, the exchanges append ncclSend / ncclRecv groups (a one-rank group's:
one device copy, as c10d's all_to_all_single makes), and one call into
native.c queues the program: cuLaunchKernel on the compiled Triton kernels' function handles,
NCCL on the current stream with torch's own communicator of the group (borrowed through
ProcessGroupNCCL._comm_ptr(), so there is one communicator and c10d's and these exchanges are
ordered by NCCL as issued), and the count exchange's copy and wait.

Specialisation: a kernel family = one Launcher with one set of constexprs, warps and stages at one
call site (the dtypes and the device of the phase in the key: a variant's function handle is loaded
on one device); its variants = Triton's compiled kernels for the
argument classes it specialises on (a pointer 16-byte aligned or not; an int == 1, divisible by 16,
i32 / i64: the classes of moecomm.jit.launch.spec_key). native.c picks the variant whose classes
match each launch's values and refuses the whole program before queueing anything when none does;
this module then compiles that variant (JITFunction.warmup), adds it, and runs the program again.

The wait: the count exchange's copy is followed by a spin on cuStreamQuery (the counts size the
buffers of the next phase), checking NCCL's async error of the communicator and bounded by
MOECOMM_TIMEOUT_S. A rank that stopped makes the others raise within it (naming it through
moecomm.distributed.health when that is running). After a timeout the stream holds NCCL kernels
that never finish: the process group is lost, as after c10d's own timeout.

Taken by EPDispatcher's throughput mode on CUDA when: the group's backend is NCCL and its
communicator exists (ProcessGroupNCCL._comm_ptr() != 0; the first calls before c10d creates it
take the Python path), the libnccl torch mapped is found in /proc/self/maps with torch's NCCL
version, Triton is 3.6, the C compiler built native.c, the call is synchronous (async_op runs
through c10d, whose work objects it returns), and MOECOMM_EP_NATIVE is not 0. A kernel whose launch
needs Triton's own launcher (moecomm.jit.launch.native_parameters says which) turns the path off
for the process, said once; the Python path is the reference of this one (tests compare them).
"""

from __future__ import annotations

import ctypes
import threading
from array import array

import torch

from ... import _env
from ...errors import MoeCommError
from ...jit import backend as _backend
from ...jit import host as _host
from ...jit.launch import Launcher, native_parameters, recording

SOURCE = "ep/native.c"
VERSION = 4  # native.c's MC_VERSION
OK, RESPECIALISE, CUDA_ERROR, NCCL_ERROR, TIMEOUT, BAD_PROGRAM, NOT_READY = 0, 1, 2, 3, 4, 5, 6
OP_LAUNCH, OP_A2A, OP_D2H, OP_WAIT, OP_COPY = 1, 2, 3, 4, 5
EXTRA_PARAMS = 2  # Triton 3.6's global and profile scratch pointers (null)
MAX_VARIANTS = 8  # native.c's MAX_VARIANTS

_FUNCTIONS = {
    "moecomm_native_version": (ctypes.c_int, []),
    "moecomm_native_init": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
    "moecomm_native_new_family": (ctypes.c_int64, []),
    "moecomm_native_add_variant": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64]),
    "moecomm_native_run": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_void_p]),
    "moecomm_native_run_patched": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]),
    "moecomm_native_run_call": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
}

_Tensor = torch.Tensor


class NativeError(MoeCommError, RuntimeError):
    """A native phase failed on the device or in NCCL (the message names the phase and the rank)."""


class NotNative(Exception):
    """This phase cannot be queued natively (the caller takes its Python path)."""


def class_code(a) -> int:
    """The specialisation class of one runtime argument (native.c's class_of; see the module doc)."""
    if type(a) is int:
        return 16 + (a == 1) + 2 * (a != 1 and a % 16 == 0) + 4 * (0 if -2147483648 <= a < 2147483648 else 1)
    if isinstance(a, _Tensor):
        return 1 if a.data_ptr() % 16 == 0 else 2
    raise NotNative(f"a runtime argument of type {type(a).__name__}")


# ----------------------------------------------------------------------------- the library

class Library:
    """native.c loaded and given its API (the driver's and NCCL's functions, or a test's stand-ins)."""

    def __init__(self, lib, functions: list[int]):
        self.lib = lib
        if lib.moecomm_native_version() != VERSION:
            raise MoeCommError(f"{SOURCE}: version {lib.moecomm_native_version()}, expected {VERSION}")
        fns = (ctypes.c_int64 * len(functions))(*functions)
        if lib.moecomm_native_init(fns, len(functions)) != OK:
            raise MoeCommError(f"{SOURCE}: moecomm_native_init refused {len(functions)} functions")
        self.info = (ctypes.c_int64 * 2)()
        self.info_addr = ctypes.addressof(self.info)
        self.run = lib.moecomm_native_run
        self.run_patched = lib.moecomm_native_run_patched
        self.run_call = lib.moecomm_native_run_call

    def new_family(self) -> int:
        fam = self.lib.moecomm_native_new_family()
        if fam < 0:
            raise NotNative("native.c's family table is full")
        return fam

    def add_variant(self, family: int, function: int, block: int, smem: int, classes: list[int],
                    param_args: list[int], param_kinds: list[int]) -> int:
        desc = [family, function, block, smem, len(classes), len(param_args), EXTRA_PARAMS,
                *classes, *param_args, *param_kinds]
        buf = (ctypes.c_int64 * len(desc))(*desc)
        v = self.lib.moecomm_native_add_variant(buf, len(desc))
        if v < 0:
            raise NotNative(f"native.c refused a variant of family {family} (at most {MAX_VARIANTS})")
        return v


def load_library(functions: list[int]) -> Library:
    return Library(_host.load(SOURCE, _FUNCTIONS), functions)


def _nccl_path() -> str | None:
    """The libnccl this process mapped (torch's), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libnccl" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def _api_functions() -> list[int]:
    """Addresses of the 9 functions native.c calls (libcuda's and torch's libnccl's)."""
    from ...jit import cuda

    drv = cuda._get_driver().lib
    path = _nccl_path()
    if path is None:
        raise NotNative("no libnccl mapped in this process (torch's NCCL is linked statically?)")
    nccl = ctypes.CDLL(path)
    version = ctypes.c_int()
    if nccl.ncclGetVersion(ctypes.byref(version)) != 0:
        raise NotNative(f"ncclGetVersion failed ({path})")
    want = torch.cuda.nccl.version()
    want = want[0] * 10000 + want[1] * 100 + want[2] if isinstance(want, tuple) else int(want)
    if version.value != want:
        raise NotNative(f"{path} is NCCL {version.value}, torch's is {want}")

    def addr(lib, name):
        return ctypes.cast(lib[name], ctypes.c_void_p).value

    return [addr(drv, "cuLaunchKernel"), addr(drv, "cuStreamQuery"), addr(drv, "cuMemcpyDtoHAsync_v2"),
            addr(nccl, "ncclGroupStart"), addr(nccl, "ncclGroupEnd"), addr(nccl, "ncclSend"), addr(nccl, "ncclRecv"),
            addr(nccl, "ncclCommGetAsyncError"), addr(drv, "cuMemcpyDtoDAsync_v2")]


# ----------------------------------------------------------------------------- the runtime


class Runtime:
    """What a process needs to queue native programs: the library, the kernel families and variants."""

    def __init__(self, library: Library):
        self.library = library
        self.families: dict = {}  # family key -> native.c family id
        self.variants: dict = {}  # family id -> [class tuples registered]
        self.lock = threading.Lock()
        self.programs = 0  # programs queued (tests and benchmarks read it)
        self.compiles = 0  # variants added
        from ...jit.cuda import _raw_stream

        self.stream = _raw_stream  # device index -> torch's current stream there (a handle)

    def family(self, key) -> int:
        fam = self.families.get(key)
        if fam is None:
            with self.lock:
                fam = self.families.get(key)
                if fam is None:
                    fam = self.families[key] = self.library.new_family()
                    self.variants[fam] = []
        return fam

    def add_variant(self, fam: int, launcher: Launcher, grid, args, constexprs, num_warps, num_stages) -> None:
        """Compile (or find in Triton's cache) the kernel for these arguments' classes and add it."""
        classes = [class_code(a) for a in args]
        with self.lock:
            if tuple(classes) in self.variants[fam]:
                raise NotNative("native.c refused a launch of a registered variant")  # a class rule mismatch
            kernel = launcher.kernel
            opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
            compiled = kernel.warmup(*args, grid=grid, **constexprs, **opts)
            if hasattr(compiled, "result"):
                compiled = compiled.result()
            compiled._init_handles()
            param_args, kinds = native_parameters(compiled, len(args))
            if param_args is None:
                raise NotNative(f"{getattr(kernel, '__name__', 'kernel')}: {kinds}")
            md = compiled.metadata
            self.library.add_variant(fam, int(compiled.function), 32 * int(md.num_warps), int(md.shared), classes,
                                     param_args, kinds)
            self.variants[fam].append(tuple(classes))
            self.compiles += 1


class Recorder:
    """One phase's program, recorded: Launcher launches (through moecomm.jit.launch.recording) and the
    exchanges, then queued by run().

    ``sources``: tensors of the call (a dispatch's ids) whose addresses a later call of the same
    shapes changes: every recorded pointer into one of them becomes a patch of the phase's Template
    (template()); every other tensor it records is kept alive by the template (so an address in it
    always means that tensor)."""

    __slots__ = ("rt", "key", "ops", "launches", "families", "sources", "patches", "kept", "reusable", "splits")

    def __init__(self, rt: Runtime, key, sources: tuple = ()):
        self.rt, self.key = rt, key
        self.ops: list[int] = []
        self.launches: list = []
        self.families = rt.families
        self.sources = [_span(t) + (i,) for i, t in enumerate(sources)]
        self.patches: list = []
        self.kept: list = []
        self.reusable = True  # False: a pointer into a source's storage outside the source itself
        self.splits: list[int] = []  # where each exchange's send and receive units start in ops

    def __enter__(self):
        recording.recorder = self
        return self

    def __exit__(self, *exc):
        recording.recorder = None
        return False

    def launch(self, launcher: Launcher, grid, args, constexprs, num_warps, num_stages, _T=_Tensor) -> None:
        key = (id(launcher), self.key, tuple(constexprs.values()), num_warps, num_stages)
        fam = self.families.get(key)
        if fam is None:
            fam = self.rt.family(key)
        ops = self.ops
        self.launches.append((len(ops), fam, launcher, grid, args, constexprs, num_warps, num_stages))
        n = len(grid)
        ops += (OP_LAUNCH, fam, grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, len(args))
        if self.sources:
            for a in args:
                if type(a) is _T:
                    self._pointer(a)
                else:
                    ops.append(a)
        else:
            ops += [a.data_ptr() if type(a) is _T else a for a in args]

    def _pointer(self, t: torch.Tensor) -> None:
        """Append t's address (with sources: as a patch, or keeping t alive)."""
        p = t.data_ptr()
        if not self.sources:
            self.ops.append(p)
            return
        for lo, hi, _, _, i in self.sources:
            if lo <= p < hi:
                self.patches.append((len(self.ops), i, p - lo, p & 15))
                break
        else:
            if any(st_lo <= p < st_hi for _, _, st_lo, st_hi, _ in self.sources):
                self.reusable = False
            self.kept.append(t)
        self.ops.append(p)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, unit_bytes: int, send_units, recv_units) -> None:
        """out's rank-p part from rank p, inp's rank-p part to rank p (parts in units of unit_bytes)."""
        self.ops.append(OP_A2A)
        self._pointer(inp)
        self._pointer(out)
        self.ops += (unit_bytes, len(send_units))
        self.splits.append(len(self.ops))  # where a template's next splits go
        self.ops += (*send_units, *recv_units)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src on the device (both contiguous, of src's bytes)."""
        self.ops.append(OP_COPY)
        self._pointer(dst)
        self._pointer(src)
        self.ops.append(src.numel() * src.element_size())

    def to_host(self, host: torch.Tensor, src: torch.Tensor) -> None:
        """Copy src (contiguous, on the device) into host (pinned), then wait for the stream: the sync."""
        self.ops.append(OP_D2H)
        self._pointer(host)
        self._pointer(src)
        self.ops += (src.numel() * src.element_size(), OP_WAIT)

    def run(self, stream: int, comm: int, what: str, group, rank_of) -> None:
        """Queue the program on ``stream`` (raises NativeError; NotNative when nothing was queued)."""
        rt = self.rt
        try:
            prog = array("q", self.ops)
        except (TypeError, OverflowError) as exc:  # a float or a huge int among the arguments
            raise NotNative(f"an argument native.c cannot take ({exc})") from None
        for _ in range(MAX_VARIANTS + 1):
            rc = _queue(rt, prog, stream, comm)
            if rc == OK:
                return
            if rc == RESPECIALISE:  # nothing queued: add the variant this launch needs, and again
                at = rt.library.info[0]
                rec = next((r for r in self.launches if r[0] == at), None)
                if rec is None:
                    raise NotNative(f"native.c refused op {at}")
                rt.add_variant(rec[1], *rec[2:])
                continue
            raise _failure(rc, rt.library.info[0], rt.library.info[1], what, group, rank_of)
        raise NotNative("too many variants for one program")

    def template(self, result) -> Template:
        """The program queued by run(), for later calls whose only change is the sources' addresses
        (not ``reusable`` when it pointed into a source's storage outside the source)."""
        return Template(array("q", self.ops), tuple(self.patches), result, self.kept, self.reusable,
                        tuple(self.splits))


def _span(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(first byte, past the last byte) of the elements of ``t`` (an empty one: its address), then
    the same of its storage."""
    lo = t.data_ptr()
    end = lo + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) if t.numel() else lo + 1
    st = t.untyped_storage()
    return lo, end, st.data_ptr(), st.data_ptr() + st.nbytes()


class Template:
    """A recorded phase to queue again without recording it: the program, the slots that hold
    addresses in the call's sources (patched from the next call's), and what the recording
    returned (its tensors live in the dispatcher's Workspace, rewritten by every call).

    Valid for a call when everything the recorded wrappers' launches depend on besides the sources'
    addresses is in the caller's key (shapes, strides, dtypes, flags, the Workspace's buffer; the
    caller keeps a template in that Workspace's memo, which forgets it when the buffer grows) and
    each patched address has the recorded 16-byte alignment (Triton specialises on it: otherwise
    run() answers False and the caller records)."""

    __slots__ = ("prog", "patches", "result", "kept", "reusable", "splits", "table", "head")

    def __init__(self, prog: array, patches: tuple, result, kept: list, reusable: bool = True, splits: tuple = ()):
        self.prog, self.patches, self.result, self.kept, self.reusable = prog, patches, result, kept, reusable
        self.splits = splits
        self.table = array("q", [v for q in patches for v in q])  # (slot, source, offset, alignment) quadruples
        pa, pn = self.prog.buffer_info()
        ta, tn = self.table.buffer_info()
        self.head = (pa, pn, ta, tn // 4)  # moecomm_native_run_call's first words (both arrays live with self)

    def run(self, nat, addresses: list[int], what: str, group, splits: tuple = ()) -> bool:
        """Queue the program with the sources' ``addresses`` (the call's tensors' data_ptr(), in the
        recorded sources' order) and each exchange's ``splits`` (send units + receive units, in the
        recorded order; () keeps the recorded ones), as Recorder.run would (native.c patches a copy:
        the template is not written); False: not applicable (an address of another alignment class,
        nothing queued)."""
        rt, ptr, stream = nat
        lib = rt.library
        call = [*self.head, stream, ptr, _timeout_ns(), lib.info_addr, len(addresses), *addresses]
        if splits:
            sets = []
            for at, units in zip(self.splits, splits):
                sets += (at, len(units), *units)
            call.append(len(sets))
            call += sets
        else:
            call.append(0)
        block = array("q", call)
        rc = lib.run_call(block.buffer_info()[0], len(block))
        if rc == OK:
            rt.programs += 1
            return True
        if rc == RESPECIALISE:
            return False
        raise _failure(rc, lib.info[0], lib.info[1], what, group, _rank_of(group))


_TIMEOUT_NS: dict = {}  # MOECOMM_TIMEOUT_S as set -> nanoseconds (parsed once per value)


def _timeout_ns() -> int:
    """MOECOMM_TIMEOUT_S in nanoseconds (the bound of a program's waits)."""
    raw = _env.raw("MOECOMM_TIMEOUT_S")
    timeout_ns = _TIMEOUT_NS.get(raw)
    if timeout_ns is None:
        timeout_ns = _TIMEOUT_NS[raw] = int(_env.timeout_s() * 1e9)
    return timeout_ns


def _queue(rt: Runtime, prog: array, stream: int, comm: int) -> int:
    """One native.c run of ``prog``: its status (OK counted in rt.programs)."""
    lib = rt.library
    addr, n = prog.buffer_info()
    rc = lib.run(addr, n, stream, comm, _timeout_ns(), lib.info_addr)
    if rc == OK:
        rt.programs += 1
    return rc


def _rank_of(group):
    """rank_of() of _failure: this rank's global rank in ``group``."""

    def rank_of():
        from ...distributed.collectives import global_rank, group_info

        return global_rank(group, group_info(group)[0])

    return rank_of


def _failure(rc: int, at: int, code: int, what: str, group, rank_of) -> Exception:
    """The exception of a failed run (rank_of(): this rank's global rank, for the message)."""
    rank = rank_of()
    if rc == BAD_PROGRAM:
        return NotNative(f"native.c rejected the program at op {at}")
    if rc == NOT_READY:
        return NotNative("native.c was not initialised")
    if rc == TIMEOUT:
        msg = (f"rank {rank}: {what} did not complete within MOECOMM_TIMEOUT_S = {_env.timeout_s():g} s "
               "(a peer stopped, or the ranks called the exchange in different orders)")
    elif rc == NCCL_ERROR:
        msg = f"rank {rank}: {what} failed in NCCL (ncclResult_t {code})"
    else:
        msg = f"rank {rank}: {what} failed on the device (CUresult {code})"
    exc = NativeError(msg)
    if rc in (TIMEOUT, NCCL_ERROR):
        from ...distributed.health import explain_failure

        try:
            explain_failure(group, what, exc)  # raises RankFailureError naming the rank at fault, if it can
        except Exception as named:  # noqa: BLE001 (returned to be raised by the caller)
            return named
    return exc


# ----------------------------------------------------------------------------- which processes take it

_RUNTIME: list = []  # [] not tried; [None] unavailable; [Runtime]
_WHY_NOT: list[str] = []  # why it is unavailable
_STATE_LOCK = threading.Lock()


def unavailable() -> str | None:
    """Why this process has no runtime (None: it has one, or has not tried yet)."""
    return _WHY_NOT[-1] if _WHY_NOT else None


_ENABLED: dict = {}  # MOECOMM_EP_NATIVE as set (raw) -> enabled()


def enabled() -> bool:
    """MOECOMM_EP_NATIVE (default 1): 0 keeps the throughput mode on its Python path."""
    raw = _env.raw("MOECOMM_EP_NATIVE")
    on = _ENABLED.get(raw)
    if on is None:
        on = _ENABLED[raw] = _env.get("MOECOMM_EP_NATIVE").strip().lower() not in ("0", "false", "no", "off")
    return on


def _process_runtime() -> Runtime | None:
    if not _RUNTIME:
        with _STATE_LOCK:
            if not _RUNTIME:
                try:
                    import triton

                    if triton.__version__.split(".")[:2] != ["3", "6"]:
                        raise NotNative(f"Triton {triton.__version__} (the path reads Triton 3.6's kernels)")
                    _RUNTIME.append(Runtime(load_library(_api_functions())))
                except Exception as exc:  # noqa: BLE001 (any failure leaves the Python path, said once)
                    _RUNTIME.append(None)
                    _WHY_NOT.append(f"{type(exc).__name__}: {exc}")
                    _backend.log.info("moecomm: the EP dispatcher's native path is off in this process (%s: %s)",
                                      type(exc).__name__, exc)
    return _RUNTIME[0]


def disable(why: str) -> None:
    """Turn the path off for this process (a kernel it cannot launch), said once."""
    with _STATE_LOCK:
        _RUNTIME[:] = [None]
        _WHY_NOT.append(why)
    _backend.warn_once("ep-native-off", f"moecomm: the EP dispatcher's native path is off from now on ({why})")


def comm_of(group) -> int:
    """The NCCL communicator (ncclComm_t) of ``group``'s CUDA backend, 0 when there is none yet."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:
        backend = pg._get_backend(torch.device("cuda"))
    except Exception:  # noqa: BLE001 (no CUDA backend on this group)
        return 0
    ptr = getattr(backend, "_comm_ptr", None)
    if ptr is None:
        return 0
    try:
        return int(ptr())
    except Exception:  # noqa: BLE001
        return 0


_COMMS: dict = {}  # id(process group) -> (the group, its communicator): the group kept so its id is not reused


def comm(group) -> int:
    """comm_of(group), remembered once it exists (~0.3 us a call then). group None: the default
    group now (a destroyed and re-created default group is another object, another entry)."""
    if group is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0
        group = dist.distributed_c10d._get_default_group()
    hit = _COMMS.get(id(group))
    if hit is not None and hit[0] is group:
        return hit[1]
    ptr = comm_of(group)
    if ptr:
        if len(_COMMS) >= 64:
            _COMMS.clear()
        _COMMS[id(group)] = (group, ptr)
    return ptr


def why_not(group, device: torch.device) -> str | None:
    """Why a synchronous throughput-mode call on ``device`` over ``group`` would not take the native
    path now (None: it would)."""
    if device.type != "cuda":
        return f"{device.type} tensors (the path queues CUDA kernels and NCCL)"
    if not enabled():
        return "MOECOMM_EP_NATIVE=0"
    if runtime(group, device) is None:
        return unavailable()
    if not comm(group):
        return "no NCCL communicator of the group (not NCCL, not created yet, or ProcessGroupNCCL has no _comm_ptr)"
    return None


def runtime(group, device: torch.device) -> Runtime | None:
    """The runtime when this call may take the native path (see the module doc), else None."""
    if device.type != "cuda" or not enabled():
        return None
    rt = _RUNTIME[0] if _RUNTIME else _process_runtime()
    return rt


# ----------------------------------------------------------------------------- the dispatcher's use


def for_call(group, dev: torch.device, async_op: bool):
    """(runtime, communicator, stream) when a synchronous throughput-mode call on ``dev`` over
    ``group`` queues its phases natively (see the module doc), else None."""
    if async_op or dev.type != "cuda":
        return None
    rt = runtime(group, dev)
    if rt is None:
        return None
    ptr = comm(group)
    if not ptr:
        return None
    return rt, ptr, rt.stream(dev.index if dev.index is not None else torch.cuda.current_device())


def for_combine(handle, dev: torch.device, async_op: bool):
    """for_call of a combine: its dispatch's when that took the native path and the current stream
    is still the one it queued on (no second look-up of the group's communicator)."""
    nat = getattr(handle, "nat", None)
    if nat is not None and not async_op and enabled() and _RUNTIME and _RUNTIME[0] is nat[0]:
        if nat[0].stream(dev.index if dev.index is not None else torch.cuda.current_device()) == nat[2]:
            return nat
    return for_call(handle.group, dev, async_op)


def phase(nat, key, what: str, group, record, sources: tuple | None = None):
    """Record ``record(recorder)`` (launches and exchanges) and queue it in one native call: True,
    or with ``sources`` (see Recorder) the phase's Template (what ``record`` returned as its
    result). False when it cannot be queued natively (nothing was queued; the path is then off for
    the process, said once): the caller runs the phase in Python."""
    rt, ptr, stream = nat
    rec = Recorder(rt, key, sources or ())
    try:
        with rec:
            result = record(rec)
        rec.run(stream, ptr, what, group, _rank_of(group))
    except NotNative as why:
        disable(str(why))
        return False
    return rec.template(result) if sources is not None else True
