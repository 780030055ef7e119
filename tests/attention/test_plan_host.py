"""plan()'s compiled C path (kernels/attention/plan_host.c through _plan_host) against its numpy path,
the reference: thousands of random plans, decode and paged prefill, through two wrappers fed the
same sequence (one per path), must leave the same staging buffer (all of it, not only the sections
read: the C path writes exactly what numpy writes), the same plan record and the same graph-mode
buffers, or raise the same error. Tables int32 / int64 in any mix, page ids on the host or on a
device (a meta tensor: never read), graph mode or not, split or not, kv_chunk_size forced, small
workspaces (forced chunks past them), causal or not, consecutive pages or shuffled, empty requests,
and one bad input in ~1 plan of 8. The C call is checked to have planned every good plan (a path
that silently fell back would pass the comparison and test nothing) and to have rejected every bad
one itself. It never writes outside the staging buffer it is given: guard zones around a buffer
sized exactly, a buffer one int short, a bad table: nothing written.

# B = batch, P = page_size
"""

from __future__ import annotations

import ctypes
import logging
import math
import random

import numpy as np
import pytest
import torch
from attn_helpers import workspace
from test_plan_checks import BAD

from moecomm.attention import (
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
    _plan_host,
)
from moecomm.attention import prefill as pre
from moecomm.jit import backend as _backend
from moecomm.jit import host as _host


@pytest.fixture(scope="module")
def lib():
    lib = _plan_host.library()
    if lib is None:
        pytest.skip(f"plan_host.c cannot be built here: {_host.compile_error() or 'see the log'}")
    return lib


def _pair(make, monkeypatch):
    """(C wrapper, numpy wrapper) made by ``make()``."""
    monkeypatch.setenv("MOECOMM_HOST_C", "1")
    c = make()
    monkeypatch.setenv("MOECOMM_HOST_C", "0")
    n = make()
    monkeypatch.delenv("MOECOMM_HOST_C")
    return c, n


class Recorder:
    """A C function (Args.fn) that records each call's status."""

    def __init__(self, fn, codes: list):
        self.fn, self.codes = fn, codes

    def __call__(self, *args):
        rc = self.fn(*args)
        self.codes.append(rc)
        return rc


@pytest.fixture
def c_codes(monkeypatch):
    """The statuses of every C call made by wrappers in the test, in order."""
    codes: list[int] = []
    real = _plan_host.Args.__init__

    def init(self, fn, values):
        real(self, Recorder(fn, codes), values)

    monkeypatch.setattr(_plan_host.Args, "__init__", init)
    return codes


def _outcome(w, call):
    """("ok", None) or (exception type, message) of ``call(w)``."""
    try:
        call(w)
    except Exception as exc:  # noqa: BLE001 (any error must be the same on both paths)
        return type(exc), str(exc)
    return "ok", None


def _same_tensor(name, a, b, wa, wb):
    """Equal as plan() values: the staging buffer and its views by place and contents, the
    workspace's views by shape, meta tensors (device ids) by shape, the rest by contents."""
    assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
    ma, mb = wa._staging.dev, wb._staging.dev
    if a.device.type == "meta":
        return
    in_a = ma.data_ptr() <= a.data_ptr() < ma.data_ptr() + ma.numel() * 4
    in_b = mb.data_ptr() <= b.data_ptr() < mb.data_ptr() + mb.numel() * 4
    assert in_a == in_b, name
    if in_a:
        assert a.data_ptr() - ma.data_ptr() == b.data_ptr() - mb.data_ptr(), name
    if name in ("part_o", "part_lse"):  # views of each wrapper's own workspace
        return
    assert torch.equal(a, b), name


