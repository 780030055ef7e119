"""plan()'s page-table work in compiled C: kernels/attention/plan_host.c through ctypes.

# B = batch, P = page_size

The wrappers' numpy path (decode.py, prefill.py) is the reference and stays: this module only
offers one C call that does what it does (checks, lengths, split-KV chunks or query tiles, every
staging section) and says whether it could. The contract, kept by plan_host.c and tested by
tests/attention/test_plan_host.py over thousands of random plans: status 0, the staging buffer holds
exactly what the numpy path writes; any other status, nothing was written and plan() runs its numpy
path, which raises its error (one place for the messages) or plans.

Host cost, why the glue looks as it does: a ctypes call costs ~0.4 us plus ~0.07 us per argument,
a tensor attribute ~0.06-0.1 us, data_ptr() ~0.09 us (arr.ctypes.data ~1 us, so addresses come from
torch). So the C functions take one argument, the address of an int64 block (``Args``): a call's
inputs go in with one slice assignment (~0.25 us for ten ints), the wrapper's configuration is
written when its scalars change, and the C function leaves its results at the block's end.

The library is built on the first plan() of a process that needs it (~0.4 s here, then cached on disk by
moecomm.jit.host): no C compiler, a compile error or a library that does not load leave plan() on
its numpy path, logged once. MOECOMM_HOST_C=0 (read when a wrapper is made) keeps it there silently.
"""

from __future__ import annotations

import ctypes

import torch

from ..errors import MoeCommError
from ..jit import backend as _backend
from ..jit import host as _host

SOURCE = "attention/plan_host.c"
VERSION = 2  # plan_host.c's PLAN_VERSION: the layout of the args block below

# statuses (plan_host.c)
OK, INVALID, UNSUPPORTED, NEED_ROOM, NO_MEMORY = 0, 1, 2, 3, 4
# flags (plan_host.c F_*)
F_INDPTR64, F_LAST64, F_IDS64, F_HOST_IDS, F_QO64, F_CAUSAL, F_CONSECUTIVE = 1, 2, 4, 8, 16, 32, 64
# the args block (plan_host.c A_*, D_* / P_*, O_*): this call's inputs [0:16], the configuration
# [16:32], the results [32:40]
NUM_ARGS, CONFIG, OUT = 40, 16, 32
A_STAGING = 8  # [A_STAGING, A_STAGING + 2): the staging buffer's address and size

_FUNCTIONS = {
    "moecomm_plan_version": (ctypes.c_int, []),
    "moecomm_decode_plan": (ctypes.c_int, [ctypes.c_void_p]),
    "moecomm_prefill_plan": (ctypes.c_int, [ctypes.c_void_p]),
}
_LIB: list = []  # [] not tried yet; [None] unavailable (logged); [lib] loaded


def library():
    """The loaded plan_host library, or None where it cannot be built or loaded here (logged once)."""
    if _LIB:
        return _LIB[0]
    lib = None
    try:
        lib = _host.load(SOURCE, _FUNCTIONS)
        if lib.moecomm_plan_version() != VERSION:
            raise MoeCommError(f"{SOURCE} is version {lib.moecomm_plan_version()}, this moecomm expects {VERSION}")
    except Exception as exc:  # noqa: BLE001 (no compiler, a compile error, a cache or load failure...: never plan()'s)
        lib = None
        _backend.warn_once("attention-plan-host-c",
                           f"attention plan(): its compiled C path is not usable ({str(exc).splitlines()[0]}); plan() "
                           "runs its numpy path (about 3x the host time). Set MOECOMM_HOST_C=0 to silence this.")
    _LIB.append(lib)
    return lib


def forget() -> None:
    """Forget the library (tests: the next library() tries again)."""
    _LIB.clear()


_TENSOR = torch.Tensor
_WIDE = {torch.int32: 0, torch.int64: 1}  # dtype -> 1 for int64


