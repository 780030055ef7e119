"""kernels/ep/native.c and moecomm/ep/nccl/native.py: the throughput mode's phases queued in one C call.

CPU: native.c loaded privately (a copy of the compiled library, so its process-wide tables are the
test's) with stand-ins of the driver's and NCCL's functions that record every call: programs of
launches, exchanges, copies and waits queue exactly those calls (parameters as the compiled
signature lists them, offsets of every peer's part), a program is validated before anything is
queued, variants are chosen by the specialisation classes of the values (the same classes in C and
in Python, and the same partition of ints as moecomm.jit.launch.spec_key), the wait is bounded and
sees NCCL's async error. The Recorder's program layout and its thread-locality, and
native_parameters against the PTX of real compiled kernels.
GPU (one-rank NCCL group): the native round trip equal to the Python path's, bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import struct
import threading
from array import array

import pytest
import torch

from moecomm.ep.nccl import native as N
from moecomm.jit import host as _host
from moecomm.jit.launch import Launcher, recording, spec_key

pytestmark = pytest.mark.skipif(_host.compile_error() is not None, reason="no C compiler")

LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                          ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                          ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
QUERY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
D2H = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
D2D = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
GROUP = ctypes.CFUNCTYPE(ctypes.c_int)
P2P = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p)
ASYNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))


class FakeApi:
    """Stand-ins for cuLaunchKernel, cuStreamQuery, cuMemcpyDtoHAsync, ncclGroupStart/End,
    ncclSend/Recv, ncclCommGetAsyncError and cuMemcpyDtoDAsync: each call appended to ``calls``."""

    def __init__(self, param_kinds: dict[int, list[str]] | None = None):
        self.calls: list = []
        self.param_kinds = param_kinds or {}  # function -> struct formats of its parameters
        self.not_ready = 0  # cuStreamQuery answers NOT_READY this many times
        self.async_error = 0
        self.send_rc = 0

        def launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            fmts = self.param_kinds.get(f, [])
            vals = [struct.unpack(fmt, ctypes.string_at(params[i], struct.calcsize(fmt)))[0]
                    for i, fmt in enumerate(fmts)]
            self.calls.append(("launch", f, (gx, gy, gz), (bx, by, bz), smem, stream, vals))
            return 0

        def query(stream):
            if self.not_ready > 0:
                self.not_ready -= 1
                return 600
            self.calls.append(("query", stream))
            return 0

        def d2h(dst, src, n, stream):
            self.calls.append(("d2h", dst, src, n, stream))
            return 0

        def d2d(dst, src, n, stream):
            self.calls.append(("d2d", dst, src, n, stream))
            return 0

        def group_start():
            self.calls.append(("group_start",))
            return 0

        def group_end():
            self.calls.append(("group_end",))
            return 0

        def send(buf, count, dtype, peer, comm, stream):
            self.calls.append(("send", buf, count, dtype, peer, comm, stream))
            return self.send_rc

        def recv(buf, count, dtype, peer, comm, stream):
            self.calls.append(("recv", buf, count, dtype, peer, comm, stream))
            return 0

        def async_err(comm, out):
            out[0] = self.async_error
            return 0

        self._keep = [LAUNCH(launch), QUERY(query), D2H(d2h), GROUP(group_start), GROUP(group_end), P2P(send),
                      P2P(recv), ASYNC(async_err), D2D(d2d)]

    def addresses(self) -> list[int]:
        return [ctypes.cast(f, ctypes.c_void_p).value for f in self._keep]


@pytest.fixture
def native_lib(tmp_path):
    """(Library with the stand-ins, FakeApi): a private copy of native.c's library."""
    compiled = _host.compile(N.SOURCE)
    copy = tmp_path / "native-private.so"
    shutil.copy(compiled.path, copy)
    lib = ctypes.CDLL(str(copy))
    for name, (restype, argtypes) in N._FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
    api = FakeApi()
    return N.Library(lib, api.addresses()), api


def _run(library, ops, stream=0x51, comm=0xC0, timeout_s=5.0):
    from array import array

    prog = array("q", ops)
    addr, n = prog.buffer_info()
    rc = library.run(addr, n, stream, comm, int(timeout_s * 1e9), library.info_addr)
    return rc, (library.info[0], library.info[1])


def _variant(library, api, fn, args, param_args, kinds, block=128, smem=0):
    fam = library.new_family()
    classes = [N.class_code(a) for a in args]
    library.add_variant(fam, fn, block, smem, classes, param_args, kinds)
    api.param_kinds[fn] = [{1: "=Q", 2: "=i", 3: "=q"}[k] for k in kinds] + ["=Q", "=Q"]
    return fam


