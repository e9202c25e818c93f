"""Assembling a child from the BLD store (search/assemble.py), exported as nemotron-nas and loaded back."""

from __future__ import annotations

import json

from tessera.cli import main
from tessera.runtime.loader import load_model, save_model
from tessera.search.assemble import assemble_child
from tessera.search.library import block_from_name

from .conftest import FP32_EXACT, relative_error, windows


def test_child_exports_as_nemotron_nas_and_loads_back(trained, parent, tmp_path, capsys):
    store, _ = trained
    blocks = [block_from_name(n) for n in ("gqa_kv2+ffn_48", "attn_linear+ffn_linear", "attn_none+ffn_96")]
    child = assemble_child(parent, store, blocks)
    path = save_model(child, tmp_path / "child")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 3
    loaded = load_model(path)
    assert loaded.arch.blocks == tuple(blocks)
    tokens = windows(2, seed=4)[:, :-1]
    assert relative_error(loaded(tokens), child(tokens)) < FP32_EXACT
    assert main(["info", "--model", str(path)]) == 0
    assert "gqa kv=2" in capsys.readouterr().out
