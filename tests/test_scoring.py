"""Scoring replaced blocks from cached activations (search/scoring.py) against the parent and the assembled
model."""

from __future__ import annotations

import pytest

from tessera.search import activations
from tessera.search.assemble import assemble_child, build_layer
from tessera.search.library import block_from_name
from tessera.search.scoring import model_quality, parent_logprobs, replace_one_block, score_library

from .conftest import SPACE, windows


def test_replace_one_block_with_the_parent_layer_scores_zero(parent):
    acts = activations.record(parent, windows(4, seed=1), progress=False)
    ref = parent_logprobs(parent, acts)
    got = replace_one_block(parent, parent.layers[1], 1, acts, ref)
    assert abs(got["kl_div"]) < 1e-6
    assert got["lm_loss"] == pytest.approx(model_quality(parent, acts.tokens, None)["lm_loss"], rel=1e-5)


def test_replace_one_block_equals_the_assembled_model(trained, parent):
    """Scoring from cached activations must give what the whole swapped model gives from the tokens."""
    store, _ = trained
    acts = activations.record(parent, windows(4, seed=2), progress=False)
    ref = parent_logprobs(parent, acts)
    for i, name in [(0, "gqa_kv2+ffn_48"), (2, "attn_linear+ffn_none"), (1, "attn_none+ffn_linear")]:
        block = block_from_name(name)
        scored = replace_one_block(parent, build_layer(parent, store, i, block), i, acts, ref)
        blocks = list(parent.arch.blocks)
        blocks[i] = block
        whole = model_quality(assemble_child(parent, store, blocks), acts.tokens, ref)
        assert scored["kl_div"] == pytest.approx(whole["kl_div"], rel=1e-4, abs=1e-7)
        assert scored["lm_loss"] == pytest.approx(whole["lm_loss"], rel=1e-5)
        assert scored["kl_div"] > 0


def test_score_library_covers_every_variant(trained, parent):
    store, _ = trained
    acts = activations.record(parent, windows(2, seed=3), progress=False)
    scores = score_library(parent, store, SPACE, acts, progress=False)
    for i in range(parent.arch.n_layers):
        names = {b.name for b in SPACE.block_variants(parent.arch, i)}
        assert set(scores[f"layer_{i}"]) == names
        assert scores[f"layer_{i}"][parent.arch.blocks[i].name]["kl_div"] == 0.0
        assert scores[f"layer_{i}"]["attn_none+ffn_none"]["kl_div"] > 0
