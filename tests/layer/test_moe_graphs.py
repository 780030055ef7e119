"""MoE's per-token-count CUDA graphs (cuda_graph_tokens) and the materialized dispatch (materialize_min_rows).

# T = num_tokens, H = hidden

The graph tests run on a GPU (tier `gpu`); on CPU the layer never captures, which is checked here too.
A replayed graph runs the same kernels on the same data as the direct forward, so outputs are
compared bit for bit with a twin layer that shares the weights and has graphs off.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from moecomm.errors import MoeCommValueError
from moecomm.layer import MoE

H, I, E = 64, 32, 8


def test_bad_graph_and_materialize_arguments():
    with pytest.raises(MoeCommValueError, match=r"^MoE: cuda_graph_tokens must be >= 0, got -1"):
        MoE(H, I, E, 2, cuda_graph_tokens=-1)
    with pytest.raises(MoeCommValueError, match=r"^MoE: materialize_min_rows must be >= 1, got 0"):
        MoE(H, I, E, 2, materialize_min_rows=0)


def test_env_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MOECOMM_CUDA_GRAPH_TOKENS", "7")
    assert MoE(H, I, E, 2).cuda_graph_tokens == 7
    monkeypatch.setenv("MOECOMM_CUDA_GRAPH_TOKENS", "0")
    assert MoE(H, I, E, 2).graphs is None
    monkeypatch.setenv("MOECOMM_CUDA_GRAPH_TOKENS", "lots")
    with pytest.raises(ValueError, match="MOECOMM_CUDA_GRAPH_TOKENS must be an integer >= 0, got 'lots'"):
        MoE(H, I, E, 2)


@torch.no_grad()
def test_cpu_never_captures_and_copies_start_without_graphs():
    moe = MoE(H, I, E, 2, cuda_graph_tokens=16)
    x = torch.randn(3, H)
    for _ in range(3):
        torch.testing.assert_close(moe(x), moe.reference_forward(x), atol=1e-4, rtol=1e-4)
    assert moe.graphs.captures == 0 and len(moe.graphs) == 0
    for twin in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert twin.graphs is not moe.graphs and len(twin.graphs) == 0
        torch.testing.assert_close(twin(x), moe(x), atol=0, rtol=0)


def test_materialize_by_default_only_for_wide_experts():
    assert MoE(64, 4096, 8, 2, device="meta").dispatcher.materialize_min_rows == 4096  # Mixtral-like
    assert MoE(64, 768, 8, 2, device="meta").dispatcher.materialize_min_rows is None  # Qwen3-like
    assert MoE(64, 768, 8, 2, device="meta", materialize_min_rows=100).dispatcher.materialize_min_rows == 100


@pytest.mark.parametrize("backend", ["reference", "triton"])
@torch.no_grad()
def test_materialized_dispatch_equals_gathered(backend, request):
    """From materialize_min_rows routed rows on, the GEMMs read copied rows: same result as the gather."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    torch.manual_seed(0)
    gathered = MoE(H, I, E, 2, renormalize=True, materialize_min_rows=None)
    copied = MoE(H, I, E, 2, renormalize=True, materialize_min_rows=8)
    copied.load_state_dict(gathered.state_dict())
    for T in (3, 4, 9):  # 6 rows: gathered by both; 8 and 18 rows: copied
        x = torch.randn(T, H)
        torch.testing.assert_close(copied(x), gathered(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(copied(x), gathered.reference_forward(x), atol=1e-4, rtol=1e-4)
    d = copied.dispatcher.dispatch(x, *_routing(copied, x))
    assert d.gather_idx is None and d.tokens.shape == (18, H)
    torch.testing.assert_close(d.tokens, x[d.handle.src_token.long()], atol=0, rtol=0)


def _routing(moe, x):
    r = __import__("moecomm").routing.route(moe.router_logits(x), moe.top_k, renormalize=True)
    return r.topk_ids, r.topk_weights


# --------------------------------------------------------------------------- GPU tier
def _pair(tokens=128, **kw):
    """A layer with graphs and its twin without, sharing every weight (bf16, Qwen3-like but small)."""
    torch.manual_seed(0)
    moe = MoE(512, 256, 16, 4, renormalize=True, shared_expert_intermediate_size=128, dtype=torch.bfloat16,
              device="cuda", cuda_graph_tokens=tokens, **kw).eval()
    twin = MoE(512, 256, 16, 4, renormalize=True, shared_expert_intermediate_size=128, dtype=torch.bfloat16,
               device="cuda", cuda_graph_tokens=0, **kw).eval()
    twin.load_state_dict(moe.state_dict())
    return moe, twin


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_graph_replay_equals_direct_forward():
    moe, twin = _pair()
    outs = []
    for call in range(4):
        x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
        y = moe(x)
        torch.testing.assert_close(y, twin(x), atol=0, rtol=0)
        outs.append((y, y.clone()))
        assert moe.graphs.captures == (0 if call == 0 else 1)  # captured at the second call of T=5
    for y, saved in outs:  # outputs are the caller's: later replays do not overwrite them
        torch.testing.assert_close(y, saved, atol=0, rtol=0)
    x3 = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)  # [B, S, H] keeps its shape
    for _ in range(2):
        torch.testing.assert_close(moe(x3), twin(x3), atol=0, rtol=0)
    assert moe.graphs.captures == 2 and moe(x3).shape == (2, 3, 512)
    big = torch.randn(129, 512, device="cuda", dtype=torch.bfloat16)  # above cuda_graph_tokens: direct
    for _ in range(3):
        torch.testing.assert_close(moe(big), twin(big), atol=0, rtol=0)
    assert moe.graphs.captures == 2


@pytest.mark.gpu
def test_gpu_graphs_follow_weights_and_skip_autograd():
    moe, twin = _pair()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x), moe(x)
        assert moe.graphs.captures == 1
        for m in (moe, twin):  # in place: the graph reads the new values, no new capture
            m.w_down.mul_(2)
        torch.testing.assert_close(moe(x), twin(x), atol=0, rtol=0)
        assert moe.graphs.captures == 1
        new = torch.nn.Parameter(torch.randn_like(moe.w_gate_up) * 0.05)  # replaced: graphs dropped, recaptured
        moe.w_gate_up, twin.w_gate_up = new, new
        for _ in range(2):
            torch.testing.assert_close(moe(x), twin(x), atol=0, rtol=0)
        assert moe.graphs.captures == 2
    x.requires_grad_(True)  # autograd recorded: never from a graph
    for _ in range(3):
        y = moe(x)
        assert y.grad_fn is not None
    assert moe.graphs.captures == 2


