"""The `moecomm` command: info names every backend and why it is or is not usable; bench rejects
unknown capabilities; importing moecomm starts nothing heavy."""

import subprocess
import sys

import pytest

from moecomm import cli


def test_info_lists_backends_and_reasons():
    rows = dict(cli.info_rows())
    for key in ("torch", "backend triton", "backend reference", "dist gloo", "dist nccl", "launcher mpirun", "launcher ray"):
        assert key in rows, key
    # every "no" says why
    for key, value in rows.items():
        if value.startswith("no"):
            assert ":" in value, f"{key}: {value!r} gives no reason"


def test_info_command_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out and "MOECOMM_BACKEND" in out


def test_bench_unknown_capability_is_a_clear_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "capability must be one of" in capsys.readouterr().err


def test_demo_rejects_zero_ranks(capsys):
    assert cli.main(["demo", "-n", "0"]) == 2
    assert "-n must be >= 1, got 0" in capsys.readouterr().err


def test_import_is_light():
    code = (
        "import sys, moecomm; heavy = [m for m in ('triton', 'transformers', 'ray', 'mpi4py', 'cupy') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_attribute_raises_attribute_error():
    import moecomm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moecomm.nope  # noqa: B018