def _compare(wc, wn):
    pc, pn = wc._plan, wn._plan
    assert pc.keys() == pn.keys()
    for k in pc:
        if isinstance(pc[k], torch.Tensor):
            _same_tensor(k, pc[k], pn[k], wc, wn)
        else:
            assert pc[k] == pn[k] and type(pc[k]) is type(pn[k]), (k, pc[k], pn[k])
    assert wc._staging.size == wn._staging.size
    assert torch.equal(wc._staging.host, wn._staging.host)  # every int, sections read or not
    if wc._graph:
        assert torch.equal(wc._indices_buf, wn._indices_buf)


_DT = (torch.int32, torch.int64)


def _table(rng, batch, page_size, max_len, consecutive, spare_ids):
    """A random page table: (kv_lens, indptr, last_page_len, ids, num_pages) as lists."""
    lens = [0 if rng.random() < 0.1 else rng.randint(1, max_len) for _ in range(batch)]
    pages = [math.ceil(n / page_size) for n in lens]
    indptr = [0]
    for p in pages:
        indptr.append(indptr[-1] + p)
    last = [n - (p - 1) * page_size if p else rng.choice([0, 1, rng.randint(-9, 300)]) for n, p in zip(lens, pages)]
    num_pages = indptr[-1] + rng.randint(0, 5)
    ids = list(range(num_pages)) if consecutive else rng.sample(range(num_pages), num_pages)
    ids = ids[: indptr[-1] + (rng.randint(0, num_pages - indptr[-1]) if spare_ids else 0)]
    return lens, indptr, last, ids, num_pages


def _break(rng, t):
    """One bad input in a table dict (indptr, last, ids, num_pages): the checks of test_plan_checks."""
    kind = rng.choice(["indptr0", "decreasing", "last0", "last>P", "few ids", "negative id", "id>=num_pages",
                       "id 2**31", "last count"])
    ip, last, ids = list(t["indptr"]), list(t["last"]), list(t["ids"])
    if kind == "indptr0":
        ip[0] = rng.choice([1, -1])
    elif kind == "decreasing" and len(ip) > 2:
        b = rng.randrange(1, len(ip) - 1)
        ip[b] = ip[b + 1] + rng.randint(1, 3)
    elif kind in ("last0", "last>P"):
        with_pages = [b for b in range(len(last)) if ip[b + 1] > ip[b]]
        if with_pages:
            last[rng.choice(with_pages)] = 0 if kind == "last0" else t["P"] + rng.randint(1, 3)
    elif kind == "few ids" and ip[-1] > 0:
        ids = ids[: ip[-1] - 1]
    elif kind == "negative id" and ids:
        ids[rng.randrange(len(ids))] = -rng.randint(1, 2**31)
    elif kind == "id>=num_pages" and ids:
        t["num_pages"], t["give_num_pages"] = max(ids), True  # the largest id is out of range
    elif kind == "id 2**31" and ids:
        ids[rng.randrange(len(ids))] = 2**31 + rng.randint(0, 5)
        t["ids_dtype"] = torch.int64
    elif kind == "last count":
        last = last[:-1] if last else [1]
    t.update(indptr=ip, last=last, ids=ids)


def _tensors(rng, t, device_ids):
    ip = torch.tensor(t["indptr"], dtype=rng.choice(_DT))
    last = torch.tensor(t["last"], dtype=rng.choice(_DT))
    ids = torch.tensor(t["ids"], dtype=t.get("ids_dtype") or rng.choice(_DT))
    if device_ids:
        ids = torch.empty(ids.shape, dtype=ids.dtype, device="meta")
    return ip, last, ids


def _drive(wc, wn, plans, plan_one, codes):
    """Feed both wrappers the same random plans; compare; check the C call's statuses. plan_one(i)
    gives (the plan() call, whether it may fail); a plan that may not fail must plan."""
    good = bad = 0
    for i in range(plans):
        call, may_fail = plan_one(i)
        codes.clear()
        oc, on = _outcome(wc, call), _outcome(wn, call)
        assert oc == on, (i, oc, on)
        if oc[0] == "ok":
            _compare(wc, wn)
            assert codes and codes[-1] == _plan_host.OK, (i, codes)  # the C call planned it, not numpy
            good += 1
        else:
            # the C call rejected it itself (the numpy path then raised), or never got it (an error
            # the Python side sends to numpy first: a scalar, a dtype)
            assert all(rc == _plan_host.INVALID for rc in codes), (i, codes, oc)
            assert may_fail, (i, oc)
            bad += 1
    return good, bad