@pytest.mark.gpu
def test_gpu_inference_mode_capture_serves_no_grad_and_outer_capture():
    moe, twin = _pair()
    x = torch.randn(6, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        moe(x), moe(x)
    assert moe.graphs.captures == 1
    with torch.no_grad():
        torch.testing.assert_close(moe(x), twin(x), atol=0, rtol=0)
        # inside someone else's capture the layer runs its kernels directly (no nested capture)
        static_x = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = moe(static_x)
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.testing.assert_close(static_y, twin(static_x), atol=0, rtol=0)
    assert moe.graphs.captures == 1


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_at_most_max_graphs_are_kept():
    moe, twin = _pair()
    for T in range(1, 20):
        x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
        moe(x), moe(x)
    assert moe.graphs.captures == 19 and len(moe.graphs) == moe.graphs.max_graphs == 16
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)  # T=1 was dropped: seen again, recaptured
    torch.testing.assert_close(moe(x), twin(x), atol=0, rtol=0)
    assert moe.graphs.captures == 20


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_torch_compile_runs_the_kernels_not_the_graphs():
    moe, twin = _pair()
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # Inductor may fuse the shared expert's silu*mul (one bf16 rounding fewer)
        torch.testing.assert_close(compiled(x), twin(x), atol=2e-2, rtol=2e-2)
    assert moe.graphs.captures == 0
