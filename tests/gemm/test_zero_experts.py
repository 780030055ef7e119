"""grouped_mm / expert_mlp with no groups: what an expert-parallel rank that holds no expert runs.

# M = rows, H = hidden, I = intermediate, E = experts (here 0)

With E = 0 there are no rows either (offsets [0]); the output is [0, N] and nothing is launched. A
gather_idx of length 0 over a non-empty x is fine (the rank received tokens for no one). Rows with no
group to own them are an error, raised from the shapes alone (no device read).
"""

from __future__ import annotations

import pytest
import torch

from moecomm.errors import MoeCommValueError
from moecomm.gemm import expert_mlp, expert_mlp_reference, grouped_mm, grouped_mm_reference

H, I, N = 16, 8, 12


def _offs(device):
    return torch.zeros(1, dtype=torch.int32, device=device)  # [E + 1] = [1]


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_grouped_mm_no_groups(backend, layout):
    w = torch.randn(0, H, N, device=backend) if layout == "ekn" else torch.randn(0, N, H, device=backend)
    y = grouped_mm(torch.randn(0, H, device=backend), w, _offs(backend), layout=layout)
    assert y.shape == (0, N) and y.device.type == backend
    assert torch.equal(y.cpu(), grouped_mm_reference(torch.randn(0, H), w.cpu(), _offs("cpu"), layout=layout))


@pytest.mark.parametrize("gather", [False, True])
def test_expert_mlp_no_experts(backend, gather):
    dev = backend
    x = torch.randn(5 if gather else 0, H, device=dev)  # with gather: rows exist, none is routed here
    kw = dict(gather_idx=torch.zeros(0, dtype=torch.int32, device=dev), row_scale=torch.zeros(0, device=dev)) if gather else {}
    wgu, wd = torch.randn(0, 2 * I, H, device=dev), torch.randn(0, H, I, device=dev)
    out = torch.full((0, H), float("nan"), device=dev)
    y = expert_mlp(x, wgu, wd, _offs(dev), out=out, **kw)
    assert y is out and y.shape == (0, H)
    assert torch.equal(expert_mlp(x, wgu, wd, _offs(dev), **kw).cpu(),
                       expert_mlp_reference(x.cpu(), wgu.cpu(), wd.cpu(), _offs("cpu"),
                                            **{k: v.cpu() for k, v in kw.items()}))


def test_expert_mlp_no_experts_under_compile():
    wgu, wd = torch.randn(0, 2 * I, H), torch.randn(0, H, I)
    fn = torch.compile(lambda x: expert_mlp(x, wgu, wd, _offs("cpu")), fullgraph=True, backend="eager")
    assert fn(torch.randn(0, H)).shape == (0, H)


def test_rows_without_a_group_are_an_error():
    with pytest.raises(MoeCommValueError, match=r"grouped_mm: w has no groups \(shape \[0, 16, 12\]\), so there must be no rows, got M=3"):
        grouped_mm(torch.randn(3, H), torch.randn(0, H, N), _offs("cpu"))
    with pytest.raises(MoeCommValueError, match="expert_mlp: w has no groups .* got M=2"):
        expert_mlp(torch.randn(4, H), torch.randn(0, 2 * I, H), torch.randn(0, H, I), _offs("cpu"),
                   gather_idx=torch.zeros(2, dtype=torch.int32), validate=False)