def _kwargs_num_pages(rng, t):
    return t["num_pages"] if t.get("give_num_pages") or rng.random() < 0.4 else None


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("ws_kb", [32 << 10, 64])
def test_decode_matches_numpy(lib, monkeypatch, c_codes, graph, ws_kb):
    rng = random.Random(1000 * graph + ws_kb)
    max_batch, max_ids = 48, 3000

    def make():
        kw = {}
        if graph:
            kw = dict(use_cuda_graph=True, paged_kv_indptr_buffer=torch.zeros(max_batch + 1, dtype=torch.int32),
                      paged_kv_indices_buffer=torch.zeros(max_ids, dtype=torch.int32))
        return BatchDecodeWithPagedKVCacheWrapper(torch.empty(ws_kb << 10, dtype=torch.uint8), **kw)

    wc, wn = _pair(make, monkeypatch)
    scalars = [(hq, hk, d, p) for hq, hk in ((32, 8), (8, 8), (6, 2), (64, 8)) for d in (64, 128, 256)
               for p in (1, 5, 16, 128)]

    def plan_one(i):
        hq, hk, d, P = rng.choice(scalars[: 4 + i % len(scalars)])  # scalars repeat, as in a server
        batch = rng.choice([0, 1, 2, 3, 7, 16, 33, rng.randint(1, max_batch)])
        max_len = 300 if graph or P == 1 else rng.choice([1, 40, 600, 5000])
        t = dict(zip(("lens", "indptr", "last", "ids", "num_pages"),
                     _table(rng, batch, P, max_len, rng.random() < 0.2, rng.random() < 0.3)), P=P)
        broken = rng.random() < 0.125
        if broken:
            _break(rng, t)
        if graph and len(t["ids"]) > max_ids:  # past the graph's indices buffer: an error
            t["ids"] = t["ids"][:max_ids]
        ip, last, ids = _tensors(rng, t, device_ids=not graph and rng.random() < 0.3)
        kw = dict(num_pages=_kwargs_num_pages(rng, t), window_left=rng.choice([-1, -1, 0, 100, 3000]),
                  disable_split_kv=rng.random() < 0.15, kv_chunk_size=rng.choice([None, None, None, 1, 100, 1000, 10**5]))
        # graph mode: a kv_chunk_size giving more work items than the workspace holds raises
        may_fail = broken or (graph and (kw["kv_chunk_size"] is not None or ws_kb < 1024 or len(t["ids"]) == max_ids))
        return (lambda w: w.plan(ip, ids, last, hq, hk, d, P, q_data_type=torch.float16, **kw)), may_fail

    good, bad = _drive(wc, wn, 600, plan_one, c_codes)
    assert good >= 300 and bad >= 30, (good, bad)


@pytest.mark.parametrize("graph,kernel,layout", [(False, "v2", "NHD"), (False, "v1", "NHD"), (False, "v2", "HND"),
                                                 (True, "v2", "NHD")])
