"""The weight-name table (runtime/weights.py) against checkpoints it did not write: transformers' own Llama
and the nemotron-nas tensors conftest spells out by hand. Names, shapes, order and bytes must not move: a
saved checkpoint is the same tensors under the same names that transformers and vLLM read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime import load_model, save_model
from tessera.runtime.model import DecoderLayer, Model
from tessera.runtime.weights import ATTENTION, FFN, hf_weight_shapes, pack, sublayer_kind, unpack

from .conftest import nas_config, nas_tensors, write_checkpoint


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in load_file(path / "model.safetensors").items()}


@pytest.mark.parametrize("fixture", ["llama_untied", "llama_tied"])
def test_shapes_are_what_transformers_writes(fixture: str, request) -> None:
    path = request.getfixturevalue(fixture)  # saved by LlamaForCausalLM.save_pretrained (tied: no lm_head)
    assert hf_weight_shapes(ArchConfig.from_json(path / "config.json")) == _stored_shapes(path)


@pytest.mark.parametrize("fixture", ["llama_untied", "llama_tied"])
def test_llama_round_trip_keeps_transformers_names_and_bytes(fixture: str, request, tmp_path: Path) -> None:
    path = request.getfixturevalue(fixture)
    original, saved = (
        load_file(path / "model.safetensors"),
        load_file(save_model(load_model(path), tmp_path / "out") / "model.safetensors"),
    )
    assert saved.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(saved[name], t), name  # fp32 in, fp32 out: packing and splitting move no bit


def test_nas_shapes_and_round_trip_match_hand_written_names(tmp_path: Path) -> None:
    config = nas_config()  # every block kind: kv 4/2/1, linear and no-op attention, widths 256/512, linear FFN
    tensors = nas_tensors(config)
    arch = ArchConfig.from_hf_dict(config)
    assert hf_weight_shapes(arch) == {name: tuple(t.shape) for name, t in tensors.items()}
    out = save_model(load_model(write_checkpoint(tmp_path / "nas", config, tensors)), tmp_path / "copy")
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == tensors.keys()
    assert all(torch.equal(saved[name], t) for name, t in tensors.items())


def test_checkpoint_order_is_the_order_shards_were_always_written_in() -> None:
    # save_model fills shards in this order: a new order would move tensors between shard files.
    names = list(hf_weight_shapes(ArchConfig.from_hf_dict(nas_config())))
    layer0 = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    head = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert names[: 3 + len(layer0)] == head + [f"model.layers.0.{n}.weight" for n in layer0]
    layer3 = [n.removeprefix("model.layers.3.") for n in names if n.startswith("model.layers.3.")]
    assert layer3 == [f"{n}.weight" for n in [*layer0[:5], "post_attention_layernorm", "mlp.linear_mlp"]]


# Awkward sizes: 5 query heads over 1 KV head (q rows 40, kv rows 8), FFN width 100 (not a power of two).
BLOCKS = (
    BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 100)),
    BlockConfig(AttentionConfig("linear"), FFNConfig("linear")),
    BlockConfig(AttentionConfig("none"), FFNConfig("none")),
)
ARCH = ArchConfig(vocab_size=61, hidden_size=40, n_heads=5, head_dim=8, max_position_embeddings=32, blocks=BLOCKS)


@pytest.mark.parametrize("layer_idx", range(len(ARCH.blocks)))
def test_unpack_and_pack_invert_each_other_and_find_the_kind(layer_idx: int) -> None:
    model = Model(ARCH).init_weights(seed=0)
    block, params = ARCH.blocks[layer_idx], dict(model.layers[layer_idx].named_parameters())
    for tables, kind in ((ATTENTION, block.attention.kind), (FFN, block.ffn.kind)):
        assert sublayer_kind(tables, params) == kind
        parts = unpack(tables[kind], params, ARCH)  # per-layer widths (kv 8, inter 100) from the rows alone
        assert {w.role: tuple(parts[w.role].shape) for w in tables[kind]} == {
            w.role: w.shape({"hidden": 40, "q": 40, "kv": 8, "inter": 100}) for w in tables[kind]
        }
        packed = pack(tables[kind], parts)
        assert packed.keys() == {w.param for w in tables[kind]}
        assert all(torch.equal(packed[name], params[name]) for name in packed)


def test_layer_parameters_are_exactly_the_table() -> None:
    # A parameter the table does not list would be silently dropped by save_model.
    for block in ARCH.blocks:
        layer = DecoderLayer(ARCH, block, 0)
        listed = {w.param for w in ATTENTION[block.attention.kind] + FFN[block.ffn.kind]}
        assert {name for name, _ in layer.named_parameters()} == listed
