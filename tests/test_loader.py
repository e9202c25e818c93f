"""Checkpoints: save/load round trips (single file and sharded) and every kind of bad weight file."""

from __future__ import annotations

import json
import os
import re
import stat
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
    # Every file readable as a plain write makes it (0644 under umask 022): safetensors writes 0600 itself.
    mask = os.umask(0)
    os.umask(mask)
    single = save_model(model, tmp_path / "single")
    for file in [*(out / s for s in shards), single / "model.safetensors", single / "config.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file


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


# Issue 15: hostile shard indexes, dtypes and values, and saves interrupted halfway.


def _sharded(tmp_path: Path, llama_untied: Path) -> tuple[Path, Path, dict]:
    out = save_model(load_model(llama_untied), tmp_path / "sharded", max_shard_bytes=40_000)
    index_path = out / "model.safetensors.index.json"
    return out, index_path, json.loads(index_path.read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.update(weight_map=list(i["weight_map"])), r"weight_map: expected an object mapping tensor"),
        (lambda i: i["weight_map"].update({"model.norm.weight": 3}), r'weight_map\["model.norm.weight"\]: expected a'),
        (
            lambda i: i["weight_map"].update({"model.norm.weight": "../elsewhere.safetensors"}),
            r'weight_map\["model.norm.weight"\]: expected a shard file name .*got "../elsewhere.safetensors"',
        ),
        (
            lambda i: i["weight_map"].update({"model.norm.weight": "model-00009-of-00009.safetensors"}),
            r"shard model-00009-of-00009.safetensors is listed but missing",
        ),
        (lambda i: i.clear(), r"weight_map: expected an object mapping tensor names to shard files, got null"),
    ],
)
def test_bad_shard_index(tmp_path: Path, llama_untied: Path, edit, message: str) -> None:
    out, index_path, index = _sharded(tmp_path, llama_untied)
    edit(index)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(out)
    assert str(err.value).startswith(f"{index_path}: ")


def test_index_that_is_not_an_object(tmp_path: Path, llama_untied: Path) -> None:
    out, index_path, _ = _sharded(tmp_path, llama_untied)
    index_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=re.escape(f"{index_path}: weight_map: expected an object")):
        load_model(out)


