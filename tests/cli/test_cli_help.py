"""What `moecomm --help`, `demo --help` and `bench` tell a new user: every option explained, the
benchmarks named, one launcher name throughout, no GPU talk on a CPU."""

from __future__ import annotations

import argparse

import pytest

from moecomm import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["info", "demo", "bench"])
def test_every_option_has_help(command):
    sub = _subparsers(cli.build_parser())[command]
    missing = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not missing, f"moecomm {command}: options without help text: {missing}"


def test_demo_help_explains_launcher_and_tokens(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--launcher {local,torchrun,mpirun,ray} how the -n ranks start" in out
    assert "--tokens-per-rank T tokens each rank routes" in out
    for knob in ("--num-experts", "--hidden", "--top-k", "--intermediate", "--dtype", "--iters", "--seed", "--timeout"):
        assert knob in out, knob


def test_bench_help_lists_the_capabilities(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    caps = cli.bench_capabilities()
    assert caps and f"one of: {', '.join(caps)}" in out, out


def test_bare_bench_names_the_capabilities(capsys):
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "required" not in err, err
    assert "usage: moecomm bench CAPABILITY" in err and str(cli.bench_capabilities()) in err, err


def test_benchmark_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "routing", "--help"])
    assert capsys.readouterr().out.startswith("usage: moecomm bench routing")


def test_cpu_demo_does_not_talk_of_compiling():
    from moecomm.apps.demo import run_demo

    lines: list[str] = []
    rows = run_demo(device="cpu", tokens=(1, 3), hidden=16, intermediate=8, iters=1, stream=lines.append)
    assert all(r["passed"] for r in rows)
    assert not [line for line in lines if "compile" in line], lines


def test_local_launcher_is_called_local_everywhere(capfd):
    from moecomm.apps.ep_demo import main

    assert main(2, "local", tokens_per_rank=4, hidden=16, num_experts=4, intermediate=8, iters=1)
    out = capfd.readouterr().out  # fd-level: rank 0 prints its progress from its own process
    assert "2 ranks joined (gloo, cpu, launcher local)" in out, out
    assert "moecomm demo: 2 ranks (gloo, cpu, launcher local)" in out, out
    assert "launcher env" not in out, out


def test_package_doc_tells_the_truth_about_imports():
    import subprocess
    import sys

    import moecomm

    assert "imports nothing (not even torch)" in " ".join(moecomm.__doc__.split())
    out = subprocess.run([sys.executable, "-c", "import sys, moecomm; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
