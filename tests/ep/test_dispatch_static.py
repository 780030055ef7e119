"""The NCCL path's plan and pack kernels, and the static-capacity mode: fixed shapes, no host sync.

Exact equality on integer payloads against moecomm.ep.reference.ep_reference (the same cases as
test_dispatch.py), NaN-prefilled buffers, capacity overflow (flag set, the rows that fit exact,
nothing written out of bounds), gloo with 2 and 4 ranks, a killed rank in static mode.
"""

from __future__ import annotations

import functools

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moecomm.ep.nccl import dispatcher as D
from moecomm.ep.nccl import plan as P
from moecomm.ep.nccl.reference import pack_send_reference
from moecomm.ep.nccl.virtual import virtual_ep_forward
from moecomm.ep.placement import ExpertPlacement
from moecomm.ep.reference import ep_reference
from moecomm.errors import MoeCommValueError
from moecomm.testing import compile_for_hopper, run_distributed

from test_dispatch import CASES, case_inputs, check_against_reference, expert_times_id, routing, vectorised_expert


def _plan_inputs(T, E, k, W, *, bad: bool = False, seed: int = 0):
    ids, w = routing(T, E, k, skew=True, seed=seed)
    if bad and T:
        ids[T // 2, 0] = E + 3  # clamped, flagged, never out of bounds
    pl = ExpertPlacement(E, W)
    return ids.to(torch.int32), w, pl.expert_to_rank_tensor(), pl.expert_to_local_tensor()


def _plan_cases():
    # (T, E, k, W): empty, one token, E % W != 0, several sort blocks (64 tokens a block at small W),
    # more ranks than tokens, many ranks (the one-hot tile takes fewer tokens a block), k not a power of
    # 2, more ranks than the one-hot tile takes (the in-block rank by the pairwise compare, 3 blocks)
    return [(0, 8, 2, 2), (1, 4, 1, 1), (33, 10, 4, 3), (150, 16, 8, 4), (9, 6, 3, 8), (70, 96, 3, 48),
            (150, 140, 2, 70)]


@pytest.fixture(params=["fused", "scanned"])
def sort_path(request, monkeypatch):
    """The counting sorts' two paths: the prefix over blocks in the scatter's prologue, or the scan launch."""
    from moecomm.ep.nccl import _triton as K

    if request.param == "scanned":
        monkeypatch.setattr(K, "PREFIX_MAX_ELEMS", 0)
    K.sort_shape.cache_clear()
    yield request.param
    K.sort_shape.cache_clear()


@pytest.mark.parametrize("T,E,k,W", _plan_cases())
@pytest.mark.parametrize("bad", [False, True])
def test_plan_kernels_match_reference(triton_backend, sort_path, T, E, k, W, bad, monkeypatch):
    """plan_send's kernel (one launch: its last program sums the blocks) against the reference plan
    and moecomm.permute's reference counting sort, bit for bit; the workspace is prefilled with -7,
    so an entry the kernel leaves unwritten (counts included: there is no zeros fill) fails, and the
    ticket is back at 0 after each launch."""
    dev = torch.device(triton_backend)  # the compiled kernels on a GPU, the interpreter on CPU
    ids, w, e2r, e2l = (t.to(dev) for t in _plan_inputs(T, E, k, W, bad=bad, seed=T))
    ws = P.Workspace(dev)
    ws.reserve(1 << 14).fill_(-7)
    got = P.plan_send(ids, e2r, e2l, W, check_ids=True, workspace=ws)
    monkeypatch.setenv("MOECOMM_BACKEND", "reference")
    want = P.plan_send(ids, e2r, e2l, W, check_ids=True)
    for f in ("rank", "local", "first", "rank_offsets", "info"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert torch.equal(got.places(), want.sort_row)  # the in-block ranks + each block's base: the places
    assert got.block_base.shape[0] * got.block_tokens >= T and int(ws.semaphore) == 0
    assert int(got.info[:, 2].max()) == int(bad and T > 0)
    assert got.info.data_ptr() == got.counts[0].data_ptr()  # the count exchange reads both halves at once
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    again = P.plan_send(ids, e2r, e2l, W, check_ids=False, workspace=ws)  # same shapes: the kept views
    assert again is got and int(got.info[:, 2].max()) == 0  # rewritten, the flag cleared (not sticky)


def _packed(x, w, plan, lay, rows, capacity, kernel):
    out = torch.full((rows, lay.width), float("nan"), dtype=x.dtype)  # unwritten rows stay NaN
    if capacity is not None:
        out.view(torch.int32)[:, lay.meta_col:lay.meta_col + plan.rank.shape[1]].fill_(-1)
    home = torch.full(plan.rank.shape, -7, dtype=torch.int32)
    flag = torch.zeros(1, dtype=torch.int32)
    if kernel is pack_send_reference:
        kernel(x, w, plan.rank, plan.local, plan.first, plan.places(), plan.rank_offsets, out, home, flag,
               meta_col=lay.meta_col, capacity=capacity)
    else:  # the plan's in-block ranks and block bases
        kernel(x, w, plan.rank, plan.local, plan.first, plan.sort_row, plan.rank_offsets, out, home, flag,
               meta_col=lay.meta_col, capacity=capacity, block_base=plan.block_base, block_tokens=plan.block_tokens)
    return out, home, flag


@pytest.mark.parametrize("T,E,k,W,H", [(0, 8, 2, 2, 8), (1, 4, 1, 1, 33), (33, 10, 4, 3, 17), (40, 16, 8, 4, 64)])
@pytest.mark.parametrize("capacity", [None, "fits", 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_kernel_matches_reference_interpreted(triton_backend, T, E, k, W, H, capacity, dtype):
    from moecomm.ep.nccl._triton import pack_send_triton

    ids, w, e2r, e2l = _plan_inputs(T, E, k, W, seed=T + 1)
    plan = P.plan_send(ids, e2r, e2l, W)
    lay = P.RowLayout.of(H, k, dtype)
    x = torch.randint(-4, 5, (T, 2 * H)).to(dtype)[:, ::2]  # non-contiguous [T, H]
    cap = T if capacity == "fits" else capacity
    rows = int(plan.info[:, 0].sum()) if cap is None else W * cap
    got = _packed(x, w, plan, lay, rows, cap, pack_send_triton)
    want = _packed(x, w, plan, lay, rows, cap, pack_send_reference)
    if cap is None:  # S from the plan's rank_offsets on the device (a native phase's template): the same rows
        dev_rows = _packed(x, w, plan, lay, rows, cap, functools.partial(pack_send_triton, device_rows=True))
        assert torch.equal(got[0].view(torch.int32), dev_rows[0].view(torch.int32)) and torch.equal(got[1], dev_rows[1])
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))  # bit for bit, NaN rows included
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    if cap is None:
        assert not got[0][:, :H].isnan().any()  # throughput: every one of the S rows is written
    need = int(plan.info[:, 0].max())
    assert int(got[2]) == int(cap is not None and need > cap)  # overflow flagged exactly when a rank's rows exceed C


def _received(R, k, L, H, dtype, seed):
    """[R, width] received rows: per row, each slot a local expert in [0, L) or -1 (another rank's;
    about a third), the weights' bits beside them; the token part NaN (the expansion never reads it)."""
    g = torch.Generator().manual_seed(seed)
    lay = P.RowLayout.of(H, k, dtype)
    recv = torch.full((R, lay.width), float("nan"), dtype=dtype)
    meta = recv.view(torch.int32)[:, lay.meta_col:lay.meta_col + 2 * k]
    ids = torch.randint(0, L, (R, k), generator=g, dtype=torch.int32)
    ids[torch.rand(R, k, generator=g) < 0.35] = -1
    meta[:, :k] = ids
    meta[:, k:] = torch.randn(R, k, generator=g).view(torch.int32)
    return recv, lay, int((ids >= 0).sum())


@pytest.mark.parametrize("R,k,L", [(0, 2, 3), (1, 1, 1), (37, 3, 5), (300, 8, 4), (130, 8, 40), (70, 8, 64),
                                   (45, 4, 300)])
@pytest.mark.parametrize("mode", ["throughput", "static", "device counts", "counts copied"])
def test_expand_kernels_match_reference(triton_backend, sort_path, R, k, L, mode, monkeypatch):
    """expand_received's kernels (histogram + scatter, the metadata read in place) against the
    reference (a contiguous copy of the ids and moecomm.permute's reference counting sort), bit for
    bit, into outputs prefilled with -7 / NaN: one-hot tiles (L < 64) and the pairwise compare
    (L >= 64), one block and many, fused and scanned; and with R and N taken from a dispatch's
    counts on the device (3 peers' parts; the grid a bucket of R: its blocks past R count nothing)."""
    from moecomm.ep.nccl._triton import DeviceCounts

    dev = torch.device(triton_backend)  # the compiled kernels on a GPU, the interpreter on CPU
    recv, lay, N = _received(R, k, L, 16, torch.float16, seed=R + L)
    recv = recv.to(dev)
    num_pairs = N if mode != "static" else None
    counts = counts_from = None
    if mode in ("device counts", "counts copied"):
        c = torch.full((2, 3, 3), -7, dtype=torch.int32)
        c[1, :, 0] = torch.tensor([R // 3, R - R // 3 - R // 4, R // 4])
        c[1, :, 1] = torch.tensor([N // 2, 0, N - N // 2])
        c[0] = torch.arange(9, dtype=torch.int32).view(3, 3) + 100  # the sent part: copied as it is
        counts = DeviceCounts(c.to(dev), 3)
        if mode == "counts copied":  # the counts read where they are, copied into counts.tensor by the first launch
            if R == 0:
                pytest.skip("R 0: no launch to copy the counts (the native phase copies them itself then)")
            counts_from, counts = counts.tensor, DeviceCounts(torch.full((2, 3, 3), -9, dtype=torch.int32, device=dev), 3)
    home, out = P.dispatch_outputs(3, k, R, N if num_pairs is not None else R * k, L, dev)
    for t in (home, out.gather_idx, out.expert_offsets, out.tokens_per_expert, out.slot_pos):
        t.fill_(-7)
    out.row_weights.fill_(float("nan"))
    ws = P.Workspace(dev)
    ws.reserve(1 << 14).fill_(-7)
    got = P.expand_received(recv, lay, L, num_pairs, out=out, workspace=ws, counts=counts, counts_from=counts_from)
    assert got is out
    if counts_from is not None:
        assert torch.equal(counts.tensor, counts_from)
    monkeypatch.setenv("MOECOMM_BACKEND", "reference")
    want = P.expand_received(recv, lay, L, num_pairs)
    for f in ("gather_idx", "expert_offsets", "tokens_per_expert", "slot_pos"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert torch.equal(got.row_weights.view(torch.int32), want.row_weights.view(torch.int32))  # the weights' bits
    assert (home == -7).all()  # a neighbour in the same allocation: untouched
    assert int(got.expert_offsets[-1]) == N and got.gather_idx.shape[0] == (N if mode != "static" else R * k)


def test_dispatch_outputs_are_one_aligned_allocation():
    home, ex = P.dispatch_outputs(5, 3, 7, 11, 2, torch.device("cpu"))
    parts = (home, ex.slot_pos, ex.gather_idx, ex.row_weights, ex.tokens_per_expert, ex.expert_offsets)
    assert [tuple(t.shape) for t in parts] == [(5, 3), (7, 3), (11,), (11,), (2,), (3,)]
    assert len({t.untyped_storage().data_ptr() for t in parts}) == 1
    assert all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in parts) and ex.row_weights.dtype == torch.float32
    ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in parts)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # disjoint


def test_dispatch_outputs_views_are_made_when_read_at_the_addresses_it_gives():
    """The native path's templates take DispatchOutputs' addresses without making the views: each
    view, when read, is at that address, of its shape, and made once."""
    o = P.DispatchOutputs(5, 3, 7, 11, 2, torch.device("cpu"), counts=4)
    addresses = o.addresses()
    assert o._views == [None] * 7 and o.has_counts and o.top_k == 3
    views = [o.home, o.slot_pos, o.gather_idx, o.row_weights, o.tokens_per_expert, o.expert_offsets, o.counts]
    assert [v.data_ptr() for v in views] == addresses
    assert [tuple(v.shape) for v in views] == [(5, 3), (7, 3), (11,), (11,), (2,), (3,), (2, 4, 3)]
    assert all(v.is_contiguous() for v in views) and o.row_weights.dtype == torch.float32 and o.home is views[0]
    views[6].copy_(torch.arange(24, dtype=torch.int32).view(2, 4, 3))  # [2, W, 3] rows, as the kernels read them
    assert o.base[(addresses[6] - addresses[0]) // 4:][:24].tolist() == list(range(24))
    none = P.DispatchOutputs(5, 3, 7, 11, 2, torch.device("cpu"))
    assert none.counts is None and not none.has_counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_outputs_hold_the_received_rows_in_front(dtype):
    """The native path's DispatchOutputs(rows=...): the received rows [R, width] first, at
    rows_address(), the tokens their first H columns, the int32 parts after them, disjoint and
    16-byte aligned, all one allocation."""
    T, k, R, N, L, W, width, H = 5, 3, 7, 11, 2, 4, 24, 20
    o = P.DispatchOutputs(T, k, R, N, L, torch.device("cpu"), W, rows=(width, dtype))
    recv, tokens = o.received(), o.received(H)
    assert recv.dtype == dtype and tuple(recv.shape) == (R, width) and recv.is_contiguous()
    assert tokens.shape == (R, H) and tokens.stride() == (width, 1) and recv.data_ptr() == o.rows_address()
    recv.copy_(torch.arange(R * width).view(R, width).to(dtype))
    assert torch.equal(tokens, recv[:, :H])
    addresses = o.addresses()
    assert addresses[0] >= recv.data_ptr() + R * width * dtype.itemsize and all(a % 16 == 0 for a in addresses)
    o.home.fill_(-1)
    o.counts.fill_(-2)
    assert torch.equal(recv, torch.arange(R * width).view(R, width).to(dtype))  # the parts do not overlap the rows


def test_host_counts_list_reads_the_host_counts_and_parses_as_the_list():
    from moecomm.ep.nccl import dispatcher as D

    ws, W = P.Workspace(torch.device("cpu")), 3
    ws._host[(2, W, 3)] = torch.zeros((2, W, 3), dtype=torch.int32)  # no pinned memory without a GPU
    ws.host_counts((2, W, 3)).copy_(torch.arange(18, dtype=torch.int32).view(2, W, 3) * 7 - 5)
    flat = ws.host_counts_list((2, W, 3))
    assert flat == ws.host_counts((2, W, 3)).flatten().tolist()
    c = ws.host_counts((2, W, 3)).tolist()
    assert D._parse_flat(flat, W) == ([r[0] for r in c[0]], [r[0] for r in c[1]], [r[1] for r in c[1]],
                                      [r[2] for r in c[1]])  # sent rows; received rows, pairs, flags
    ws.host_counts((2, W, 3))[1, 2, 0] = 99  # read again: the values now, not a copy
    assert ws.host_counts_list((2, W, 3))[15] == 99


def test_scratch_grows_and_views_its_bytes():
    sc = P.rows_scratch(0x1234, torch.device("cpu"))
    assert P.rows_scratch(0x1234, torch.device("cpu")) is sc and P.rows_scratch(0x1235, torch.device("cpu")) is not sc
    a = sc.address(100)
    v = sc.view((3, 4), torch.float16, 16)
    assert v.data_ptr() == a + 16 and v.shape == (3, 4) and v.dtype == torch.float16
    b = sc.address(1 << 20)
    assert sc.buf.numel() >= 1 << 20 and b == sc.buf.data_ptr() and b % 16 == 0
    assert sc.address(10) == b  # grow-only


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_virtual_ranks_equal_reference(name, dtype):
    pl, xs, ids, ws = case_inputs(name, dtype)
    cap = max(x.shape[0] for x in xs) or 1  # max_tokens: never overflows
    run = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=cap)
    check_against_reference(pl, xs, ids, ws, run.results, run.y)
    for r, res in enumerate(run.results):  # fixed shapes: W * C rows, W * C * k expanded rows (none without experts)
        rows = pl.ep_size * cap * ids[0].shape[1] if pl.num_local_experts(r) else 0
        assert res.tokens.shape[0] == pl.ep_size * cap and res.gather_idx.shape[0] == rows
        assert int(res.handle[1]) == 0


def test_static_virtual_ranks_interpreted(triton_backend):
    pl, xs, ids, ws = case_inputs("skew_t0_w3", torch.float16)
    run = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=17)
    check_against_reference(pl, xs, ids, ws, run.results, run.y)


def test_static_overflow_flags_and_keeps_what_fits():
    """Capacity 2 rows per peer: the flag is set; a token whose every row fit is exact; the others
    lose only the contributions of the dropped rows (no garbage, nothing out of bounds)."""
    pl, xs, ids, ws = case_inputs("uniform_w2")  # 33 and 1 tokens, top-2 of 8 on 2 ranks
    run = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert, capacity=2)
    assert int(run.results[0].handle[1]) == 1  # rank 0 had more than 2 rows for a peer
    ref = ep_reference(xs, ids, ws, pl, expert_times_id)
    e2r = torch.tensor(pl.expert_to_rank)
    for r in range(2):
        dest = e2r[ids[r]]  # [T, k]
        # the rows that fit: per destination, the first 2 tokens (token order) that go there
        fit = torch.zeros(ids[r].shape[0], dtype=torch.bool).fill_(True)
        for w in range(2):
            goes = (dest == w).any(1)
            late = goes & (torch.cumsum(goes.int(), 0) > 2)
            fit &= ~late
        assert torch.equal(run.y[r][fit], ref.y[r][fit])
        assert torch.isfinite(run.y[r]).all()


def test_force_exchange_on_one_rank_equals_the_reference(backend):
    """EP size 1 through the exchange path (what the one-GPU benchmark times), both modes, on the
    reference and on the kernels (the count exchange then reads plan_send's [2, W, 3] buffer)."""
    pl, xs, ids, ws = case_inputs("uniform_w2")
    x, i, w = xs[0], ids[0], ws[0]
    ref = ep_reference([x], [i], [w], ExpertPlacement(8, 1), expert_times_id)
    for kw in ({}, {"max_tokens": 40, "dtype": torch.float32}):
        disp = D.EPDispatcher(8, 2, 16, force_exchange=True, **kw)
        res = disp.dispatch(x, i, w)
        assert res.tokens.data_ptr() != x.data_ptr()  # really exchanged, not the local permute
        n = int(res.expert_offsets[-1])
        local = torch.repeat_interleave(torch.arange(8), res.tokens_per_expert.long())
        h = torch.zeros(res.gather_idx.shape[0], 16)
        h[:n] = vectorised_expert(res.tokens[res.gather_idx[:n].long()], local, res.row_weights[:n])
        assert torch.equal(disp.combine(h, res.handle), ref.y[0])
        disp.check_overflow()  # nothing dropped


def test_static_mode_arguments():
    with pytest.raises(MoeCommValueError, match="EPDispatcher: dtype must be given with max_tokens"):
        D.EPDispatcher(8, 2, 16, max_tokens=4)
    with pytest.raises(MoeCommValueError, match=r"EPDispatcher: capacity_per_peer must be <= max_tokens \(4\), got 5"):
        D.EPDispatcher(8, 2, 16, max_tokens=4, capacity_per_peer=5, dtype=torch.float32)
    with pytest.raises(MoeCommValueError, match="EPDispatcher: capacity_per_peer needs max_tokens"):
        D.EPDispatcher(8, 2, 16, capacity_per_peer=5)
    disp = D.EPDispatcher(8, 2, 16, max_tokens=4, capacity_per_peer=1, dtype=torch.float32, force_exchange=True)
    x, i, w = torch.ones(4, 16), torch.tensor([[0, 1]] * 4), torch.ones(4, 2)
    res = disp.dispatch(x, i, w)  # 4 tokens to one rank, capacity 1: overflow
    assert disp.overflowed()
    with pytest.raises(MoeCommValueError, match="EPDispatcher: capacity_per_peer must hold every row .* got 1 rows on rank 0"):
        disp.check_overflow()
    assert not disp.overflowed()  # cleared by the check
    with pytest.raises(MoeCommValueError, match=r"combine: expert_out must have shape \[2, 16\]"):  # W * C * k
        disp.combine(torch.zeros(3, 16), res.handle)
    big = disp.dispatch(torch.ones(5, 16), torch.tensor([[0, 1]] * 5), torch.ones(5, 2))  # > max_tokens: throughput
    assert big.handle.buffers is None and big.handle.send_splits == [5]


def _compile_plan_pack() -> int:
    """Compile the plan kernel, the sorts' kernels (each variant) and both pack variants for sm_90;
    run without TRITON_INTERPRET."""
    from moecomm.ep.nccl._triton import (ep_expand_hist_kernel, ep_pack_send_kernel, ep_plan_kernel,
                                         ep_sort_scan_kernel, ep_sort_scatter_kernel)

    sig = {n: "*i32" for n in ("ids_ptr", "e2r_ptr", "e2l_ptr", "rank_ptr", "local_ptr", "first_ptr", "inrank_ptr",
                               "hist_ptr", "base_ptr", "offs_ptr", "info_ptr", "sem_ptr")}
    sig.update({n: "i32" for n in ("T", "E", "NB", "stride_it", "stride_ik")})
    sig.update({n: "constexpr" for n in ("K", "KP", "W", "NUM_BINS", "BLOCK_T", "CHECK", "HB", "ONEHOT", "CHUNK_B")})
    # one-hot in-block ranks (W 8) and the pairwise compare (W 128), each with and without the id check
    for w_, bins, block_t, onehot in ((8, 16, 64, True), (128, 256, 16, False)):
        for check in (False, True):
            k = compile_for_hopper(ep_plan_kernel, sig, {"K": 8, "KP": 8, "W": w_, "NUM_BINS": bins, "BLOCK_T": block_t,
                                                         "CHECK": check, "HB": min(bins, 16), "ONEHOT": onehot,
                                                         "CHUNK_B": 16}, num_warps=4)
            assert "atom.global.gpu.acq_rel.add" in k.asm["ptx"], "the ticket"
    sig = {"key_ptr": "*bf16", "hist_ptr": "*i32", "cnt_ptr": "*i32", "copy_ptr": "*i32", "R": "i32", "NV": "i32",
           "stride_kr": "i32", "key_col": "i32", "K": "constexpr", "KP": "constexpr", "NUM_BINS": "constexpr",
           "BLOCK_R": "constexpr", "HB": "constexpr", "CNT_W": "constexpr", "CNT_WP": "constexpr", "COPY": "constexpr"}
    # R from the host, or from the counts on the device (and those copied by program 0)
    for cnt_w, copy in ((0, False), (8, False), (8, True)):
        compile_for_hopper(ep_expand_hist_kernel, sig, {"K": 8, "KP": 8, "NUM_BINS": 64, "BLOCK_R": 16, "HB": 64,
                                                        "CNT_W": cnt_w, "CNT_WP": max(1, cnt_w), "COPY": copy},
                           num_warps=4)
    sig = {"hist_ptr": "*i32", "base_ptr": "*i32", "NB": "i32", "HC": "i32", "BLOCK_B": "constexpr",
           "BLOCK_C": "constexpr"}
    compile_for_hopper(ep_sort_scan_kernel, sig, {"BLOCK_B": 64, "BLOCK_C": 64}, num_warps=4)
    sig = {n: "*i32" for n in ("key_ptr", "hist_ptr", "base_ptr", "dst_ptr", "src_ptr", "offs_ptr", "cnt_ptr",
                               "info_ptr")}
    sig["row_w_ptr"] = "*fp32"
    sig.update({n: "i32" for n in ("R", "NV", "NB", "HC", "num_out", "stride_kr", "key_col", "stride_cnt")})
    sig.update({n: "constexpr" for n in ("K", "KP", "NUM_BINS", "BLOCK_R", "CHUNK_B", "ONEHOT", "SCANNED", "CNT_W",
                                          "CNT_WP")})
    recv_sig = dict(sig, key_ptr="*bf16")  # the receiver reads the keys from the bf16 rows in place
    order = ["key_ptr", "hist_ptr", "base_ptr", "dst_ptr", "src_ptr", "row_w_ptr", "offs_ptr", "cnt_ptr", "info_ptr",
             "R", "NV", "NB", "HC", "num_out", "stride_kr", "key_col", "stride_cnt", "K", "KP", "NUM_BINS", "BLOCK_R",
             "CHUNK_B", "ONEHOT", "SCANNED", "CNT_W", "CNT_WP"]
    # the receiver's (pairwise, L 256; one-hot, L 32), each fused and scanned; also with R and N from
    # the counts on the device
    for bins, block_r, onehot, cnt_w in ((512, 16, False, 0), (64, 16, True, 0), (64, 16, True, 4)):
        for scanned in (False, True):
            compile_for_hopper(ep_sort_scatter_kernel, {n: recv_sig[n] for n in order}, {
                "K": 8, "KP": 8, "NUM_BINS": bins, "BLOCK_R": block_r, "CHUNK_B": max(1, 4096 // bins),
                "ONEHOT": onehot, "SCANNED": scanned, "CNT_W": cnt_w, "CNT_WP": max(1, cnt_w)}, num_warps=4)
    sig = {n: "*i32" for n in ("rank_ptr", "local_ptr", "first_ptr", "sort_row_ptr", "offs_ptr", "block_base_ptr",
                               "home_ptr", "flag_ptr")}
    sig.update({"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16"})
    sig.update({n: "i32" for n in ("num_rows", "capacity", "stride_xt", "stride_xh", "stride_wt", "stride_wk",
                                   "stride_ot", "stride_mt", "meta_col")})
    sig.update({n: "constexpr" for n in ("H", "K", "KP", "W", "BLOCK_H", "STATIC", "DEV_ROWS", "BLOCK_T")})
    order = ["x_ptr", "w_ptr", "rank_ptr", "local_ptr", "first_ptr", "sort_row_ptr", "offs_ptr", "block_base_ptr",
             "out_ptr", "home_ptr", "flag_ptr", "num_rows", "capacity", "stride_xt", "stride_xh", "stride_wt",
             "stride_wk", "stride_ot", "stride_mt", "meta_col", "H", "K", "KP", "W", "BLOCK_H", "STATIC", "DEV_ROWS",
             "BLOCK_T"]
    for static, dev_rows, block_t in ((False, False, 0), (True, False, 64), (False, True, 64)):
        k = compile_for_hopper(ep_pack_send_kernel, {n: sig[n] for n in order},
                               {"H": 7168, "K": 8, "KP": 8, "W": 8, "BLOCK_H": 1024, "STATIC": static,
                                "DEV_ROWS": dev_rows, "BLOCK_T": block_t}, num_warps=4)
        assert "st.global" in k.asm["ptx"]
    return 3


def test_plan_and_pack_kernels_compile_for_hopper():
    """In a fresh process without TRITON_INTERPRET (with it, tl.sum / tl.max are interpreter helpers
    and a cold-cache compile fails inside them; see moecomm.testing.run_without_interpreter)."""
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_plan_pack") == "3"


# ----------------------------------------------------------------------------- gloo, several processes


def _static_cases(case_names: list[str]) -> dict:
    """Every rank: each case through EPDispatcher in static mode (sync and async), twice (buffers reused)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.set_num_threads(1)
    out: dict = {}
    for name in case_names:
        pl, xs, ids, ws = case_inputs(name)
        E, k, H = pl.num_experts, ids[0].shape[1], xs[0].shape[1]
        cap = max(x.shape[0] for x in xs)
        disp = D.EPDispatcher(E, k, H, placement=pl, dtype=torch.float32, max_tokens=cap)
        for async_op in (False, True, False):
            pending = disp.dispatch(xs[rank], ids[rank], ws[rank], async_op=async_op)
            res = pending.wait() if async_op else pending
            assert res.handle.buffers is not None and res.handle.send_splits is None  # the static path ran
            n = int(res.expert_offsets[-1])
            local = torch.tensor(pl.local_experts(rank), dtype=torch.long)
            expert_of_row = local[torch.repeat_interleave(res.tokens_per_expert.long())]
            h = torch.full((res.gather_idx.shape[0], H), float("nan"))  # padding rows must never be read
            h[:n] = vectorised_expert(res.tokens[res.gather_idx[:n].long()], expert_of_row, res.row_weights[:n])
            y = disp.combine(h, res.handle, async_op=async_op)
            y = y.wait() if async_op else y
            out[(name, async_op)] = tuple(t.clone().numpy() for t in (res.tokens, res.gather_idx, res.expert_offsets,
                                                                     res.tokens_per_expert, res.row_weights, y))
        disp.check_overflow()
    return out


def _check_static(outs, names):
    for name in names:
        pl, xs, ids, ws = case_inputs(name)
        for async_op in (False, True):
            got = [[torch.from_numpy(a) for a in o[(name, async_op)]] for o in outs]
            results = [D.DispatchResult(g[0], g[2], g[3], g[4], g[1], None) for g in got]
            check_against_reference(pl, xs, ids, ws, results, [g[5] for g in got])


def test_static_gloo_two_ranks():
    outs = run_distributed(2, _static_cases, ["uniform_w2"], timeout_s=90)
    _check_static(outs, ["uniform_w2"])


def test_static_gloo_four_ranks():
    # a rank with no tokens, a rank holding no experts, experts not divisible by the ranks
    outs = run_distributed(4, _static_cases, ["custom_w4"], timeout_s=90)
    _check_static(outs, ["custom_w4"])


def _static_killed(victim: int, timeout_s: float):
    """Every rank loops over static dispatch + combine; ``victim`` SIGKILLs itself at step 3."""
    import moecomm.distributed as mdist

    w = mdist.init(timeout_s=timeout_s)
    torch.set_num_threads(1)
    disp = D.EPDispatcher(8, 2, 16, dtype=torch.float32, max_tokens=4)
    x, ids, wt = torch.ones(4, 16), torch.tensor([[0, 7]] * 4), torch.ones(4, 2)
    for step in range(1000):
        if w.rank == victim and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            res = disp.dispatch(x, ids, wt)
            disp.combine(torch.zeros(res.gather_idx.shape[0], 16), res.handle)
        except Exception as exc:  # raised, so that run_distributed reports it beside the victim's exit
            raise RuntimeError(f"{type(exc).__name__}: {exc} [gave up after {time.monotonic() - t0:.1f} s]") from exc
    return "finished"


def test_static_mode_killed_rank_makes_the_others_raise():
    timeout_s = 10.0
    from moecomm.testing import DistributedTestError

    with pytest.raises(DistributedTestError) as info:
        run_distributed(3, _static_killed, 1, timeout_s, backend=None, timeout_s=60)
    failures = info.value.failures
    assert sorted(failures) == [0, 1, 2], failures
    assert "exited with code -9" in failures[1]
    for r in (0, 2):  # each survivor raised, naming the dead rank, within the timeout: no hang
        assert "rank 1" in failures[r], failures[r]
        gave_up = float(re.search(r"gave up after ([0-9.]+) s", failures[r]).group(1))
        assert gave_up <= timeout_s + 2, failures[r]


def test_one_rank_benchmark_quick(tmp_path):
    """benchmarks/bench_dispatch_onerank --quick: a one-rank gloo group, both modes, JSON lines."""
    import json

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_dispatch_onerank", "--quick", "--out", str(out)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["throughput", "static"], rows
    assert rows[0]["path"] == "python", rows[0]  # CPU: the native path queues CUDA kernels only


def _graph_step_matches_eager(disp, H, E, k, T):
    """Capture dispatch + a per-expert scaling + combine in one CUDA graph; replay on new inputs."""
    dev = torch.device("cuda")
    scale = (torch.arange(E, device=dev, dtype=torch.float32) + 1)
    x = torch.empty(T, H, device=dev, dtype=torch.bfloat16)
    ids = torch.empty(T, k, device=dev, dtype=torch.int32)
    w = torch.empty(T, k, device=dev, dtype=torch.float32)

    def step():
        d = disp.dispatch(x, ids, w, validate=False)
        # the expert: rows * (expert id + 1) * weight, computed for every row (padding rows too:
        # combine must never read them)
        e_of_row = torch.searchsorted(d.expert_offsets[1:], torch.arange(d.gather_idx.shape[0], device=dev),
                                      right=True).clamp(max=E - 1)
        h = (d.tokens[d.gather_idx.long()].float() * scale[e_of_row][:, None] * d.row_weights[:, None]).to(x.dtype)
        return disp.combine(h, d.handle)

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randint(-4, 5, (T, H), generator=g).to(torch.bfloat16))
        i, ww = routing(T, E, k, skew=bool(seed % 2), seed=seed)
        ids.copy_(i.to(torch.int32))
        w.copy_(ww)

    fill(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: kernels compiled outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for seed in (1, 2, 3):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        ref = ep_reference([x.cpu().float()], [ids.cpu()], [w.cpu()], ExpertPlacement(E, 1), expert_times_id)
        assert torch.equal(y.float().cpu(), ref.y[0].float().to(torch.bfloat16).float()), seed
    disp.check_overflow()


@pytest.mark.gpu
def test_static_mode_replays_from_a_cuda_graph(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    disp = D.EPDispatcher(16, 4, 256, dtype=torch.bfloat16, max_tokens=64, force_exchange=True)
    _graph_step_matches_eager(disp, 256, 16, 4, 64)


@pytest.mark.gpu
def test_static_mode_over_a_one_rank_nccl_group_replays_from_a_cuda_graph(monkeypatch):
    """The real exchange (NCCL's all_to_all_single) captured with the kernels; a one-rank group."""
    import torch.distributed as dist

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        disp = D.EPDispatcher(16, 4, 256, dtype=torch.bfloat16, max_tokens=64, force_exchange=True)
        _graph_step_matches_eager(disp, 256, 16, 4, 64)
    finally:
        dist.destroy_process_group()


def test_shared_buffers_are_one_set():
    kw = dict(dtype=torch.float32, max_tokens=8, force_exchange=True)
    a = D.EPDispatcher(8, 2, 16, share_buffers=True, **kw)
    b = D.EPDispatcher(8, 2, 16, share_buffers=True, **kw)
    c = D.EPDispatcher(8, 2, 16, **kw)
    x, i, w = torch.ones(3, 16), torch.tensor([[0, 5]] * 3), torch.ones(3, 2)
    for disp in (a, b, c):  # one after the other, as a model's layers run: each result is right
        res = disp.dispatch(x, i, w)  # without a process group the buffers live where the first call's x does
        assert torch.equal(disp.combine(torch.ones(res.gather_idx.shape[0], 16), res.handle), torch.full((3, 16), 2.0))
    assert a._static is b._static and a._static is not c._static