def test_launch_packs_the_parameters_the_compiled_signature_lists(native_lib):
    library, api = native_lib
    t = torch.zeros(64, dtype=torch.int32)
    args = [t.data_ptr(), 7, 1, 1 << 40, 32]  # a pointer, an i32, an int specialised to 1, an i64, an i32
    fam = _variant(library, api, 0x1000, [t, 7, 1, 1 << 40, 32], [0, 1, 3, 4], [1, 2, 3, 2], block=256, smem=96)
    rc, _ = _run(library, [N.OP_LAUNCH, fam, 6, 3, 1, len(args), *args])
    assert rc == N.OK
    (call,) = api.calls
    assert call[:6] == ("launch", 0x1000, (6, 3, 1), (256, 1, 1), 96, 0x51)
    # the int 1 is no parameter (Triton made it a constant); then the two null scratch pointers
    assert call[6] == [t.data_ptr(), 7, 1 << 40, 32, 0, 0]
    api.calls.clear()
    rc, _ = _run(library, [N.OP_LAUNCH, fam, 0, 3, 1, len(args), *args])  # empty grid: nothing launched
    assert rc == N.OK and api.calls == []


@pytest.mark.parametrize("change, ok", [
    ((1, 9), True),  # 7 -> 9: still an odd i32
    ((1, 16), False),  # divisible by 16: another specialisation
    ((1, 1), False),  # == 1: a constant in Triton's kernel
    ((1, 1 << 33), False),  # i64
    ((0, "unaligned"), False),  # a pointer not 16-byte aligned
    ((3, 1 << 41), True),
])
def test_a_value_of_another_class_is_refused_before_anything_is_queued(native_lib, change, ok):
    library, api = native_lib
    t = torch.zeros(64, dtype=torch.int32)
    base = [t, 7, 1, 1 << 40, 32]
    fam = _variant(library, api, 0x1000, base, [0, 1, 3, 4], [1, 2, 3, 2])
    vals = [t.data_ptr(), 7, 1, 1 << 40, 32]
    i, v = change
    vals[i] = t.data_ptr() + 4 if v == "unaligned" else v
    first = [N.OP_LAUNCH, fam, 1, 1, 1, 5, t.data_ptr(), 7, 1, 1 << 40, 32]  # a good launch first
    rc, info = _run(library, first + [N.OP_LAUNCH, fam, 1, 1, 1, 5, *vals])
    if ok:
        assert rc == N.OK and len(api.calls) == 2
    else:
        assert (rc, info) == (N.RESPECIALISE, (len(first), fam)) and api.calls == []


def test_variants_are_chosen_by_class(native_lib):
    library, api = native_lib
    fam = library.new_family()
    for fn, n in ((0x2000, 5), (0x2001, 16)):
        library.add_variant(fam, fn, 128, 0, [N.class_code(n)], [0], [2])
        api.param_kinds[fn] = ["=i", "=Q", "=Q"]
    rc, _ = _run(library, [N.OP_LAUNCH, fam, 1, 1, 1, 1, 3, N.OP_LAUNCH, fam, 1, 1, 1, 1, 48])
    assert rc == N.OK
    assert [(c[1], c[6][0]) for c in api.calls] == [(0x2000, 3), (0x2001, 48)]


def test_classes_agree_with_spec_key():
    """Two ints share a class exactly when spec_key gives them the same key (Triton's specialisation)."""
    vals = [0, 1, 2, 3, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -1, -16, -17, 2**40, 2**40 + 1]
    for a in vals:
        for b in vals:
            assert (N.class_code(a) == N.class_code(b)) == (spec_key((a,)) == spec_key((b,))), (a, b)
    t = torch.zeros(8, dtype=torch.int64)
    assert N.class_code(t) == 1 and N.class_code(t[1:]) == 2 and N.class_code(t[2:]) == 1
    with pytest.raises(N.NotNative):
        N.class_code(1.5)


def test_all_to_all_sends_and_receives_every_part_at_its_offset(native_lib):
    library, api = native_lib
    rc, _ = _run(library, [N.OP_A2A, 0x10000, 0x90000, 100, 3, 2, 0, 5, 1, 4, 0], comm=0xC0)
    assert rc == N.OK
    assert api.calls == [
        ("group_start",),
        ("send", 0x10000, 200, 0, 0, 0xC0, 0x51), ("recv", 0x90000, 100, 0, 0, 0xC0, 0x51),
        ("recv", 0x90000 + 100, 400, 0, 1, 0xC0, 0x51),  # nothing to send to rank 1
        ("send", 0x10000 + 200, 500, 0, 2, 0xC0, 0x51),  # nothing to receive from rank 2
        ("group_end",),
    ]


