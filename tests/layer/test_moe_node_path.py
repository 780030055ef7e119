"""The MoE layer's expert-parallel dispatcher inside a node (moecomm.layer.moe.node_dispatcher), on CPU.

# T = tokens a rank, W = ep_size, C = the IPC path's capacity

Eligibility, the symmetric buffer and the collective agreement are mocked (no GPU, no process
group); IPCDispatcher is real (its hardware check mocked). Checked: the IPC path is built when
eligible, its buffer shared by the layers of one size, the path each step takes is visible
(last_path) and logged once per change, and every reason for not taking it is said.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from moecomm.distributed import symmetric
from moecomm.distributed.symmetric import Eligibility
from moecomm.ep.ipc import IPCDispatcher, NodeDispatcher
from moecomm.ep.placement import ExpertPlacement
from moecomm.errors import UnsupportedHardwareError
from moecomm.layer import moe as moe_mod

E, K, H, W = 16, 2, 32, 4


def _ep(calls):
    def rec(name):
        return lambda *a: calls.append(("ep", name)) or SimpleNamespace(handle="ep-handle")
    return SimpleNamespace(ep_size=W, max_tokens=128, num_local_experts=E // W, dispatch_unchecked=rec("dispatch"),
                           combine_unchecked=rec("combine"), check_overflow=rec("check"))


@pytest.fixture
def mocked(monkeypatch):
    """eligibility -> ok, open_symmetric -> a CPU stand-in buffer (counted), no hardware check, no agreement."""
    state = {"opened": 0, "agreed": [], "elig": Eligibility(True, "one node, a GPU per rank, peer access")}
    moe_mod._IPC_BUFFERS.clear()

    def open_symmetric(nbytes, group, *, device=None):
        state["opened"] += 1
        return SimpleNamespace(rank=1, world_size=W, nbytes=nbytes, device=torch.device("cpu"),
                               local=torch.zeros(nbytes, dtype=torch.uint8), peer_ptrs=torch.zeros(W, dtype=torch.int64),
                               virtual=False, closed=False)

    monkeypatch.setattr(symmetric, "eligibility", lambda group, device=None: state["elig"])
    monkeypatch.setattr(symmetric, "open_symmetric", open_symmetric)
    monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(lambda device: None))
    import moecomm.distributed as dist_mod

    monkeypatch.setattr(dist_mod, "check_agreement", lambda group, op, **f: state["agreed"].append((op, f)))
    yield state
    moe_mod._IPC_BUFFERS.clear()


def _build(ll_max_tokens=128, dtype=torch.bfloat16, calls=None):
    return moe_mod.node_dispatcher(_ep([] if calls is None else calls), num_experts=E, top_k=K, hidden=H, group="g",
                                   placement=ExpertPlacement(E, W), dtype=dtype, device=torch.device("cuda", 0),
                                   ll_max_tokens=ll_max_tokens)


def test_eligible_node_takes_the_ipc_path_and_says_so(mocked, caplog):
    calls = []
    nd = _build(calls=calls)
    assert isinstance(nd, NodeDispatcher) and isinstance(nd.ipc, IPCDispatcher)
    assert nd.ipc.max_tokens == 128 and nd.ipc.capacity == 128 and nd.ipc.rank == 1 and nd.ipc.dtype == torch.bfloat16
    assert nd.ep_size == W and nd.max_tokens == 128
    assert mocked["opened"] == 1 and mocked["agreed"][0][0] == "IPCDispatcher"
    second = _build()  # a second layer of the same sizes: the same buffer
    assert mocked["opened"] == 1 and second.ipc.buffer is nd.ipc.buffer
    _build(dtype=torch.float32)  # another size: its own buffer
    assert mocked["opened"] == 2
    with caplog.at_level(logging.INFO, logger="moecomm"):
        for T in (1, 128, 129, 129, 7):
            nd.choose(T)
    assert nd.last_path.path == "ipc_ll" and "7 <= 128 tokens a rank" in nd.last_path.reason
    said = [r.getMessage() for r in caplog.records if "path" in r.getMessage()]
    assert len(said) == 3  # ipc_ll, then nccl_throughput (129 > 128), then ipc_ll again: once per change
    assert "take the ipc_ll path" in said[0] and "129 tokens a rank take the nccl_throughput path" in said[1]
    assert "129 tokens exceed the low-latency capacity of 128" in said[1]
    nd.dispatch_unchecked(torch.zeros(200, H), None, None)  # too many for IPC: EPDispatcher's
    assert calls == [("ep", "dispatch")] and nd.last_path.path == "nccl_throughput"


def test_no_ipc_above_the_kernels_limit(mocked):
    """cuda_graph_tokens above ll.cu's LL_MAX_T: no IPC path (a capped one would split the static mode's
    range in two, and ranks on either side of 1024 tokens would take different paths)."""
    nd = _build(ll_max_tokens=4096)
    assert nd.ipc is None and mocked["opened"] == 0
    nd.choose(3)
    assert "cuda_graph_tokens = 4096 exceeds the low-latency path's 1024 tokens a rank" in nd.last_path.reason
    assert _build(ll_max_tokens=1024).ipc.max_tokens == 1024


@pytest.mark.parametrize("why", ["ineligible", "no_decode", "no_toolchain"])
def test_every_reason_for_nccl_is_said(mocked, monkeypatch, why):
    calls = []
    if why == "ineligible":
        mocked["elig"] = Eligibility(False, "rank 1's GPU cannot access rank 2's GPU (PCIe without P2P?)")
    if why == "no_toolchain":
        def no(device):
            raise UnsupportedHardwareError("IPCDispatcher: the CUDA kernels of kernels/ep/ll.cu cannot run here: no nvcc")
        monkeypatch.setattr(IPCDispatcher, "_check_hardware", staticmethod(no))
    nd = _build(ll_max_tokens=0 if why == "no_decode" else 128, calls=calls)
    assert isinstance(nd, NodeDispatcher) and nd.ipc is None
    nd.dispatch_unchecked(torch.zeros(3, H), None, None)
    assert calls == [("ep", "dispatch")] and nd.last_path.path == "nccl_static"
    want = {"ineligible": "PCIe without P2P", "no_decode": "cuda_graph_tokens is 0",
            "no_toolchain": "ll.cu cannot run here: no nvcc"}[why]
    assert want in nd.last_path.reason
    if why != "ineligible":
        assert mocked["opened"] == (1 if why == "no_toolchain" else 0)


def test_the_layer_wires_it_on_cuda_only(monkeypatch):
    """MoE._make_dispatcher: a CUDA layer with EP > 1 gets node_dispatcher's NodeDispatcher; a CPU one
    the EPDispatcher itself (as before); last_ep_path reads the NodeDispatcher's last_path."""
    import moecomm.ep as ep_pkg
    from torch import nn

    made, wired = [], []
    monkeypatch.setattr(ep_pkg, "EPDispatcher", lambda *a, **kw: made.append(kw) or SimpleNamespace(kind="ep"))
    monkeypatch.setattr(moe_mod, "node_dispatcher", lambda ep, **kw: wired.append(kw) or SimpleNamespace(
        ep=ep, last_path="the path"))
    for dev in ("cuda", "cpu"):
        layer = moe_mod.MoE.__new__(moe_mod.MoE)
        nn.Module.__init__(layer)
        layer.config = SimpleNamespace(num_experts=E, top_k=K, hidden_size=H)
        layer.ep_size, layer.ep_group, layer.placement, layer.cuda_graph_tokens = W, "g", ExpertPlacement(E, W), 64
        layer.w_gate_up = SimpleNamespace(device=torch.device(dev, 0) if dev == "cuda" else torch.device("cpu"),
                                          dtype=torch.bfloat16)
        layer.dispatcher = layer._make_dispatcher(None)
        if dev == "cuda":
            assert wired[-1]["ll_max_tokens"] == 64 and wired[-1]["hidden"] == H and wired[-1]["group"] == "g"
            assert layer.dispatcher.ep.kind == "ep" and layer.last_ep_path == "the path"
        else:
            assert layer.dispatcher.kind == "ep" and layer.last_ep_path is None
    assert len(made) == 2 and len(wired) == 1 and made[0]["max_tokens"] == 64
