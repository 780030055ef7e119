"""transformers' own model tests, run on unpatched and on moecomm-patched models, side by side.

Issue 11's bar: the patched models must pass transformers' per-model test files (ModelTesterMixin,
the causal-LM tester, ...) wherever the unpatched ones pass. This script runs a local copy of those
test files (public code, never part of this repository: see "The suite" below) once per mode, with
a pytest plugin (this module, loaded with ``-p benchmarks.hf_model_suite``) choosing when models are
patched, and prints per family the passed / failed / skipped counts and the tests that pass
unpatched but fail patched.

    python -m benchmarks.hf_model_suite run --suite /tmp/hf-tests/suite --family mixtral --mode construct
    python -m benchmarks.hf_model_suite report --results /tmp/hf-tests/results
    ... run --default-experts eager ...   # models that ask for no experts implementation get eager, not grouped_mm
    ... run --only generation ...         # only the GenerationTesterMixin tests (names read from the suite's file)

Modes:
  unpatched   transformers as it is
  construct   every model patched right after construction: PreTrainedModel.post_init is wrapped to call
              moecomm.patch_hf_model(self) (so a model built on the meta device by from_pretrained is
              patched there, before its weights are loaded)
  load        every model patched after loading: PreTrainedModel.from_pretrained is wrapped to patch
              the model it returns (models built directly stay unpatched)

The suite: a folder holding ``tests/`` with transformers 5.17.0's sdist test files (test_modeling_common.py
and companions) and the per-model files tests/models/<family>/test_modeling_<family>.py from transformers'
repository, and tests/generation/test_utils.py (GenerationTesterMixin; not in the sdist: transcribed from a
5.x tree of the code index). Results are JUnit XML files, one per (family, mode), read by ``report``.
The generation tests build their models directly (model_class(config)), so load mode patches only the few
that go through from_pretrained: for them construct mode is the one that tests patched models.

Not a CI test: it runs transformers' suite, minutes per family on CPU.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FAMILIES = {
    "mixtral": "tests/models/mixtral/test_modeling_mixtral.py",
    "qwen3_moe": "tests/models/qwen3_moe/test_modeling_qwen3_moe.py",
    "qwen2_moe": "tests/models/qwen2_moe/test_modeling_qwen2_moe.py",
    "olmoe": "tests/models/olmoe/test_modeling_olmoe.py",
    "deepseek_v3": "tests/models/deepseek_v3/test_modeling_deepseek_v3.py",
}
MODES = ("unpatched", "construct", "load")
_MODE_VAR = "HF_MODEL_SUITE_MODE"  # read only by the plugin below, in the pytest process this script starts
_COUNT_VAR = "HF_MODEL_SUITE_COUNT_FILE"
_DEFAULT_EXPERTS_VAR = "HF_MODEL_SUITE_DEFAULT_EXPERTS"


# ---------------------------------------------------------------------------------------------- the plugin
def _patch(model, counts: dict) -> None:
    import moecomm

    counts["blocks"] = counts.get("blocks", 0) + moecomm.patch_hf_model(model)
    counts["models"] = counts.get("models", 0) + 1


def pytest_configure(config) -> None:
    """pytest hook: wrap transformers' PreTrainedModel as the mode (HF_MODEL_SUITE_MODE) says."""
    mode = os.environ.get(_MODE_VAR, "unpatched")
    if mode not in MODES:
        raise ValueError(f"hf_model_suite: {_MODE_VAR} must be one of {MODES}, got {mode!r}")
    from transformers import PreTrainedModel

    default_experts = os.environ.get(_DEFAULT_EXPERTS_VAR)
    if default_experts:  # the experts implementation a model gets when none is asked for (transformers: grouped_mm)
        pick = PreTrainedModel.get_correct_experts_implementation

        @functools.wraps(pick)
        def pick_default(self, requested_experts):
            return pick(self, default_experts if requested_experts is None else requested_experts)

        PreTrainedModel.get_correct_experts_implementation = pick_default
    if mode == "unpatched":
        return

    counts: dict = {}
    config._hf_model_suite_counts = counts
    if mode == "construct":
        post_init = PreTrainedModel.post_init

        @functools.wraps(post_init)
        def patched_post_init(self, *args, **kwargs):
            out = post_init(self, *args, **kwargs)
            _patch(self, counts)
            return out

        PreTrainedModel.post_init = patched_post_init
    else:
        from_pretrained = PreTrainedModel.from_pretrained.__func__

        @functools.wraps(from_pretrained)
        def patched_from_pretrained(cls, *args, **kwargs):
            out = from_pretrained(cls, *args, **kwargs)
            model = out[0] if isinstance(out, tuple) else out  # output_loading_info=True returns (model, info)
            _patch(model, counts)
            return out

        PreTrainedModel.from_pretrained = classmethod(patched_from_pretrained)


def pytest_unconfigure(config) -> None:
    """pytest hook: write how many models and blocks were patched (the proof that patching happened)."""
    counts = getattr(config, "_hf_model_suite_counts", None)
    where = os.environ.get(_COUNT_VAR)
    if counts is not None and where:
        Path(where).write_text(json.dumps(counts))


