"""Test tiers: default (CPU; Triton through its interpreter), `gpu` (one GPU), `multigpu` (two or more).

Without a GPU, TRITON_INTERPRET=1 is set here, before any kernel module is imported, so that Triton
kernels run through the numpy interpreter. Tests of a tier whose hardware is absent are skipped with
the reason.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    skip_multi = pytest.mark.skip(reason=f"needs 2 or more CUDA GPUs; {NUM_GPUS} visible")
    for item in items:
        if "multigpu" in item.keywords and NUM_GPUS < 2:
            item.add_marker(skip_multi)
        elif "gpu" in item.keywords and NUM_GPUS < 1:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_backend(monkeypatch):
    """Run ops through their Triton kernels: on the GPU, or through the interpreter on CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    return "cuda" if NUM_GPUS else "cpu"


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Every functional test runs on the reference and on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        return request.getfixturevalue("triton_backend")
    monkeypatch.setenv("MOECOMM_BACKEND", "reference")
    return "cuda" if torch.cuda.is_available() else "cpu"
