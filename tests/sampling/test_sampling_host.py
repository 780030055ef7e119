"""The host path of an eager sampling call on CUDA tensors, run on CPU tensors by
moecomm.testing.fake_cuda.gpu_host_mock (the real dispatch, plan and launch over a fake libcuda):
what reaches cuLaunchKernel is plan_launch's argument list (the one tests/sampling/test_sampling_cuda.py
checks against the kernel's PTX signature and runs through the host emulation)."""

from __future__ import annotations

import pytest
import torch

import moecomm.sampling as S
from moecomm.sampling import _cuda
from moecomm.testing import fake_cuda

pytestmark = pytest.mark.skipif(fake_cuda.compiler_error() is not None, reason="no C compiler: no fake driver")
KERNELS = [(_cuda.SOURCE, e) for e in _cuda.ENTRY.values()]


def _probs(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * 3, -1)


def _launched(lib):
    """The last launch's 20 parameters as the kernel reads them (SIGNATURE's C types)."""
    ptrs = lib.fake_last_params()
    return [t.from_address(ptrs[i]).value or 0 for i, t in enumerate(_cuda.SIGNATURE.types)]


def _planned(plan):
    return [a.data_ptr() if isinstance(a, torch.Tensor) else (a.value or 0) for a in plan.args]


@pytest.mark.parametrize("kw", [{"top_p": 0.9}, {"top_k": 50, "top_p": 0.5}, {"min_p": 0.1},
                                {"top_k": 7, "top_p": 0.8, "seed": -5, "offset": 2**40 + 3}])
def test_the_launch_packs_plan_launchs_arguments(kw, monkeypatch):
    """Each call launches once, with exactly the values of plan_launch's ctypes arguments for the
    same tensors (captured from launch_sample), its entry's grid, block and shared memory."""
    x = _probs(3, 1000)
    plans = []
    real = _cuda.launch_sample

    def spy(*args):
        x_, rowmap, num_rows, out, valid, logprob = args[:6]
        top_k, top_p, min_p, _temperature, tkf, seed, offset, prs = args[9:]
        plans.append(_cuda.plan_launch(x_, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p, tkf, seed, offset, prs))
        return real(*args)

    monkeypatch.setattr(_cuda, "launch_sample", spy)
    with fake_cuda.gpu_host_mock(kernels=KERNELS) as mock:
        before = mock.launches()
        S.sample(probs=x, **kw)
        assert mock.launches() == before + 1
        got = _launched(mock.lib)
    assert got == _planned(plans[0])
    assert [mock.lib.fake_last_dim(i) for i in range(7)] == [3, 1, 1, _cuda.THREADS, 1, 1, plans[0].shared_bytes]