def test_a_device_copy(native_lib):
    library, api = native_lib
    rc, _ = _run(library, [N.OP_COPY, 0x9000, 0x7000, 24, N.OP_COPY, 0x9000, 0x7000, 0])
    assert rc == N.OK and api.calls == [("d2d", 0x9000, 0x7000, 24, 0x51)]  # nothing for 0 bytes


def test_a_one_rank_exchange_is_a_device_copy(native_lib):
    # W 1: no NCCL kernel (c10d's one-rank all_to_all_single copies too); an empty one queues nothing
    library, api = native_lib
    rc, _ = _run(library, [N.OP_A2A, 0x10000, 0x90000, 12, 1, 5, 5, N.OP_A2A, 0x10000, 0x90000, 12, 1, 0, 0])
    assert rc == N.OK and api.calls == [("d2d", 0x90000, 0x10000, 60, 0x51)]


def _run_patched_(library, ops, table, srcs, sets, n_prog=None, via="block"):
    """moecomm_native_run_patched's run, through its arguments or (via "block") moecomm_native_run_call's block."""
    from array import array

    prog, tab, src, st = array("q", ops), array("q", table), array("q", srcs), array("q", sets)
    before = list(prog)
    pn = len(prog) if n_prog is None else n_prog
    if via == "block":
        block = array("q", [prog.buffer_info()[0], pn, tab.buffer_info()[0], len(tab) // 4, 0x51, 0xC0, 10**9,
                            library.info_addr, len(src), *src, len(st), *st])
        rc = library.run_call(block.buffer_info()[0], len(block))
    else:
        rc = library.run_patched(prog.buffer_info()[0], pn, tab.buffer_info()[0], len(tab) // 4, src.buffer_info()[0],
                                 len(src), st.buffer_info()[0], len(st), 0x51, 0xC0, 10**9, library.info_addr)
    assert list(prog) == before  # the template's program is never written
    return rc, library.info[0]


def test_a_call_block_that_does_not_add_up_queues_nothing(native_lib):
    library, api = native_lib
    prog = array("q", [N.OP_COPY, 0x7000, 0x9000, 8])
    for tail in ([1, 0x7000], [0, 5], [2, 0x7000, 0x9000], [-1, 0], [0, 1, 4, 0]):  # nsrcs, srcs, nsets, sets: lengths off
        block = array("q", [prog.buffer_info()[0], 4, 0, 0, 0x51, 0xC0, 10**9, library.info_addr, *tail])
        assert library.run_call(block.buffer_info()[0], len(block)) == N.BAD_PROGRAM and api.calls == [], tail
    block = array("q", [prog.buffer_info()[0], 4, 0, 0, 0x51, 0xC0, 10**9, library.info_addr, 0, 0])
    assert library.run_call(block.buffer_info()[0], len(block)) == N.OK
    assert api.calls == [("d2d", 0x7000, 0x9000, 8, 0x51)]


@pytest.mark.parametrize("via", ["block", "arguments"])
def test_a_patched_program_queues_its_sources_addresses_and_splits(native_lib, via):
    """A template's run: addresses rewritten from the call's sources (+ offsets), split sizes set,
    then queued as moecomm_native_run would; an address of another alignment class, or a slot or
    source out of range, queues nothing. Through the arguments and through one call block (what
    Template.run uses)."""
    library, api = native_lib
    _run_patched = functools.partial(_run_patched_, via=via)
    ops = [N.OP_COPY, 0, 0, 24, N.OP_A2A, 0, 0, 12, 1, 7, 7]
    table = [1, 0, 32, 0, 2, 1, 0, 0, 5, 1, 16, 0, 6, 0, 0, 0]  # (slot, source, offset, alignment)
    rc, _ = _run_patched(library, ops, table, [0x7000, 0x9000], [9, 2, 3, 3])
    assert rc == N.OK
    assert api.calls == [("d2d", 0x7020, 0x9000, 24, 0x51), ("d2d", 0x7000, 0x9010, 36, 0x51)]
    api.calls.clear()
    rc, at = _run_patched(library, ops, table, [0x7000, 0x9008], [])  # source 1 now 8 bytes off its class
    assert (rc, at) == (N.RESPECIALISE, -2) and api.calls == []
    for table_, srcs, sets in (([11, 0, 0, 0], [0x7000], []), ([1, 2, 0, 0], [0x7000], []),
                               ([], [], [10, 2, 1, 1]), ([], [], [9, 3, 1])):
        rc, _ = _run_patched(library, ops, table_, srcs, sets)
        assert rc == N.BAD_PROGRAM and api.calls == [], (table_, srcs, sets)
    # longer than native.c's stack copy (MAX_PROG 4096): copied to the heap, the same program
    long_ops = [N.OP_COPY, 0, 0, 8] * 1100
    rc, _ = _run_patched(library, long_ops, [4397, 0, 0, 0], [0x4000], [])
    assert rc == N.OK and len(api.calls) == 1100 and api.calls[-1][1] == 0x4000 and api.calls[-2][1] == 0


