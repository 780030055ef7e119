"""Gradients of the NCCL path's two data-movement ops, pack_rows and gather_sum.

# T = num_tokens, H = hidden, W = ep_size, S = rows sent, C = index columns

send[pos[t, w]] = x[t] and out[m] = sum_c src[idx[m, c]]: the gradient of a pack is a gather_sum
over the same positions, the gradient of a gather_sum a scatter-add (indices may repeat, -1 = none).
gradcheck on float64, fp32 exact against autograd through the references (sums of a few rows),
on the reference and the Triton kernels (the interpreter on CPU).
"""

from __future__ import annotations

import torch

from moecomm.ep.nccl import ops as O
from moecomm.ep.nccl.reference import gather_sum_reference, pack_rows_reference

POS = torch.tensor([[0, -1], [-1, 1], [-1, -1], [2, 3]], dtype=torch.int32)  # token 3 to both ranks, token 2 nowhere
IDX = torch.tensor([[0, 3, -1], [1, 1, 2], [-1, -1, -1], [4, 0, 2]], dtype=torch.int32)  # repeats and -1


def test_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: O.pack_rows_unchecked(x, POS, 4), (x,))
    src = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: O.gather_sum_unchecked(s, IDX), (src,))


def test_fp32_matches_autograd_through_the_reference(backend):
    dev = backend
    x = torch.randn(4, 16, device=dev, requires_grad=True)
    src = torch.randn(5, 16, device=dev, requires_grad=True)
    pos, idx = POS.to(dev), IDX.to(dev)
    y = O.gather_sum(O.pack_rows(x, pos, 4), pos)
    z = O.gather_sum(src, idx)
    gy, gz = torch.randn_like(y), torch.randn_like(z)
    got = torch.autograd.grad((y, z), (x, src), (gy, gz))
    xr, sr = x.detach().clone().requires_grad_(True), src.detach().clone().requires_grad_(True)
    yr = gather_sum_reference(pack_rows_reference(xr, pos, 4), pos)
    zr = gather_sum_reference(sr, idx)
    want = torch.autograd.grad((yr, zr), (xr, sr), (gy, gz))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_opcheck_with_grad():
    x = torch.randn(4, 8, requires_grad=True)
    torch.library.opcheck(O.pack_rows_unchecked.op, (x, POS, 4))
    torch.library.opcheck(O.gather_sum_unchecked.op, (torch.randn(5, 8, requires_grad=True), IDX))
