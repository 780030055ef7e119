"""Fixtures of the tests/ep suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Every functional test runs on the reference and on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton":
        return request.getfixturevalue("triton_backend")
    monkeypatch.setenv("MOECOMM_BACKEND", "reference")
    return "cuda" if torch.cuda.is_available() else "cpu"
