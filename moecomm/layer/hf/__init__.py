"""Hugging Face transformers integration: MoE blocks replaced by moecomm.MoE, in the blocks' own layout.

transformers' own model tests on patched models (benchmarks/hf_model_suite.py; issue 11's bar): the
per-model test files of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and DeepSeek-V3 with transformers 5.17.0's
ModelTesterMixin (and its tensor/expert-parallel mixin, 2 gloo ranks), models patched right after
construction or after from_pretrained: no test that passes unpatched fails patched. No test of these files
inspects the replaced block's class or submodules by name in a way the patched layer breaks (it keeps the
block's submodules under their names: gate, experts, shared_expert(s)), so none is excepted.

Tests failing in both modes (not ours; transformers 5.17 / torch 2.13 on CPU, or the copies of the
per-model files being of another transformers version):
- test_eager_matches_batched_and_grouped_inference (fp16 / bf16; Mixtral fp32 too): the test selects
  transformers' grouped_mm, and torch's CPU grouped_mm refuses rows that are not a multiple of 16 bytes
  (moe intermediate 37 or 12); a patched model runs transformers' block under an implementation chosen
  after patching, so fails the same way. With transformers' default (grouped_mm) every forward of those
  two families fails so unpatched; patched models pass them (hf_model_suite --default-experts eager
  gives the baseline where both pass).
- Mixtral test_load_balancing_loss: the test file expects an aux loss of 8 (an older definition);
  transformers 5.17 gives 2.0052 on that input, and the patched model the same.
- Mixtral test_model_rope_scaling_*: MixtralConfig.head_dim is None unless given, and 5.17's RoPE
  init multiplies it.
- Qwen2-MoE test_num_layers_is_small: that file's tester has 5 layers, 5.17's mixin asks for <= 2.
"""

from .blocks import BLOCKS, SUPPORTED_BLOCKS
from .convert import from_hf, patch_hf_model, unpatch_hf_model
from .patched import HFMoE

__all__ = ["BLOCKS", "HFMoE", "SUPPORTED_BLOCKS", "from_hf", "patch_hf_model", "unpatch_hf_model"]