def test_a_failed_send_closes_the_group_and_names_ncclResult(native_lib):
    library, api = native_lib
    api.send_rc = 3  # ncclInternalError
    rc, info = _run(library, [N.OP_A2A, 0x10000, 0x90000, 4, 2, 1, 1, 1, 1])
    assert (rc, info) == (N.NCCL_ERROR, (0, 3))
    assert api.calls[0] == ("group_start",) and api.calls[-1] == ("group_end",)


def test_copy_then_wait(native_lib):
    library, api = native_lib
    api.not_ready = 200
    rc, _ = _run(library, [N.OP_D2H, 0x7000, 0x8000, 24, N.OP_WAIT])
    assert rc == N.OK and api.calls == [("d2h", 0x7000, 0x8000, 24, 0x51), ("query", 0x51)] and api.not_ready == 0


def test_wait_is_bounded_and_sees_the_async_error(native_lib):
    import time

    library, api = native_lib
    api.not_ready = 10**12
    t0 = time.perf_counter()
    rc, info = _run(library, [N.OP_D2H, 0x7000, 0x8000, 24, N.OP_WAIT], timeout_s=0.05)
    assert (rc, info[0]) == (N.TIMEOUT, 4) and time.perf_counter() - t0 < 2.0
    api.async_error = 6  # ncclRemoteError
    rc, info = _run(library, [N.OP_WAIT], timeout_s=60)
    assert (rc, info) == (N.NCCL_ERROR, (0, 6))


@pytest.mark.parametrize("bad", [
    [99],  # no such op
    [N.OP_LAUNCH, 12345, 1, 1, 1, 0],  # no such family
    [N.OP_A2A, 1, 2, 4, 2, 1, -1, 1, 1],  # a negative count
    [N.OP_A2A, 1, 2, 4, 3, 1, 1],  # counts cut short
    [N.OP_A2A, 1, 2, 4, 1, 3, 2],  # a one-rank group receiving other than it sends
    [N.OP_D2H, 1, 2],
    [N.OP_COPY, 1, 2, -4],
])
def test_a_bad_program_queues_nothing(native_lib, bad):
    library, api = native_lib
    fam = _variant(library, api, 0x1000, [5], [0], [2])
    rc, info = _run(library, [N.OP_LAUNCH, fam, 1, 1, 1, 1, 5] + bad)
    assert (rc, info[0]) == (N.BAD_PROGRAM, 7) and api.calls == []


def test_add_variant_checks_its_description(native_lib):
    library, _ = native_lib
    fam = library.new_family()
    with pytest.raises(N.NotNative):
        library.add_variant(fam, 1, 128, 0, [17], [1], [2])  # parameter of argument 1 of a 1-argument kernel
    with pytest.raises(N.NotNative):
        library.add_variant(fam, 1, 128, 0, [17], [0], [7])  # no such kind
    for i in range(N.MAX_VARIANTS):
        library.add_variant(fam, 1, 128, 0, [17], [0], [2])
    with pytest.raises(N.NotNative):
        library.add_variant(fam, 1, 128, 0, [17], [0], [2])


def test_recorder_records_launches_and_exchanges_on_its_thread_only():
    from moecomm.ep.nccl._triton import ep_gather_sum_kernel

    class _Rt:
        def __init__(self):
            self.keys = []
            self.families = {}  # the recorder looks here first, then asks family()

        def family(self, key):
            self.keys.append(key)
            return 7

    rt = _Rt()
    launcher = Launcher(ep_gather_sum_kernel)
    src, idx = torch.zeros(4, 8), torch.zeros(2, 3, dtype=torch.int32)
    rec = N.Recorder(rt, ("k",))
    seen = []
    with rec:
        launcher((2, 1), (src, idx, src, idx, 4, 8, 1, 3, 1, 8), {"H": 8, "C": 3, "BLOCK_H": 8}, 4)
        t = threading.Thread(target=lambda: seen.append(recording.recorder))
        t.start()
        t.join()
        rec.all_to_all(src, idx, 12, [1, 2], [3, 4])
        rec.to_host(idx, src)
    assert recording.recorder is None and seen == [None]
    assert rt.keys == [(id(launcher), ("k",), (8, 3, 8), 4, None)]
    assert rec.ops == [N.OP_LAUNCH, 7, 2, 1, 1, 10, src.data_ptr(), idx.data_ptr(), src.data_ptr(), idx.data_ptr(), 4,
                       8, 1, 3, 1, 8,
                       N.OP_A2A, idx.data_ptr(), src.data_ptr(), 12, 2, 1, 2, 3, 4,
                       N.OP_D2H, idx.data_ptr(), src.data_ptr(), 4 * 8 * 4, N.OP_WAIT]
    assert rec.launches[0][:2] == (0, 7)