def test_fp8_beside_bf16_is_refused_naming_one_of_each(tmp_path: Path) -> None:
    def edit(c, t):
        t.update({n: w.bfloat16() for n, w in t.items()})
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)

    path = _broken(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight is torch.float8_e4m3fn" in message
    assert "lm_head.weight is torch.bfloat16" in message and str(path) in message


def test_float64_checkpoint_saves_loads_and_has_info(nas_checkpoint: Path, tmp_path: Path) -> None:
    """`generate` loads float64 weights; `tessera info` (summary()) and save_model must agree."""
    model = load_model(nas_checkpoint)
    out = save_model(model, tmp_path / "f64", dtype=torch.float64)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float64"
    assert all(t.dtype == torch.float64 for t in load_file(out / "model.safetensors").values())
    arch = ArchConfig.from_json(out)
    assert arch.summary()["weight_bytes"] == 8 * arch.num_params()
    assert torch.equal(_logits(load_model(out)), _logits(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    def edit(c, t):
        t["model.layers.1.mlp.down_proj.weight"][7, 100] = bad

    path = _broken(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight holds NaN or inf") as e:
        load_model(path)
    assert str(e.value).startswith(str(path / "model.safetensors"))


def test_weights_beyond_the_load_dtype_are_refused(tmp_path: Path) -> None:
    """A finite weight of 1e5 is inf in float16: refused when loading as float16, fine as float32."""
    path = _broken(tmp_path, lambda c, t: t["model.norm.weight"].__setitem__(3, 1e5))
    load_model(path)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight holds 100000\.0, beyond torch\.float16"):
        load_model(path, dtype=torch.float16)


def _fail_after_first_shard(monkeypatch) -> None:
    from tessera.runtime import loader

    real = loader.save_file
    written = []

    def flaky(tensors, filename, metadata=None):
        if written:
            Path(filename).write_bytes(b"half a shard")  # what a full disk leaves behind
            raise OSError(28, "No space left on device")
        written.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(loader, "save_file", flaky)


def test_save_failing_mid_write_keeps_the_old_checkpoint(llama_untied: Path, tmp_path: Path, monkeypatch) -> None:
    old = load_model(llama_untied)
    target = save_model(old, tmp_path / "ckpt", max_shard_bytes=40_000)
    (target / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    child = Model(old.arch).init_weights(seed=3)
    _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_model(child, target, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert torch.equal(_logits(load_model(target)), _logits(old))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_save_failing_into_a_new_directory_leaves_nothing(nas_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    model = load_model(nas_checkpoint)
    _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, tmp_path / "runs" / "child", max_shard_bytes=40_000)
    assert list((tmp_path / "runs").iterdir()) == []


def test_save_over_a_checkpoint_keeps_the_callers_files(llama_untied: Path, tmp_path: Path) -> None:
    """demo_parent writes tokenizer.json before save_model, the search writes reports beside the weights:
    the swap carries such files over; old weights (here shards, replaced by one file) and no temp dir stay."""
    model = load_model(llama_untied)
    target = save_model(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    (target / "tokenizer.json").write_text('{"mine": 1}')
    (target / "plots").mkdir()
    (target / "plots" / "loss.png").write_bytes(b"png")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text('{"from": "parent"}')
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")  # where transformers >= 4.43 keeps it
    (tok_dir / "notes.txt").write_text("not a tokenizer file")
    save_model(model, target, tokenizer_from=tok_dir)
    names = sorted(p.name for p in target.iterdir())
    expected = ["chat_template.jinja", "config.json", "model.safetensors", "plots", "tokenizer.json"]
    assert names == [*expected, "tokenizer_config.json"]
    assert (target / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (target / "tokenizer.json").read_text() == '{"mine": 1}'
    assert (target / "tokenizer_config.json").read_text() == '{"from": "parent"}'
    assert (target / "plots" / "loss.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]
    assert torch.equal(_logits(load_model(target)), _logits(model))
    save_model(model, target, tokenizer_from=target)  # its own tokenizer: kept, not truncated
    assert (target / "tokenizer_config.json").read_text() == '{"from": "parent"}'


def test_save_onto_a_file_is_refused(nas_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_model(load_model(nas_checkpoint), tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "not a checkpoint"


def _width_other_runtimes_build(ffn_mult: float, hidden: int) -> int:
    """vLLM's nemotron-nas rule (`_ffn_mult_to_intermediate_size`), written out here as the reference."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def test_an_export_other_runtimes_would_misread_says_so(tmp_path: Path) -> None:
    """A width ffn_mult can express (256 at hidden 32) exports plainly; a pruned width (64) is recorded for
    tessera, and the config and a warning both say that only tessera loads it (issue 17)."""
    from tessera.config import AttentionConfig, BlockConfig, FFNConfig

    gqa = AttentionConfig("gqa", 2)
    arch = ArchConfig(
        vocab_size=97,
        hidden_size=32,
        n_heads=4,
        head_dim=8,
        blocks=(BlockConfig(gqa, FFNConfig("swiglu", 256)), BlockConfig(gqa, FFNConfig("swiglu", 64))),
        max_position_embeddings=64,
    )
    plain = save_model(Model(arch.with_blocks([arch.blocks[0]] * 2)).init_weights(seed=0), tmp_path / "plain")
    assert "tessera_only" not in json.loads((plain / "config.json").read_text())
    with pytest.warns(UserWarning, match=r"pruned: .*only tessera loads this checkpoint \(layer 1: 64 saved, 256 from"):
        path = save_model(Model(arch).init_weights(seed=0), tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    widths = {
        i: (
            _width_other_runtimes_build(b["ffn"]["ffn_mult"], 32),
            tensors[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0],
        )
        for i, b in enumerate(config["block_configs"])
    }
    assert widths == {0: (256, 256), 1: (256, 64)}  # what another runtime would build vs what is saved
    assert "layer 1: 64 saved, 256 from ffn_mult" in config["tessera_only"] and "layer 0" not in config["tessera_only"]
    assert [b.ffn.intermediate_size for b in load_model(path).arch.blocks] == [256, 64]  # tessera reads it right
    # Linear sublayers: vLLM's and SGLang's nemotron-nas read no replace_with_linear (their n_heads_in_group and
    # ffn_mult come out null): the export names the layers and who does read them.
    linear = arch.with_blocks(
        [arch.blocks[0], BlockConfig(AttentionConfig("linear"), FFNConfig("linear")), arch.blocks[0]]
    )
    with pytest.warns(UserWarning, match=r"linear sublayers \(replace_with_linear\) on layers \[1\]: vLLM and SGLang"):
        path = save_model(Model(linear).init_weights(seed=0), tmp_path / "linear")
    assert "TensorRT-LLM" in json.loads((path / "config.json").read_text())["tessera_only"]