# ---------------------------------------------------------------------------------------------- running
def run(suite: Path, family: str, mode: str, results: Path, timeout_s: int, extra: list[str],
        default_experts: str | None = None) -> int:
    """Run one family's test file under one mode; JUnit XML and patch counts land in ``results``.
    default_experts: the experts implementation models get when their config asks for none (transformers
    picks grouped_mm, which torch's CPU kernel refuses for rows not a multiple of 16 bytes: intermediate 37)."""
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"{family}.{mode}"
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, **{_MODE_VAR: mode, _COUNT_VAR: f"{stem}.counts.json"})
    if default_experts:
        env[_DEFAULT_EXPERTS_VAR] = default_experts
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(suite), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", FAMILIES[family], "-p", "benchmarks.hf_model_suite", "-p",
           "no:cacheprovider", f"--timeout={timeout_s}", f"--junitxml={stem}.xml", "-q", "-rN",
           "-o", "junit_family=xunit2", *extra]
    with open(f"{stem}.log", "w") as log:
        return subprocess.call(cmd, cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT)


def generation_tests(suite: Path) -> list[str]:
    """The test_* method names of GenerationTesterMixin in the suite's tests/generation/test_utils.py, sorted."""
    path = suite / "tests" / "generation" / "test_utils.py"
    if not path.exists():
        raise FileNotFoundError(f"hf_model_suite: --only generation needs {path}, which does not exist")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "GenerationTesterMixin":
            names = sorted(f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_"))
            if names:
                return names
    raise ValueError(f"hf_model_suite: {path} has no GenerationTesterMixin with test_* methods (a stub?)")


def outcomes(xml_path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed | failed | skipped, first line of the failure or skip message)."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        status, why = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, why = "failed", (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
            elif child.tag == "skipped":
                status, why = "skipped", (child.get("message") or "")[:160]
        out[name] = (status, why)
    return out


def report(results: Path, modes: tuple[str, ...] = MODES, failures: bool = False) -> None:
    """Print, per family, the counts per mode and the tests that pass unpatched but fail patched; with
    failures=True also every test failing patched, with its unpatched outcome and its message."""
    rows, regressions = [], []
    for family in FAMILIES:
        base_xml = results / f"{family}.unpatched.xml"
        if not base_xml.exists():
            continue
        base = outcomes(base_xml)
        row = [family, len(base)]
        for mode in modes:
            xml = results / f"{family}.{mode}.xml"
            if not xml.exists():
                row.append("-")
                continue
            got = outcomes(xml)
            n = {s: sum(1 for v in got.values() if v[0] == s) for s in ("passed", "failed", "skipped")}
            row.append(f"{n['passed']}/{n['failed']}/{n['skipped']}")
            if mode != "unpatched":
                counts = results / f"{family}.{mode}.counts.json"
                row[-1] += f" ({json.loads(counts.read_text()).get('blocks', 0)} blocks)" if counts.exists() else ""
                for test, (status, _) in sorted(base.items()):
                    if status == "passed" and got.get(test, ("missing", ""))[0] != "passed":
                        regressions.append((family, mode, test, got.get(test, ("missing", "not run"))[1]))
        rows.append(row)
    header = ["family", "tests"] + [f"{m} pass/fail/skip" for m in modes]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\npass unpatched, not patched: {len(regressions)}")
    for family, mode, test, why in regressions:
        print(f"  {family:12s} {mode:9s} {test}  {why}")
    if failures:
        print("\nfailing patched (any mode), with the unpatched outcome:")
        for family in FAMILIES:
            seen: dict[str, tuple[str, str, str]] = {}
            for mode in modes[1:]:
                xml = results / f"{family}.{mode}.xml"
                base_xml = results / f"{family}.unpatched.xml"
                if not (xml.exists() and base_xml.exists()):
                    continue
                base = outcomes(base_xml)
                for test, (status, why) in outcomes(xml).items():
                    if status == "failed":
                        seen.setdefault(test, (mode, base.get(test, ("missing", ""))[0], why))
            for test, (mode, base_status, why) in sorted(seen.items()):
                print(f"  {family:12s} {test}  [{mode}; unpatched {base_status}]  {why[:110]}")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run`` (one family and mode, or all) and ``report``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.hf_model_suite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--suite", type=Path, required=True)
    r.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    r.add_argument("--mode", choices=[*MODES, "all"], default="all")
    r.add_argument("--results", type=Path, default=Path("/tmp/hf-tests/results"))
    r.add_argument("--timeout", type=int, default=300, help="pytest-timeout per test, seconds")
    r.add_argument("--default-experts", choices=["eager", "grouped_mm", "batched_mm"], default=None,
                   help="experts implementation of models that ask for none (default: transformers' choice)")
    r.add_argument("--only", choices=["generation"], default=None,
                   help="run only these tests (generation: GenerationTesterMixin's, by name, with pytest -k)")
    r.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    s = sub.add_parser("report")
    s.add_argument("--results", type=Path, default=Path("/tmp/hf-tests/results"))
    s.add_argument("--failures", action="store_true", help="also list every test failing patched")
    args = p.parse_args(argv)
    if args.cmd == "report":
        report(args.results, failures=args.failures)
        return 0
    families = list(FAMILIES) if args.family == "all" else [args.family]
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if args.only == "generation":  # -k matches substrings: test_generate_from_inputs_embeds also selects its variants
        args.pytest_args = ["-k", " or ".join(generation_tests(args.suite)), *args.pytest_args]
    for family in families:
        for mode in modes:
            rc = run(args.suite, family, mode, args.results, args.timeout, args.pytest_args, args.default_experts)
            print(f"{family} {mode}: pytest exit {rc}", flush=True)
    report(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