def test_prefill_matches_numpy(lib, monkeypatch, c_codes, graph, kernel, layout):
    """(v1 or HND: no consecutive-pages check; graph mode looks at neither.)"""
    monkeypatch.setattr(pre, "PREFILL_KERNEL", kernel)
    rng = random.Random(7 + graph + len(kernel + layout))
    max_batch, max_ids, max_tokens = 40, 4000, 3000

    def make():
        kw = {}
        if graph:
            kw = dict(use_cuda_graph=True, qo_indptr_buf=torch.zeros(max_batch + 1, dtype=torch.int32),
                      paged_kv_indices_buf=torch.zeros(max_ids, dtype=torch.int32), max_num_qo_tokens=max_tokens)
        return BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1), kv_layout=layout, **kw)

    wc, wn = _pair(make, monkeypatch)
    scalars = [(hq, hk, d, p) for hq, hk in ((32, 8), (4, 4)) for d in (64, 128, 256) for p in (1, 7, 16)]

    def plan_one(i):
        hq, hk, d, P = rng.choice(scalars)
        batch = rng.choice([0, 1, 1, 2, 5, 8, 17, rng.randint(1, max_batch)])
        t = dict(zip(("lens", "indptr", "last", "ids", "num_pages"),
                     _table(rng, batch, P, rng.choice([5, 200, 2000]), rng.random() < 0.4, rng.random() < 0.2)), P=P)
        qo_lens = [rng.choice([0, 1, rng.randint(1, 64), rng.randint(1, 130), min(n + 1, rng.randint(1, 700))])
                   for n in t["lens"]]
        qo = [0]
        for n in qo_lens:
            qo.append(qo[-1] + n)
        broken = rng.random() < 0.125
        if broken:
            _break(rng, t)
            if rng.random() < 0.2 and len(qo) > 2:  # a bad qo_indptr too
                qo[1] = qo[2] + 1
        if graph and len(t["ids"]) > max_ids:
            t["ids"] = t["ids"][:max_ids]
        ip, last, ids = _tensors(rng, t, device_ids=not graph and rng.random() < 0.3)
        qo_t = torch.tensor(qo, dtype=rng.choice(_DT))
        kw = dict(num_pages=_kwargs_num_pages(rng, t), causal=rng.random() < 0.7, window_left=rng.choice([-1, 10]))
        may_fail = broken or (graph and (qo[-1] > max_tokens or len(t["ids"]) == max_ids))
        return (lambda w: w.plan(qo_t, ip, ids, last, hq, hk, d, P, q_data_type=torch.float16, **kw)), may_fail

    good, bad = _drive(wc, wn, 600, plan_one, c_codes)
    assert good >= 300 and bad >= 30, (good, bad)


# ------------------------------------------------------------------------------- the C call itself


def _decode_call(w, indptr, indices, last, num_pages=None, staging=None, size=None):
    """Call w's C function as its _plan_c does, into ``staging`` (an int32 numpy array) when given."""
    a = w._cargs
    assert a.tables(indptr, last, indices, num_pages, w._staging) is not None
    if staging is not None:
        a.block[_plan_host.A_STAGING:_plan_host.A_STAGING + 2] = (staging.__array_interface__["data"][0],
                                                                  staging.shape[0] if size is None else size)
    return a.fn(a.ptr)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_c_call_rejects_every_bad_table(lib, monkeypatch, c_codes, kind, dtype, case):
    """Each bad table of test_plan_checks reaches the C call (when it is a tensor the C path takes)
    and is rejected there; the numpy path then raises the message (test_plan_checks checks it)."""
    from test_plan_checks import _plan

    monkeypatch.setenv("MOECOMM_HOST_C", "1")
    _, bad, num_pages, err, _ = case
    with pytest.raises(err):
        _plan(kind, dtype, num_pages, **bad)
    takes = all(t.dtype in (torch.int32, torch.int64) and t.dim() == 1 for t in bad.values() if isinstance(t, torch.Tensor))
    # the good plan first, then the bad one: rejected by C, or (a float or 2-D table) not sent to it
    assert c_codes == ([_plan_host.OK, _plan_host.INVALID] if takes else [_plan_host.OK]), c_codes


