"""benchmarks/hf_model_suite.py, the runner of transformers' model tests on patched models: its pytest
plugin patches every model built (construct mode) or loaded (load mode), and its report finds the tests
that pass unpatched but not patched. transformers' suite itself is not run here (not in CI)."""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import hf_model_suite as suite
from moecomm.layer.hf import HFMoE

transformers = pytest.importorskip("transformers")
from test_hf import _config  # noqa: E402  (tests/hf is on sys.path under pytest's rootdir conftest)


def _case(name: str, status: str, message: str = "") -> str:
    inner = {"passed": "", "failed": f'<failure message="{message}"/>', "skipped": f'<skipped message="{message}"/>'}[status]
    return f'<testcase classname="tests.models.mixtral.test_modeling_mixtral.MixtralModelTest" name="{name}">{inner}</testcase>'


def _write(path, cases):
    path.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">' + "".join(cases) + "</testsuite></testsuites>")


def test_report_names_the_tests_that_pass_unpatched_only(tmp_path, capsys):
    _write(tmp_path / "mixtral.unpatched.xml", [_case("test_a", "passed"), _case("test_b", "passed"),
                                                _case("test_c", "failed", "RuntimeError: x"), _case("test_d", "skipped", "gpu")])
    _write(tmp_path / "mixtral.construct.xml", [_case("test_a", "passed"), _case("test_b", "failed", "AssertionError: y"),
                                                _case("test_c", "passed"), _case("test_d", "skipped", "gpu")])
    (tmp_path / "mixtral.construct.counts.json").write_text('{"blocks": 6, "models": 3}')
    assert suite.outcomes(tmp_path / "mixtral.construct.xml")["MixtralModelTest::test_b"] == ("failed", "AssertionError: y")
    suite.report(tmp_path, failures=True)
    out = capsys.readouterr().out
    assert "2/1/1" in out and "2/1/1 (6 blocks)" in out
    assert "pass unpatched, not patched: 1" in out
    assert "mixtral      construct MixtralModelTest::test_b  AssertionError: y" in out
    assert "MixtralModelTest::test_b  [construct; unpatched passed]" in out


@pytest.mark.parametrize("mode", ["construct", "load"])
def test_plugin_patches_models_built_or_loaded(mode, monkeypatch, tmp_path):
    PreTrainedModel = transformers.PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "post_init", PreTrainedModel.post_init)  # restored after the test
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", PreTrainedModel.__dict__["from_pretrained"])
    monkeypatch.setattr(PreTrainedModel, "get_correct_experts_implementation",
                        PreTrainedModel.get_correct_experts_implementation)
    monkeypatch.setenv("HF_MODEL_SUITE_MODE", mode)
    config = types.SimpleNamespace()
    suite.pytest_configure(config)
    torch.manual_seed(0)
    built = transformers.AutoModelForCausalLM.from_config(_config("olmoe"))
    n_built = sum(isinstance(m, HFMoE) for m in built.modules())
    built_plain = transformers.OlmoeForCausalLM(_config("olmoe")) if mode == "construct" else built
    built_plain.save_pretrained(tmp_path)
    loaded = transformers.OlmoeForCausalLM.from_pretrained(tmp_path)
    n_loaded = sum(isinstance(m, HFMoE) for m in loaded.modules())
    assert (n_built, n_loaded) == ((2, 2) if mode == "construct" else (0, 2))
    assert config._hf_model_suite_counts["blocks"] == (6 if mode == "construct" else 2)  # construct: 3 models built


def test_plugin_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setenv("HF_MODEL_SUITE_MODE", "sometimes")
    with pytest.raises(ValueError, match="HF_MODEL_SUITE_MODE must be one of .* got 'sometimes'"):
        suite.pytest_configure(types.SimpleNamespace())


def test_generation_tests_are_read_from_the_suites_mixin(tmp_path):
    gen = tmp_path / "tests" / "generation"
    gen.mkdir(parents=True)
    (gen / "test_utils.py").write_text(
        "def test_module_level():\n    pass\n\n\nclass Other:\n    def test_other(self):\n        pass\n\n\n"
        "class GenerationTesterMixin:\n    def _helper(self):\n        pass\n\n"
        "    def test_sample_generate(self):\n        pass\n\n    def test_greedy_generate(self):\n        pass\n")
    assert suite.generation_tests(tmp_path) == ["test_greedy_generate", "test_sample_generate"]
    (gen / "test_utils.py").write_text("class GenerationTesterMixin:\n    pass\n")  # the stub: an error, not an empty -k
    with pytest.raises(ValueError, match="no GenerationTesterMixin with test_\\* methods"):
        suite.generation_tests(tmp_path)
    with pytest.raises(FileNotFoundError, match="needs .*missing/tests/generation/test_utils.py"):
        suite.generation_tests(tmp_path / "missing")
