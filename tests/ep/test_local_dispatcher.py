"""LocalDispatcher: the Dispatcher protocol of EP size 1, as the MoE layer drives it.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows
"""

from __future__ import annotations

import pytest
import torch

from moecomm.ep import DispatchResult, Dispatcher, LocalDispatcher
from moecomm.permute import PermuteIndices
from moecomm.errors import MoeCommTypeError, MoeCommValueError


def routing(num_tokens, top_k, num_experts, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    w, ids = scores.softmax(-1).topk(top_k, dim=1)
    return ids.to(torch.int32).to(device), w.float().to(device)


def expert_fn(rows, expert_offsets, num_experts):
    """A per-expert map (row * (e + 1)), with the expert of each row read from the offsets."""
    expert_of_row = torch.searchsorted(expert_offsets[1:].long(), torch.arange(rows.shape[0], device=rows.device), right=True)
    return rows * (expert_of_row[:, None] + 1).to(rows.dtype)


def dense_truth(x, ids, w):
    """float64: y[t] = sum_j w[t, j] * x[t] * (ids[t, j] + 1)."""
    return (w.double()[..., None] * x.double()[:, None, :] * (ids.double()[..., None] + 1)).sum(dim=1)


@pytest.mark.parametrize("materialize", [False, True])
@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden", [(0, 2, 4, 8), (1, 2, 4, 8), (33, 4, 16, 24), (199, 8, 64, 16)])
def test_dispatch_combine_round_trip(backend, materialize, num_tokens, top_k, num_experts, hidden):
    d = LocalDispatcher(num_experts, top_k, materialize=materialize)
    _: Dispatcher = d  # the protocol the MoE layer types against
    assert d.num_local_experts == num_experts
    x = (torch.arange(num_tokens * hidden, dtype=torch.float32) % 97).reshape(num_tokens, hidden).to(backend)
    ids, w = routing(num_tokens, top_k, num_experts, backend)
    r = d.dispatch(x, ids, w)
    assert isinstance(r, DispatchResult) and isinstance(r.handle, PermuteIndices)
    m = num_tokens * top_k
    assert r.expert_offsets.dtype == r.tokens_per_expert.dtype == torch.int32
    assert r.expert_offsets.shape == (num_experts + 1,) and r.tokens_per_expert.shape == (num_experts,)
    assert r.row_weights.dtype == torch.float32 and r.row_weights.shape == (m,)
    if materialize:
        assert r.gather_idx is None and r.tokens.shape == (m, hidden)
        rows = r.tokens
    else:
        assert r.tokens is x  # not copied: the GEMM gathers
        assert r.gather_idx.dtype == torch.int32 and r.gather_idx.shape == (m,)
        rows = x[r.gather_idx.long()]
    # each permuted row carries the weight of the slot it came from
    flat = r.handle.dst_row.reshape(-1).long()
    assert torch.equal(r.row_weights[flat], w.reshape(-1))
    # rows of expert e are the tokens routed to e, in token order
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=num_experts)
    assert r.tokens_per_expert.cpu().tolist() == counts.tolist()
    h = expert_fn(rows, r.expert_offsets, num_experts) * r.row_weights[:, None]
    y = d.combine(h, r.handle)
    assert y.shape == (num_tokens, hidden) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), dense_truth(x, ids, w), rtol=1e-5, atol=1e-4)


def test_combine_is_unweighted(backend):
    d = LocalDispatcher(8, 2)
    x = torch.randn(33, 16, device=backend)
    ids, w = routing(33, 2, 8, backend)
    r = d.dispatch(x, ids, w)
    y = d.combine(x[r.gather_idx.long()], r.handle)
    torch.testing.assert_close(y, 2 * x)


def test_validate_false_accepts_ids_without_host_read(backend):
    d = LocalDispatcher(4, 2, validate=False)
    x = torch.randn(5, 8, device=backend)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 7]], dtype=torch.int32, device=backend)
    r = d.dispatch(x, ids, torch.rand(5, 2, device=backend))
    assert r.expert_offsets[-1].item() == 9  # the out-of-range slot is dropped past the last expert


def test_bad_input():
    with pytest.raises(MoeCommValueError, match="LocalDispatcher: top_k must be <= num_experts=2, got 3"):
        LocalDispatcher(2, 3)
    with pytest.raises(MoeCommValueError, match="num_experts must be >= 1"):
        LocalDispatcher(0, 1)
    with pytest.raises(MoeCommTypeError, match="materialize must be a bool"):
        LocalDispatcher(4, 2, materialize="yes")
    d = LocalDispatcher(4, 2)
    x = torch.randn(3, 8)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(MoeCommValueError, match=r"topk_ids must have shape \[3, 2\]"):
        d.dispatch(x, ids[:, :1], torch.rand(3, 1))
    with pytest.raises(MoeCommValueError, match=r"topk_weights must have shape \[3, 2\]"):
        d.dispatch(x, ids, torch.rand(2, 2))
    with pytest.raises(MoeCommTypeError, match="topk_weights must have dtype float32"):
        d.dispatch(x, ids, torch.rand(3, 2, dtype=torch.float16))
    with pytest.raises(MoeCommValueError, match=r"topk_ids must be in \[0, num_experts=4\), got 4"):
        d.dispatch(x, ids + 4, torch.rand(3, 2))
    with pytest.raises(MoeCommValueError, match="expert_out must have T \\* k = 6 rows"):
        d.combine(torch.randn(5, 8), d.dispatch(x, ids, torch.rand(3, 2)).handle)


def test_torch_compile_fullgraph():
    d = LocalDispatcher(8, 2, validate=False)
    x = torch.randn(17, 16)
    ids, w = routing(17, 2, 8, "cpu")

    def step(x, ids, w):
        r = d.dispatch(x, ids, w)
        h = x[r.gather_idx.long()] * r.row_weights[:, None]
        return d.combine(h, r.handle)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, ids, w)
    torch.testing.assert_close(got, step(x, ids, w))