def test_c_call_never_writes_outside_its_buffer(lib):
    w = BatchDecodeWithPagedKVCacheWrapper(workspace())
    indptr = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    last = torch.tensor([5, 0, 16], dtype=torch.int64)
    ids = torch.tensor([9, 2, 4, 1, 0, 3, 8, 7], dtype=torch.int32)
    w.plan(indptr, ids, last, 8, 2, 64, 16, q_data_type=torch.float16, kv_chunk_size=16)
    need = w._cargs.out(4)[3]
    guard = 64
    buf = np.full(need + 2 * guard, -7, dtype=np.int32)
    inner = buf[guard:guard + need]
    assert _decode_call(w, indptr, ids, last, staging=inner) == _plan_host.OK
    assert (buf[:guard] == -7).all() and (buf[guard + need:] == -7).all()
    written = inner != -7  # only the sections of this plan (the wrapper's buffer has zeros elsewhere)
    assert written.sum() > 20 and (inner[written] == w._staging.host_np[:need][written]).all()
    buf[:] = -7
    assert _decode_call(w, indptr, ids, last, staging=inner, size=int(need) - 1) == _plan_host.NEED_ROOM
    assert (buf == -7).all()  # too small: nothing written
    bad_last = torch.tensor([5, 0, 17], dtype=torch.int64)
    assert _decode_call(w, indptr, ids, bad_last, staging=inner) == _plan_host.INVALID
    assert (buf == -7).all()  # a bad table: nothing written
    assert _decode_call(w, indptr, ids, last, num_pages=9, staging=inner) == _plan_host.INVALID  # id 9 >= 9 pages
    assert (buf == -7).all()


def test_values_the_c_path_leaves_to_numpy(lib, monkeypatch, c_codes):
    """A KV length past int32 (an int64 table: one request of 2**27 pages of 16 tokens): the C call
    says UNSUPPORTED, the numpy path plans as it always did."""
    monkeypatch.setenv("MOECOMM_HOST_C", "1")
    w = BatchDecodeWithPagedKVCacheWrapper(workspace())
    ids = torch.empty(2**27, dtype=torch.int32, device="meta")
    w.plan(torch.tensor([0, 2**27]), ids, torch.tensor([16]), 8, 2, 64, 16)
    assert c_codes == [_plan_host.UNSUPPORTED] and w._plan["batch"] == 1


def test_no_compiler_falls_back_and_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))  # nothing cached: a compiler is needed
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(_plan_host, "_LIB", [])
    _host.forget_loaded()
    _backend._warned.discard("attention-plan-host-c")
    try:
        table = (torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([4, 0, 3, 1, 2], dtype=torch.int32),
                 torch.tensor([3, 8], dtype=torch.int32))
        with caplog.at_level(logging.WARNING, logger="moecomm"):
            for _ in range(2):
                w = BatchDecodeWithPagedKVCacheWrapper(workspace())
                w.plan(*table, 4, 2, 64, 8)
                assert w._cargs is None and w._plan["num_work"] == 2  # planned, by numpy
        msgs = [r.getMessage() for r in caplog.records if "compiled C path" in r.getMessage()]
        assert len(msgs) == 1 and "no-such-cc" in msgs[0] and "MOECOMM_HOST_C=0" in msgs[0], msgs
        caplog.clear()
        monkeypatch.setenv("MOECOMM_HOST_C", "0")  # asked for: no library looked for, nothing said
        monkeypatch.setattr(_plan_host, "_LIB", [])
        with caplog.at_level(logging.WARNING, logger="moecomm"):
            w = BatchDecodeWithPagedKVCacheWrapper(workspace())
            w.plan(*table, 4, 2, 64, 8)
        assert not caplog.records and _plan_host._LIB == []
    finally:
        _host.forget_loaded()
        _backend._warned.discard("attention-plan-host-c")


def test_argtypes_are_set(lib):
    """One pointer in (the args block), the status back as an int; the version is this module's."""
    fn = lib.moecomm_decode_plan
    assert fn.restype is ctypes.c_int and fn.argtypes == [ctypes.c_void_p]
    assert lib.moecomm_plan_version() == _plan_host.VERSION
