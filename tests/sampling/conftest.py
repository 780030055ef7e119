"""tests/sampling: the sampling module's one nvcc compile starts in the background once the tests
that read it are selected (test_sampling_cuda.start_nvcc), so it overlaps the tests before them."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what does not run
def pytest_collection_modifyitems(session, config, items):
    if any("nvcc_out" in getattr(item, "fixturenames", ()) for item in items):
        import test_sampling_cuda

        test_sampling_cuda.start_nvcc()
