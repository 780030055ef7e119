"""Every test module is collected by the README's command (`python -m pytest -q tests`).

pytest does not recurse into folders matching its default `norecursedirs` (dist, build, venv, ...):
tests placed in one are silently never run. tests/dist was such a folder for four sessions.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

TESTS = Path(__file__).parent


def test_no_test_folder_is_skipped_by_pytest_recursion(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    skipped = [str(d.relative_to(TESTS)) for d in TESTS.rglob("*") if d.is_dir() and d.name != "__pycache__"
               and any(fnmatch.fnmatch(d.name, p) for p in patterns)
               and any(d.rglob("test_*.py"))]
    assert not skipped, f"test folders pytest will not recurse into (norecursedirs {patterns}): {skipped}"


def test_the_check_sees_a_folder_named_dist(pytestconfig):
    assert any(fnmatch.fnmatch("dist", p) for p in pytestconfig.getini("norecursedirs")), (
        "pytest's norecursedirs no longer lists dist: the check above would pass for the wrong reason")