class Args:
    """The args block of one wrapper's C calls (plan_host.c), its C function, and what the wrapper
    keeps beside them (``knobs``: the module settings the configuration was made with; ``extra``:
    the wrapper's own)."""

    __slots__ = ("block", "ptr", "fn", "knobs", "extra")

    def __init__(self, fn, config: list[int]):
        self.block = (ctypes.c_int64 * NUM_ARGS)()
        self.block[CONFIG:CONFIG + len(config)] = config
        self.ptr = ctypes.addressof(self.block)
        self.fn = fn
        self.knobs = self.extra = None

    def out(self, n: int) -> list[int]:
        """The first ``n`` results."""
        return self.block[OUT:OUT + n]

    def tables(self, indptr, last, ids, num_pages, st, qo=None, flags: int = 0) -> int | None:
        """Write a call's inputs: the page table (``qo``: prefill's qo_indptr too), the staging buffer
        ``st`` after picking its host buffer (st.ensure(0)), the flags (``flags``: the caller's, F_CAUSAL
        say, and the tables' dtypes); return the flags, or None (nothing
        written, the ring untouched) where the numpy path decides: a table that is not a 1-D
        contiguous int32/int64 CPU tensor (a list, a numpy array, a device tensor: numpy converts or
        rejects it), ids not a tensor, a num_pages that is not a plain int."""
        if type(indptr) is not _TENSOR or type(last) is not _TENSOR or type(ids) is not _TENSOR:
            return None
        wi, wl, wd = _WIDE.get(indptr.dtype), _WIDE.get(last.dtype), _WIDE.get(ids.dtype)
        if (wi is None or wl is None or wd is None or not indptr.is_cpu or not last.is_cpu or indptr.dim() != 1
                or last.dim() != 1 or not indptr.is_contiguous() or not last.is_contiguous()):
            return None
        flags |= wi * F_INDPTR64 | wl * F_LAST64
        if ids.is_cpu:
            if ids.dim() != 1 or not ids.is_contiguous():
                return None
            flags |= F_HOST_IDS | wd * F_IDS64
            ids_ptr = ids.data_ptr()
        else:  # on a device: never read (a meta tensor has no address at all)
            ids_ptr = 0
        if num_pages is None:
            num_pages = -1
        elif type(num_pages) is not int or not 0 <= num_pages < 2**62:
            return None
        if qo is not None:
            if type(qo) is not _TENSOR or not qo.is_cpu or qo.dim() != 1 or not qo.is_contiguous():
                return None
            wq = _WIDE.get(qo.dtype)
            if wq is None:
                return None
            flags |= wq * F_QO64
            self.block[10:12] = (qo.data_ptr(), qo.shape[0])
        st.ensure(0)  # the host buffer to write (a GPU's ring moves on)
        self.block[0:10] = (indptr.data_ptr(), indptr.shape[0], last.data_ptr(), last.shape[0], ids_ptr, ids.shape[0],
                            flags, num_pages, st.host_ptr, st.size)
        return flags

    def call(self, st) -> int:
        """Run the C function on the inputs written; grow ``st`` and run again when it says so."""
        rc = self.fn(self.ptr)
        if rc == NEED_ROOM:
            st.ensure(self.block[OUT + 3])  # O_NEED / O_P_NEED
            self.block[A_STAGING:A_STAGING + 2] = (st.host_ptr, st.size)
            rc = self.fn(self.ptr)
        return rc


def decode_args(page_size: int, window_left: int, block_n: int, target: int, split_below: int, num_kv_heads: int,
                disable_split: bool, kv_chunk_size, graph: bool, max_batch: int, max_work: int, layout_work: int,
                ids_cap: int, align: int, min_chunk: int) -> Args | None:
    """The decode configuration (plan_host.c D_*), or None where the C path does not take it (no
    library; a kv_chunk_size that is not an int: its numpy path decides)."""
    if kv_chunk_size is not None and type(kv_chunk_size) is not int:
        return None
    if not (-1 <= window_left < 2**62):
        return None
    lib = library()
    if lib is None:
        return None
    chunk = 0 if kv_chunk_size is None else -(-max(kv_chunk_size, 1) // block_n) * block_n
    if chunk >= 2**62:
        return None
    return Args(lib.moecomm_decode_plan, [page_size, window_left, block_n, target, split_below, num_kv_heads,
                                          int(bool(disable_split)), chunk, int(graph), max_batch, max_work, layout_work,
                                          ids_cap, align, min_chunk])


def prefill_args(page_size: int, block_m: int, graph: bool, max_batch: int, max_tokens: int, tile_cap: int,
                 ids_cap: int, align: int, max_tiles: int) -> Args | None:
    """The prefill configuration (plan_host.c P_*), or None without the library."""
    lib = library()
    if lib is None:
        return None
    return Args(lib.moecomm_prefill_plan, [page_size, block_m, int(graph), max_batch, max_tokens, tile_cap, ids_cap,
                                           align, max_tiles])
