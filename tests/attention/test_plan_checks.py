"""plan()'s page-table checks, one bad input at a time, for the decode and the paged prefill wrapper,
with int32 and int64 tables (and a table of mixed dtypes): each raises an error naming the argument,
also from a wrapper that has just planned well (nothing is cached past a bad table). Page ids on the
device are never read by plan(): a meta tensor (which has no data to read) plans. Every test runs
twice: plan()'s compiled C path ("c", where a C compiler is here) and its numpy path (MOECOMM_HOST_C=0):
the same messages (test_plan_host.py checks that the C call itself rejects each bad table).

# B = batch, P = page_size
"""

from __future__ import annotations

import pytest
import torch
from attn_helpers import workspace

from moecomm.attention import (
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
)
from moecomm.errors import MoeCommTypeError, MoeCommValueError

P = 8


@pytest.fixture(autouse=True, params=["c", "numpy"])
def host_path(request, monkeypatch):
    """Which plan() path the wrappers made in the test take (read when a wrapper is made)."""
    monkeypatch.setenv("MOECOMM_HOST_C", "1" if request.param == "c" else "0")
    return request.param
GOOD = dict(indptr=[0, 2, 5], indices=[4, 0, 3, 1, 2], last_page_len=[3, 8])  # B = 2, 5 pages


def _plan(kind, dtype, num_pages=None, **bad):
    """Plan GOOD, then GOOD with ``bad`` swapped in, on one wrapper; lists become ``dtype`` tensors
    (tensors in ``bad`` are passed as they are)."""
    table = dict(GOOD, **bad)
    table = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype) for k, v in table.items()}
    good = {k: torch.tensor(v, dtype=dtype) for k, v in GOOD.items()}
    if kind == "decode":
        w = BatchDecodeWithPagedKVCacheWrapper(workspace())
        for t in (good, table):
            w.plan(t["indptr"], t["indices"], t["last_page_len"], 4, 2, 64, P, q_data_type=torch.float16,
                   num_pages=num_pages)
    else:
        w = BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1))
        qo = torch.tensor([0, 3, 7], dtype=torch.int32)
        for t in (good, table):
            w.plan(qo, t["indptr"], t["indices"], t["last_page_len"], 4, 2, 64, P, causal=True,
                   q_data_type=torch.float16, num_pages=num_pages)
    return w


BAD = [  # (name, bad arguments, num_pages, error, message; {indptr} is the argument's name)
    ("indptr[0]", dict(indptr=[1, 2, 5]), None, MoeCommValueError, r"{indptr}\[0\] must be 0, got 1"),
    ("decreasing", dict(indptr=[0, 3, 2]), None, MoeCommValueError, r"{indptr} must be non-decreasing, got {indptr}\[2\] = 2"),
    ("last 0", dict(last_page_len=[0, 8]), None, MoeCommValueError, r"last_page_len must be in \[1, page_size = 8\].*\[0\] = 0"),
    ("last > P", dict(last_page_len=[3, 9]), None, MoeCommValueError, r"last_page_len must be in \[1, page_size = 8\].*\[1\] = 9"),
    ("last < 0", dict(last_page_len=[-5, 8]), None, MoeCommValueError, r"last_page_len must be in \[1, page_size = 8\]"),
    ("last count", dict(last_page_len=[3]), None, MoeCommValueError, r"last_page_len must have 2 entries"),
    ("too few ids", dict(indices=[4, 0, 3]), None, MoeCommValueError, r"indices must hold {indptr}\[-1\] = 5 page ids, got 3"),
    ("negative id", dict(indices=[4, 0, -3, 1, 2]), None, MoeCommValueError, r"indices must be >= 0 \(page ids\), got -3 at position 2"),
    ("id >= num_pages", dict(indices=[4, 0, 3, 9, 2]), 5, MoeCommValueError, r"indices must be < num_pages \(5\), got 9 at position 3"),
    ("float indptr", dict(indptr=torch.tensor([0.0, 2.0, 5.0])), None, MoeCommTypeError, r"{indptr} must have dtype int32 or int64, got float32"),
    ("2-D indptr", dict(indptr=torch.tensor([[0, 2, 5]])), None, MoeCommValueError, r"{indptr} must have 1 dimension"),
    ("float ids", dict(indices=torch.tensor([4.0, 0, 3, 1, 2])), None, MoeCommTypeError, r"indices must have dtype int32 or int64"),
]


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_table_names_the_argument(kind, dtype, case):
    _, bad, num_pages, err, message = case
    indptr = "indptr" if kind == "decode" else "paged_kv_indptr"
    with pytest.raises(err, match=message.format(indptr=indptr)):
        _plan(kind, dtype, num_pages, **bad)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_int_limits(kind):
    """Ids past int32 (the kernels' index type) and an int32 indptr whose step wraps (2**31 - 1 to
    -1: a difference of -2**31, whose "pages - 1" wraps to 2**31 - 1) are caught; an int64
    last_page_len beside an int32 indptr is checked in full (not truncated to its low 32 bits)."""
    indptr = "indptr" if kind == "decode" else "paged_kv_indptr"
    with pytest.raises(MoeCommValueError, match=r"indices must be < 2\*\*31, got 2147483648"):
        _plan(kind, torch.int64, indices=[4, 0, 3, 2**31, 2])
    with pytest.raises(MoeCommValueError, match=f"{indptr} must be non-decreasing"):
        _plan(kind, torch.int32, indptr=[0, 2**31 - 1, -1])
    with pytest.raises(MoeCommValueError, match=r"last_page_len must be in \[1, page_size = 8\]"):
        _plan(kind, torch.int32, last_page_len=torch.tensor([3, -(2**32) + 4], dtype=torch.int64))


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_mixed_dtypes_and_lists_plan(kind):
    """An int64 last_page_len beside an int32 indptr, and plain lists, plan as int32 tables do."""
    ref = _plan(kind, torch.int32)._plan["meta"].clone()
    w = _plan(kind, torch.int32, last_page_len=torch.tensor(GOOD["last_page_len"], dtype=torch.int64))
    assert torch.equal(w._plan["meta"], ref)
    w = _plan(kind, torch.int32, **GOOD)
    assert torch.equal(w._plan["meta"], ref)


def test_empty_request_plans():
    """A request without pages (last_page_len 0 or anything: it has no last page) is allowed."""
    for last in ([3, 0, 8], [3, 5, 8]):
        w = _plan("decode", torch.int32, indptr=[0, 2, 2, 5], last_page_len=last)
        assert w._plan["batch"] == 3


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_device_ids_are_not_read(kind, dtype):
    """Page ids not on the host are passed on as they are (int32) or converted on their device: a meta
    tensor, which has no data, plans; no range check is possible, so none is recorded for run()."""
    ids = torch.empty(5, dtype=dtype, device="meta")
    w = _plan(kind, torch.int32, indices=ids)
    kv = w._plan["kv_indices"]
    assert kv.device.type == "meta" and kv.dtype is torch.int32 and w._plan["max_index"] is None
    if dtype is torch.int32:
        assert kv is ids
    with pytest.raises(MoeCommTypeError, match="indices must have dtype int32 or int64"):
        _plan(kind, torch.int32, indices=torch.empty(5, dtype=torch.float32, device="meta"))