def test_native_path_is_off_without_cuda_or_when_asked(monkeypatch):
    assert N.runtime(None, torch.device("cpu")) is None
    monkeypatch.setenv("MOECOMM_EP_NATIVE", "0")
    assert not N.enabled() and N.runtime(None, torch.device("cuda", 0)) is None
    assert N.comm_of(None) == 0  # no process group here


def test_combine_takes_its_dispatchs_runtime_only_on_the_same_stream(monkeypatch):
    """for_combine: the dispatch's (runtime, communicator, stream) while the current stream is the one
    it queued on and the path is on; otherwise a fresh for_call (another stream, async, turned off)."""
    from types import SimpleNamespace

    class _Rt:
        current = 0x51

        def stream(self, index):
            return self.current

    rt = _Rt()
    monkeypatch.setattr(N, "_RUNTIME", [rt])
    fresh = []
    monkeypatch.setattr(N, "for_call", lambda group, dev, async_op: fresh.append((group, async_op)) or "fresh")
    handle = SimpleNamespace(nat=(rt, 0xC0, 0x51), group="g")
    dev = torch.device("cuda", 0)
    assert N.for_combine(handle, dev, False) is handle.nat and fresh == []
    rt.current = 0x52  # the caller moved to another stream
    assert N.for_combine(handle, dev, False) == "fresh" and fresh == [("g", False)]
    rt.current = 0x51
    assert N.for_combine(handle, dev, True) == "fresh"
    monkeypatch.setenv("MOECOMM_EP_NATIVE", "0")
    assert N.for_combine(handle, dev, False) == "fresh"
    monkeypatch.delenv("MOECOMM_EP_NATIVE")
    monkeypatch.setattr(N, "_RUNTIME", [None])  # the path turned off since the dispatch
    assert N.for_combine(handle, dev, False) == "fresh"
    assert N.for_combine(SimpleNamespace(group="g"), dev, False) == "fresh" and len(fresh) == 5


