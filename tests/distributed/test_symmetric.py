"""Symmetric buffers (moecomm.distributed.symmetric): the eligibility decision from mocked facts and a
mocked probe (CPU, gloo), argument errors (CPU); on one GPU: virtual buffers (layout, zeroing,
closing, open/close 100 times without growing memory) and the IPC handle exchange between two
processes on the same GPU (no spin-waits)."""

from __future__ import annotations

import pytest
import torch

from moecomm.distributed import symmetric as S
from moecomm.errors import MoeCommTypeError, MoeCommValueError, UnsupportedHardwareError
from moecomm.testing import run_distributed

import symmetric_workers as W


def _facts(*rows):
    return [S.RankFacts(h, u, tuple(a)) for h, u, a in rows]


def test_decide_names_why_ipc_is_refused():
    ok = S.decide(_facts(("n0", "GPU-a", (True, True)), ("n0", "GPU-b", (True, True))))
    assert ok.ok
    hosts = S.decide(_facts(("n0", "GPU-a", (True, True)), ("n1", "GPU-b", (True, True))))
    assert not hosts.ok and "span 2 hosts" in hosts.reason and "rank 1 on n1" in hosts.reason
    shared = S.decide(_facts(("n0", "GPU-a", (True, True)), ("n0", "GPU-a", (True, True))))
    assert not shared.ok and "ranks 0 and 1 share one GPU (GPU-a)" in shared.reason
    nop2p = S.decide(_facts(("n0", "GPU-a", (True, True, True)), ("n0", "GPU-b", (True, True, True)),
                            ("n0", "GPU-c", (True, False, True))))
    assert not nop2p.ok and "rank 2's GPU cannot access rank 1's GPU" in nop2p.reason
    # a peer whose device is not visible here (CUDA_VISIBLE_DEVICES) is left to the probe
    unknown = S.decide(_facts(("n0", "GPU-a", (True, None)), ("n0", "GPU-b", (None, True))))
    assert unknown.ok


@pytest.mark.parametrize("scenario, ok, probes, words", [
    ("ok", True, 1, None),
    ("probe_fails", False, 1, "the IPC probe failed: rank 1 read wrong bytes"),
    ("hosts_differ", False, 0, "span 2 hosts"),
    ("shared_gpu", False, 0, "share one GPU"),
])
def test_eligibility_is_decided_once_and_a_refusal_logged_once(scenario, ok, probes, words):
    outs = run_distributed(2, W.eligibility_decisions, scenario, start_method="fork", timeout_s=90)
    for o in outs:
        assert o["ok"] is ok and o["same"] and o["probes"] == probes, o
        if words:
            assert words in o["reason"] and len(o["warnings"]) == 1 and words in o["warnings"][0], o
        else:
            assert o["warnings"] == []


def test_eligibility_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    e = S.eligibility()
    assert not e.ok and "no CUDA device" in e.reason


def test_open_arguments_are_checked():
    with pytest.raises(MoeCommTypeError, match="open_virtual: nbytes must be an int, got float"):
        S.open_virtual(1.5, 2, "cuda")
    with pytest.raises(MoeCommValueError, match="open_virtual: nbytes must be >= 1, got 0"):
        S.open_virtual(0, 2, "cuda")
    with pytest.raises(MoeCommValueError, match="open_symmetric: nbytes must be >= 1, got -4"):
        S.open_symmetric(-4)
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedHardwareError, match="open_virtual: needs a CUDA device"):
            S.open_virtual(64, 2, "cuda")


@pytest.mark.gpu
def test_virtual_buffers_layout_zeroing_close_and_no_leak():
    dev = torch.device("cuda", torch.cuda.current_device())
    bufs = S.open_virtual(1000, 4, dev)
    ptrs = [b.local.data_ptr() for b in bufs]
    for r, b in enumerate(bufs):
        assert b.rank == r and b.world_size == 4 and b.nbytes == 1000 and b.virtual and b.device == dev
        assert b.local.dtype == torch.uint8 and b.local.numel() == 1000 and b.local.data_ptr() % 128 == 0
        assert b.peer_ptrs.tolist() == ptrs and b.peer_ptrs.device == dev and b.peer_ptrs.dtype == torch.int64
        assert bool((b.local == 0).all())
    bufs[1].local.fill_(7)
    assert bool((bufs[0].peer_view(1) == 7).all()) and bufs[0].peer_view(1).data_ptr() == ptrs[1]
    for b in bufs:
        b.close()
        b.close()
    with pytest.raises(S.SymmetricBufferError, match="local of a closed SymmetricBuffer"):
        bufs[0].local
    with pytest.raises(S.SymmetricBufferError, match="peer_ptrs of a closed"):
        bufs[2].peer_ptrs
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info(dev)[0]
    for _ in range(100):
        b0, b1 = S.open_virtual(8 << 20, 2, dev)
        with b0, b1:  # the memory is freed when the last of the W views closes
            pass
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info(dev)[0]
    # 100 x 2 x 8 MB opened: a leak would show as 1.6 GB; the driver's own slack is a few MB
    assert free0 - free1 < 64 << 20, (free0, free1)


@pytest.mark.gpu
def test_two_processes_on_one_gpu_exchange_handles_and_read_each_other():
    outs = run_distributed(2, W.exchange_on_one_gpu, 100, backend="gloo", timeout_s=240)
    for o in outs:
        assert o["zero"] and o["got"] == {0: True, 1: True} and o["closed_raises"], o
        # 100 x 8 MB opened and closed in each of two processes: must not grow
        assert o["free_before"] - o["free_after"] < 64 << 20, o


def test_ipc_handles_travel_as_raw_bytes():
    # handles are 64 opaque bytes with NULs inside: a c_char field would cut them at the first NUL
    raw = bytes([0, 7, 0, 255] * 16)
    assert S._IpcHandle.from_bytes(raw).to_bytes() == raw
    with pytest.raises(S.SymmetricBufferError, match="an IPC handle must be 64 bytes, got 3"):
        S._IpcHandle.from_bytes(b"abc")


def test_custom_allreduce_falls_back_to_torch_distributed_on_cpu():
    outs = run_distributed(2, W.custom_allreduce_fallback_cpu, start_method="fork", timeout_s=90)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    want = (x * 1 + x * 2)
    new_res = want + 1
    norm = new_res / torch.sqrt((new_res * new_res).mean(-1, keepdim=True) + 1e-6) * 2
    for o in outs:
        assert not o["ipc"] and o["path"] and "not CUDA" in o["reason"], o
        assert o["y"] == want.tolist() and o["same_out"] and o["out"] == want.tolist()
        assert torch.equal(torch.tensor(o["r"]), new_res)
        torch.testing.assert_close(torch.tensor(o["o"]), norm, rtol=1e-6, atol=1e-6)
        assert "x must have dtype bfloat16, float16 or float32, got int32" in o["errors"][0]
        assert "out must have x's shape [2, 3]" in o["errors"][1]
        assert "weight must be [3]" in o["errors"][2]


@pytest.mark.gpu
def test_real_eligibility_refuses_a_shared_gpu_and_the_probe_works():
    outs = run_distributed(2, W.real_eligibility_on_one_gpu, backend="gloo", timeout_s=240)
    for o in outs:
        assert not o["ok"] and "ranks 0 and 1 share one GPU" in o["reason"], o
        assert o["probe"] is None, o
