"""Checkpoints: save/load round trips (single file and sharded) and every kind of bad weight file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.config import ArchConfig
from tessera.runtime import CheckpointError, load_model, save_model
from tessera.runtime.model import Model

from .conftest import nas_config, nas_tensors, write_checkpoint


def _logits(model: Model) -> torch.Tensor:
    ids = torch.arange(40).remainder(model.arch.vocab_size)[None]
    with torch.no_grad():
        return model(ids)


def test_save_load_round_trip_nas(nas_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(nas_checkpoint)
    out = save_model(model, tmp_path / "copy")
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"
    assert load_file(out / "model.safetensors").keys() == load_file(nas_checkpoint / "model.safetensors").keys()
    assert torch.equal(_logits(load_model(out)), _logits(model))


def test_save_sharded_and_load(llama_untied: Path, tmp_path: Path) -> None:
    model = load_model(llama_untied)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert torch.equal(_logits(load_model(out)), _logits(model))


def test_save_bfloat16_then_load_float32(llama_tied: Path, tmp_path: Path) -> None:
    model = load_model(llama_tied)
    out = save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    reloaded = load_model(out)
    assert reloaded.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(reloaded.embed_tokens.weight, model.embed_tokens.weight.bfloat16().float())


def test_heterogeneous_arch_saves_as_nas_and_loads_in_transformers_layout(tmp_path: Path) -> None:
    arch = ArchConfig.from_hf_dict(nas_config())
    model = Model(arch).init_weights(seed=0)
    out = save_model(model, tmp_path / "child")
    assert ArchConfig.from_json(out) == arch
    names = load_file(out / "model.safetensors").keys()
    assert "model.layers.2.self_attn.linear_attn.weight" in names and "model.layers.3.mlp.linear_mlp.weight" in names
    assert not any(n.startswith("model.layers.6.") for n in names)


def _broken(tmp_path: Path, edit) -> Path:
    config = nas_config()
    tensors = nas_tensors(config)
    edit(config, tensors)
    return write_checkpoint(tmp_path / "broken", config, tensors)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c, t: t.pop("model.layers.1.self_attn.k_proj.weight"),
            r"tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing",
        ),
        (
            lambda c, t: t.update({"model.layers.6.mlp.gate_proj.weight": torch.zeros(256, 64)}),
            r"unexpected tensor model\.layers\.6\.mlp\.gate_proj\.weight",
        ),
        (
            lambda c, t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
            r"k_proj\.weight has shape \(16, 64\), expected \(32, 64\)",
        ),
        (
            lambda c, t: c["block_configs"][1]["ffn"].update(ffn_mult=6.0),
            r"down_proj\.weight has shape \(64, 512\), expected \(64, 256\)",
        ),
        (
            lambda c, t: c["block_configs"][2]["attention"].update(replace_with_linear=False, n_heads_in_group=2),
            r"layers\.2\.self_attn\.k_proj\.weight is missing \(and 3 more\)",
        ),
    ],
)
def test_bad_weights(tmp_path: Path, edit, message: str) -> None:
    path = _broken(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_missing_shard(tmp_path: Path, llama_untied: Path) -> None:
    out = save_model(load_model(llama_untied), tmp_path / "sharded", max_shard_bytes=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"shard {victim.name} is listed but missing")):
        load_model(out)


def test_truncated_safetensors(tmp_path: Path, nas_checkpoint: Path) -> None:
    weights = nas_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(nas_checkpoint)


def test_index_names_a_tensor_its_shard_lacks(tmp_path: Path, llama_untied: Path) -> None:
    out = save_model(load_model(llama_untied), tmp_path / "sharded", max_shard_bytes=40_000)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.norm\.weight is listed in model\.safetensors\.index\.json but not"
    ):
        load_model(out)


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda c, t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is torch\.int32, expected a floating-point"):
        load_model(path)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(nas_config()))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(tmp_path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")


def test_bad_config_surfaces_as_checkpoint_error(tmp_path: Path) -> None:
    config = nas_config()
    tensors = nas_tensors(config)
    config["block_configs"][0]["attention"]["n_heads_in_group"] = 3
    path = write_checkpoint(tmp_path / "c", config, tensors)
    with pytest.raises(CheckpointError, match=r"n_heads_in_group=3 does not divide num_attention_heads=8"):
        load_model(path)


def test_tied_checkpoint_with_stored_lm_head_loads(llama_tied: Path, tmp_path: Path) -> None:
    tensors = load_file(llama_tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    out = tmp_path / "tied_copy"
    out.mkdir()
    (out / "config.json").write_text((llama_tied / "config.json").read_text())
    save_file(tensors, out / "model.safetensors")
    assert torch.equal(_logits(load_model(out)), _logits(load_model(llama_tied)))