def _native_parameters_match_the_ptx() -> int:
    """native_parameters of real compiled kernels against their PTX: as many parameters (plus the
    two scratch pointers), of the same widths, in the same order."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from moecomm.ep.nccl._triton import ep_gather_sum_kernel, ep_sort_scan_kernel
    from moecomm.jit.launch import native_parameters

    cases = [
        (ep_gather_sum_kernel, {"src_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*bf16", "cnt_ptr": "*i32",
                                "num_src_rows": "i32", "stride_sm": "i32", "stride_sh": "constexpr", "stride_im": "i32",
                                "stride_ic": "constexpr", "stride_om": "i64", "H": "constexpr", "C": "constexpr",
                                "BLOCK_H": "constexpr", "CNT_W": "constexpr", "CNT_WP": "constexpr",
                                "CNT_ROWS": "constexpr", "CNT_SRC": "constexpr"},
         {"stride_sh": 1, "stride_ic": 1, "H": 4096, "C": 2, "BLOCK_H": 1024, "CNT_W": 2, "CNT_WP": 2, "CNT_ROWS": 3,
          "CNT_SRC": -1}, 10),
        (ep_sort_scan_kernel, {"hist_ptr": "*i32", "base_ptr": "*i32", "NB": "i32", "HC": "i32",
                               "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}, {"BLOCK_B": 64, "BLOCK_C": 32}, 4),
    ]
    width = {1: "u64", 2: "u32", 3: "u64"}
    for kernel, sig, consts, n in cases:
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        compiled = triton.compile(ASTSource(fn, sig, consts, {}), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        args, kinds = native_parameters(compiled, n)
        assert args is not None, kinds
        entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", compiled.asm["ptx"], re.S).group(1)
        ptx = re.findall(r"\.param\s+\.(\w+)", entry)
        assert ptx == [width[k] for k in kinds] + ["u64", "u64"], (kernel, ptx, kinds)
        assert args == [i for i, ty in enumerate(list(sig.values())[:n]) if ty != "constexpr"]
    return 2


def test_native_parameters_match_the_ptx():
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_native_parameters_match_the_ptx") == "2"


def test_native_parameters_refuse_what_needs_tritons_launcher():
    from moecomm.jit.launch import native_parameters

    md = {"num_ctas": 1, "global_scratch_size": 0, "profile_scratch_size": 0, "launch_cooperative_grid": False,
          "launch_pdl": False}

    def compiled(sig, **extra):
        return type("C", (), {"metadata": type("M", (), {**md, **extra})(), "src": type("S", (), {"signature": sig})()})()

    assert native_parameters(compiled({"a": "*fp32", "n": "i32", "B": "constexpr"}), 2) == ([0, 1], [1, 2])
    assert native_parameters(compiled({"a": "*fp32", "s": "fp32"}), 2)[0] is None  # a float parameter
    assert native_parameters(compiled({"a": "*fp32"}, global_scratch_size=64), 1)[0] is None
    assert native_parameters(compiled({"a": "*fp32"}, num_ctas=2), 1)[0] is None


# ----------------------------------------------------------------------------- GPU: one-rank NCCL group


def _round_trip(disp, x, ids, w):
    d = disp.dispatch(x, ids, w)
    # integer payloads: each expanded row times (its local expert + 1), weights applied
    lid = torch.repeat_interleave(torch.arange(d.tokens_per_expert.numel(), device=x.device),
                                  d.tokens_per_expert.long())
    h = d.tokens[d.gather_idx.long()] * (lid[:, None] + 1).to(x.dtype) * d.row_weights[:, None].to(x.dtype)
    return d, disp.combine(h, d.handle)


@pytest.mark.gpu
def test_native_round_trip_equals_the_python_path(monkeypatch):
    """Dispatch + combine over a one-rank NCCL group with the exchange forced: the native path's
    every output equal to the Python path's (integer payloads, several shapes whose row counts take
    other specialisations), and the native path really taken."""
    import torch.distributed as dist

    from moecomm.ep.nccl import dispatcher as D

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        dev = torch.device("cuda", 0)
        rt = N.runtime(None, dev)
        assert rt is not None, f"native path unavailable: {N.unavailable()}"
        for T, H, E, k, dtype in ((256, 256, 16, 4, torch.bfloat16), (1, 128, 8, 2, torch.float32),
                                  (333, 384, 64, 8, torch.float16), (0, 256, 16, 4, torch.bfloat16),
                                  (4096, 1024, 64, 8, torch.bfloat16)):
            g = torch.Generator().manual_seed(T)
            x = torch.randint(-8, 8, (T, H), generator=g).to(dtype).to(dev)
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)] or [torch.zeros(0, k)])
            ids = ids.to(torch.int32).reshape(T, k).to(dev)
            w = torch.randint(1, 4, (T, k), generator=g).float().to(dev)
            disp = D.EPDispatcher(E, k, H, force_exchange=True)
            monkeypatch.setenv("MOECOMM_EP_NATIVE", "0")
            d0, y0 = _round_trip(disp, x, ids, w)
            monkeypatch.setenv("MOECOMM_EP_NATIVE", "1")
            before = rt.programs
            for ids_i in (ids, ids.clone()):  # the first call compiles variants and records the count
                d1, y1 = _round_trip(disp, x, ids_i, w)  # phase's template, the second patches its ids
                torch.cuda.synchronize()
            assert rt.programs == before + 6, (T, rt.programs - before)
            for a in ("tokens", "gather_idx", "expert_offsets", "tokens_per_expert", "row_weights"):
                assert torch.equal(getattr(d0, a), getattr(d1, a)), (T, a)
            assert torch.equal(d0.handle.home, d1.handle.home) and torch.equal(d0.handle.slot_pos, d1.handle.slot_pos)
            assert torch.equal(y0, y1), T
    finally:
        dist.destroy_process_group()


class _CaptureLib:
    """A Library stand-in whose run() keeps each program it is given and answers ``rc``."""

    def __init__(self):
        self.programs: list[list[int]] = []
        self.info = [0, 0]
        self.info_addr = 0
        self.rc = N.OK
        self._families = 0

    def new_family(self):
        self._families += 1
        return self._families

    def run(self, addr, n, stream, comm, timeout_ns, info):
        self.programs.append(_ints(addr, n))
        return self.rc

    def run_patched(self, pa, pn, ta, tn, sa, sn, ea, en, stream, comm, timeout_ns, info):
        """native.c's moecomm_native_run_patched (its own test: test_run_patched_*)."""
        prog, table, srcs, sets = _ints(pa, pn), _ints(ta, 4 * tn), _ints(sa, sn), _ints(ea, en)
        for slot, src, off, align in zip(*[iter(table)] * 4):
            if (srcs[src] + off) & 15 != align:
                return N.RESPECIALISE
            prog[slot] = srcs[src] + off
        at = 0
        while at < en:
            slot, count = sets[at], sets[at + 1]
            prog[slot:slot + count] = sets[at + 2:at + 2 + count]
            at += 2 + count
        patched = array("q", prog)
        return self.run(patched.buffer_info()[0], pn, stream, comm, timeout_ns, info)

    def run_call(self, addr, n):
        """native.c's moecomm_native_run_call: run_patched's arguments in one block."""
        c = _ints(addr, n)
        ns = c[8]
        srcs, sets = array("q", c[9:9 + ns]), array("q", c[10 + ns:])
        assert len(sets) == c[9 + ns]
        return self.run_patched(c[0], c[1], c[2], c[3], srcs.buffer_info()[0], ns, sets.buffer_info()[0], len(sets),
                                c[4], c[5], c[6], c[7])


