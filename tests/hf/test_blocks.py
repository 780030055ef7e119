"""The table of supported transformers blocks (moecomm/layer/hf/blocks.py) is the one source: the code,
the docs and SUPPORTED_BLOCKS read it, and each row is checked against the real block class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moecomm.layer.hf import blocks
from moecomm.layer.hf.blocks import BLOCKS, KINDS, SUPPORTED_BLOCKS, find_row, render_table
from moecomm.routing import RoutingMethod

transformers = pytest.importorskip("transformers")
from test_hf import FAMILIES, _block  # noqa: E402


def test_docstring_table_is_rendered_from_the_table():
    doc = blocks.__doc__
    inside = doc[doc.index("<!-- BLOCKS:begin -->\n") + len("<!-- BLOCKS:begin -->\n"): doc.index("<!-- BLOCKS:end -->")]
    assert inside.strip() == render_table().strip(), "run `python -m moecomm.layer.hf.blocks` and paste its table"


def test_supported_blocks_and_names_come_from_the_rows():
    assert SUPPORTED_BLOCKS == tuple(r.block for r in BLOCKS)
    assert len(set(SUPPORTED_BLOCKS)) == len(BLOCKS) and len({r.model for r in BLOCKS}) == len(BLOCKS)
    assert {r.kind for r in BLOCKS} == set(KINDS)
    table = render_table()
    assert all(r.model in table for r in BLOCKS)


def test_readme_count_of_blocks_matches():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    counts = [int(n) for n in re.findall(r"(\d+) blocks", readme.read_text())]
    assert all(n == len(BLOCKS) for n in counts), (counts, len(BLOCKS))


@pytest.mark.parametrize("family", FAMILIES)
def test_row_matches_the_real_block(family):
    """The row's claims (router settings it reads, where the bias is, the shared expert) hold for the
    block transformers builds for that family."""
    block = _block(family)
    row = find_row(block)
    assert row is not None and row.block == type(block).__name__
    kind = row.kind
    gate = block.gate
    if kind.renormalize == "norm_topk_prob":
        assert isinstance(gate.norm_topk_prob, bool)
    if kind.grouped:
        assert all(hasattr(gate, a) for a in ("num_group", "topk_group", "routed_scaling_factor"))
    owner = {"gate": gate, "block": block}.get(kind.bias)
    assert (owner is not None) == (kind.routing is RoutingMethod.SIGMOID_GROUPED_TOPK)
    if owner is not None:
        assert "e_score_correction_bias" in owner._buffers
    for name in ("shared_expert", "shared_experts"):
        assert (getattr(block, name, None) is not None) == (row.shared_name == name), name
    assert (getattr(block, "shared_expert_gate", None) is not None) == row.shared_gate


def test_subclass_of_a_listed_block_finds_its_row():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    class Tuned(MixtralSparseMoeBlock):
        pass

    assert find_row(Tuned.__new__(Tuned)).block == "MixtralSparseMoeBlock"