def _ints(addr, n) -> list[int]:
    return list(struct.unpack(f"{n}q", ctypes.string_at(addr, 8 * n))) if n else []


def _record_plan(rt, ids, e2r, e2l, W, ws, host):
    from moecomm.ep.nccl.plan import plan_send

    def record(rec):
        p = plan_send(ids, e2r, e2l, W, workspace=ws)
        rec.all_to_all(p.counts_recv, p.info, 12, [1] * W, [1] * W)
        rec.to_host(host, p.counts)
        return p

    return N.phase((rt, 0xC0, 0x51), ("k",), "test", None, record, (ids,))


def test_a_template_is_the_recording_with_the_sources_addresses_patched(monkeypatch):
    """The count phase's Template (the dispatcher keeps one per shapes): queued with another ids
    tensor, exactly the program a fresh recording with that tensor makes; a source address of
    another 16-byte alignment is refused with nothing queued; a pointer into a source's storage
    outside the source makes the recording not reusable."""
    from moecomm.ep.nccl import plan as P
    from moecomm.jit.backend import Impl

    monkeypatch.setattr(P, "choose", lambda *a, **kw: Impl.TRITON)  # the kernel path, recorded on CPU
    T, k, E, W = 37, 4, 16, 2
    e2r = torch.arange(E, dtype=torch.int32) // (E // W)
    e2l = torch.arange(E, dtype=torch.int32) % (E // W)
    ws, host = P.Workspace(torch.device("cpu")), torch.zeros((2, W, 3), dtype=torch.int32)
    lib = _CaptureLib()
    rt = N.Runtime(lib)
    ids_a = torch.randint(0, E, (T, k), dtype=torch.int32)
    tpl = _record_plan(rt, ids_a, e2r, e2l, W, ws, host)
    assert tpl.reusable and len(tpl.patches) == 1  # the plan kernel's one pointer into ids
    ids_b = torch.randint(0, E, (T, k), dtype=torch.int32)
    assert tpl.run((rt, 0xC0, 0x51), [ids_b.data_ptr()], "test", None) is True
    _record_plan(rt, ids_b, e2r, e2l, W, ws, host)
    recorded_a, replayed_b, recorded_b = lib.programs
    assert replayed_b == recorded_b and replayed_b != recorded_a
    assert [i for i, (a, b) in enumerate(zip(recorded_a, recorded_b)) if a != b] == [tpl.patches[0][0]]
    # another alignment class of ids: Triton would specialise otherwise, so the template declines
    odd = torch.randint(0, E, (T * k + 1,), dtype=torch.int32)[1:].view(T, k)
    assert tpl.run((rt, 0xC0, 0x51), [odd.data_ptr()], "test", None) is False and len(lib.programs) == 3
    # a failure in native.c raises as Recorder.run does
    lib.rc = N.TIMEOUT
    monkeypatch.setattr(N, "_rank_of", lambda group: lambda: 3)
    with pytest.raises(N.NativeError, match="rank 3: test did not complete within MOECOMM_TIMEOUT_S"):
        tpl.run((rt, 0xC0, 0x51), [ids_b.data_ptr()], "test", None)
    lib.rc = N.OK
    # the recorded pointer lies in the source's storage but outside the source: not reusable
    base = torch.randint(0, E, (2 * T, k), dtype=torch.int32)
    rec = N.Recorder(rt, ("k",), (base[T:],))
    with rec:
        rec.to_host(host, base[:1])
    assert not rec.template(None).reusable


def test_the_rows_and_back_phases_templates_patch_addresses_and_splits(monkeypatch):
    """dispatch's second phase and combine's phase read S, R and N on the device, so a call whose
    counts differ (R in the same bucket, other splits) and whose tensors are new queues from the
    template exactly the program a fresh recording of that call makes."""
    from moecomm.ep.nccl import phases as PH
    from moecomm.ep.nccl import plan as P
    from moecomm.ep.nccl.handle import NativeHandle
    from moecomm.jit.backend import Impl

    for mod in (P, PH):
        monkeypatch.setattr(mod, "choose", lambda *a, **kw: Impl.TRITON)  # the kernel path, recorded on CPU
    T, k, E, W, H, L = 37, 4, 16, 2, 32, 8
    lib = _CaptureLib()
    nat = (N.Runtime(lib), 0xC0, 0x51)
    ws = P.Workspace(torch.device("cpu"))
    ws._host[(2, W, 3)] = torch.zeros((2, W, 3), dtype=torch.int32)  # no pinned memory without a GPU
    e2r = torch.arange(E, dtype=torch.int32) // (E // W)
    e2l = torch.arange(E, dtype=torch.int32) % (E // W)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    plan = PH.counts_phase(nat, ("k",), ws, ids, e2r, e2l, W, True, None, "test")
    lay = P.RowLayout.of(H, k, torch.float16)

    def tensors(R, N, send_splits, recv_splits):
        x, w = torch.zeros(T, H, dtype=torch.float16), torch.zeros(T, k)
        outputs = P.DispatchOutputs(T, k, R, N, L, torch.device("cpu"), W, rows=(lay.width, torch.float16))
        out = torch.zeros(N, H, dtype=torch.float16)
        return x, w, outputs, out, N, send_splits, recv_splits

    def trip(x, w, outputs, out, N, send_splits, recv_splits):
        assert PH.rows_phase(nat, ("k",), ws, x, w, plan, lay, outputs, send_splits, recv_splits,
                             L, N, None, "test") is outputs
        handle = NativeHandle(None, W, send_splits, recv_splits, outputs, T, H, N)
        y = PH.back_phase(nat, out, handle, "test")
        assert y is not None and y.shape == (T, H)

    a = tensors(50, 130, [20, 17], [30, 20])
    b = tensors(52, 140, [17, 20], [26, 26])  # R 50 and 52: one bucket (48..56)
    assert P._triton().DeviceCounts.bucket(50) == P._triton().DeviceCounts.bucket(52)
    trip(*a)
    first = len(lib.programs)
    trip(*b)  # from the templates
    replayed = lib.programs[first:]
    ws._memo = {key: v for key, v in ws._memo.items() if key[0] != "native-rows"}
    PH._BACK_TEMPLATES.clear()
    trip(*b)  # recorded afresh
    fresh = lib.programs[first + 2:]
    assert len(replayed) == len(fresh) == 2 and replayed[0] == fresh[0] and len(replayed[1]) == len(fresh[1])
    # combine's partial sums, rows back and result are new tensors each call (the allocator may reuse
    # their addresses): the rest equal
    assert len([i for i, (u, v) in enumerate(zip(replayed[1], fresh[1])) if u != v]) <= 3
    assert lib.programs[first - 2] != replayed[0]  # the splits and the addresses did change
    # the first op is the pack's launch (6 header words, then x's address: another tensor)
    assert lib.programs[first - 2][:6] == replayed[0][:6] and lib.programs[first - 2][6] != replayed[0][6]
    assert len(lib.programs[first - 2]) == len(replayed[0]) and N.OP_COPY not in replayed[0][:1]


def test_a_template_recorded_while_the_workspace_grew_is_not_kept(monkeypatch):
    """The rows phase's expansion may grow the Workspace after the count phase put the plan in it:
    a template recorded then would read the old buffer's plan on every later call (the H200 saw
    every expert's rows wrong at L 256); it is not kept, and the next call's is."""
    from moecomm.ep.nccl import phases as PH
    from moecomm.ep.nccl import plan as P
    from moecomm.jit.backend import Impl

    for mod in (P, PH):
        monkeypatch.setattr(mod, "choose", lambda *a, **kw: Impl.TRITON)
    T, k, E, W, H, L, R, Np = 37, 4, 512, 2, 32, 256, 500, 900
    nat = (N.Runtime(_CaptureLib()), 0xC0, 0x51)
    ws = P.Workspace(torch.device("cpu"))
    ws._host[(2, W, 3)] = torch.zeros((2, W, 3), dtype=torch.int32)
    e2r = torch.arange(E, dtype=torch.int32) // (E // W)
    e2l = torch.arange(E, dtype=torch.int32) % (E // W)
    lay = P.RowLayout.of(H, k, torch.float16)
    kept = []
    for _ in range(2):
        ids = torch.randint(0, E, (T, k), dtype=torch.int32)
        plan = PH.counts_phase(nat, ("k",), ws, ids, e2r, e2l, W, True, None, "test")
        cap = ws.capacity
        outputs = P.DispatchOutputs(T, k, R, Np, L, torch.device("cpu"), W, rows=(lay.width, torch.float16))
        x, w = torch.zeros(T, H, dtype=torch.float16), torch.zeros(T, k)
        assert PH.rows_phase(nat, ("k",), ws, x, w, plan, lay, outputs, [30, 30], [250, 250], L, Np,
                             None, "test") is outputs
        kept.append((ws.capacity > cap, any(key[0] == "native-rows" for key in ws._memo)))
    assert kept == [(True, False), (False, True)]  # grew: not kept; the next call's (no growth) kept
