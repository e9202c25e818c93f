"""Architecture config: the real configs in configs/ load with their published parameter counts,
round-trip through both writers, and malformed configs fail with a message naming the field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from tessera import hf_config
from tessera.config import (
    ArchConfig,
    AttentionConfig,
    BlockConfig,
    ConfigError,
    FFNConfig,
    ffn_mult_to_intermediate_size,
)
from tessera.files import atomic_write_bytes, atomic_write_text

from .conftest import CONFIGS, nas_config

# Figures from configs/README.md (computed there independently of tessera).
PUBLISHED = {
    "llama-3_1-nemotron-51b-instruct.json": dict(params=51_501_015_040, kv_bytes=189_952, layers=80),
    "llama-3_3-nemotron-super-49b-v1.json": dict(params=49_867_145_216, kv_bytes=200_704, layers=80),
    "llama-3_1-nemotron-ultra-253b-v1.json": dict(params=253_401_268_224, kv_bytes=262_144, layers=162),
    "llama-3.1-70b.json": dict(params=70_553_706_496, kv_bytes=327_680, layers=80),
    "llama-3.1-8b.json": dict(params=8_030_261_248, kv_bytes=131_072, layers=32),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shared_config_counts(name: str) -> None:
    arch = ArchConfig.from_json(CONFIGS / name)
    assert arch.n_layers == PUBLISHED[name]["layers"]
    assert arch.num_params() == PUBLISHED[name]["params"]
    assert arch.kv_bytes_per_token("bfloat16") == PUBLISHED[name]["kv_bytes"]
    assert arch.weight_bytes("bfloat16") == 2 * PUBLISHED[name]["params"]


def test_decode_step_bytes_llama_8b() -> None:
    """The bandwidth floor's numerator for Llama-3.1-8B in bf16: 8.03B weights minus the untied input
    embedding (128,256 x 4,096; a lookup reads only the batch's rows), plus 128 KiB of KV per cached token."""
    arch = ArchConfig.from_json(CONFIGS / "llama-3.1-8b.json")
    weights = (8_030_261_248 - 128_256 * 4096) * 2
    assert arch.decode_step_bytes(batch=1, context_len=0, dtype="bfloat16") == weights
    assert arch.decode_step_bytes(batch=64, context_len=1024, dtype="bfloat16") == weights + 64 * 1024 * 131_072


def test_fp8_cost_formulas_llama_8b() -> None:
    """In FP8 the 32 blocks' 6,979,584,000 parameters are one byte each; the embedding, the untied head and the
    final norm stay bf16, and so does the KV cache (128 KiB per token, as in bf16); the head's FP8 copy adds a byte
    a weight and an fp32 scale a row. A decode step reads the blocks, the norm and the FP8 head copy. An FP8
    checkpoint's config (quantization "fp8") makes FP8 the formulas' default."""
    arch = ArchConfig.from_json(CONFIGS / "llama-3.1-8b.json")
    embed = 128_256 * 4096
    assert 8_030_261_248 - 2 * embed - 4096 == 6_979_584_000
    head_copy = embed + 4 * 128_256
    weights = 6_979_584_000 + 2 * (2 * embed + 4096) + head_copy
    assert arch.weight_bytes("float8_e4m3fn") == weights
    assert arch.decode_step_bytes(batch=64, context_len=1024, dtype="float8_e4m3fn") == (
        6_979_584_000 + 2 * 4096 + head_copy + 64 * 1024 * 131_072
    )
    fp8 = replace(arch, quantization="fp8")
    assert fp8.summary()["weight_bytes"] == weights and fp8.kv_bytes_per_token() == 131_072


def test_nemotron_51b_layer_histogram() -> None:
    arch = ArchConfig.from_json(CONFIGS / "llama-3_1-nemotron-51b-instruct.json")
    kinds = Counter(b.attention.n_kv_heads if b.attention.kind == "gqa" else b.attention.kind for b in arch.blocks)
    assert kinds == {8: 44, 4: 1, 2: 6, 1: 3, "linear": 18, "none": 8}
    widths = Counter(b.ffn.intermediate_size for b in arch.blocks)
    assert widths == {28672: 44, 14336: 16, 7168: 20}


def test_ultra_fused_ffn_widths_and_empty_layers() -> None:
    arch = ArchConfig.from_json(CONFIGS / "llama-3_1-nemotron-ultra-253b-v1.json")
    widths = {b.ffn.intermediate_size for b in arch.blocks if b.ffn.kind == "swiglu"}
    assert {425984, 399360, 343040, 301056} <= widths
    empty = [b for b in arch.blocks if b.attention.kind == "none" and b.ffn.kind == "none"]
    assert len(empty) == 81
    assert arch.rope.factor == 16.0


@pytest.mark.parametrize(
    ("mult", "hidden", "width"),
    [(5.25, 8192, 28672), (2.625, 8192, 14336), (1.3125, 8192, 7168), (0.5, 8192, 2816), (39.0, 16384, 425984)],
)
def test_ffn_mult_rounding(mult: float, hidden: int, width: int) -> None:
    assert ffn_mult_to_intermediate_size(mult, hidden) == width


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("fmt", ["auto", "nemotron-nas"])
def test_round_trip(name: str, fmt: str, tmp_path: Path) -> None:
    arch = ArchConfig.from_json(CONFIGS / name)
    arch.save_json(tmp_path / "config.json", fmt=fmt)
    assert ArchConfig.from_json(tmp_path) == arch


def test_round_trip_width_not_reachable_by_ffn_mult(tmp_path: Path) -> None:
    base = ArchConfig.from_json(CONFIGS / "llama-3.1-8b.json")
    pruned = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 3000))  # not a multiple of 256
    arch = base.with_blocks([pruned, *base.blocks[1:]])
    arch.save_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "nemotron-nas"
    assert ArchConfig.from_json(tmp_path) == arch


def test_cost_formulas_on_a_small_heterogeneous_model() -> None:
    arch = ArchConfig.from_hf_dict(nas_config())
    h, v, d = 64, 101, 8
    # Hand count: layer by layer, following configs/README.md's counting rules.
    gqa = lambda kv: h * 64 + 2 * h * kv * d + 64 * h + h  # noqa: E731
    swiglu = lambda width: 3 * h * width + h  # noqa: E731
    linear = h * h + h
    per_layer = [
        gqa(4) + swiglu(256),
        gqa(2) + swiglu(512),
        linear + swiglu(256),
        gqa(1) + linear,
        swiglu(512),
        gqa(2),
        0,
        linear + linear,
    ]
    assert arch.num_params() == 2 * v * h + h + sum(per_layer)
    assert arch.kv_bytes_per_token("float32") == 2 * (4 + 2 + 1 + 2) * d * 4
    matmul_params = (
        arch.num_params()
        - v * h
        - h
        - sum(1 for b in arch.blocks for s in (b.attention, b.ffn) if s.kind != "none") * h
    )
    gqa_layers = 4
    assert arch.flops_per_token(context_len=10) == 2 * matmul_params + gqa_layers * 4 * 8 * d * 10


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _llama_dict() -> dict:
    return json.loads((CONFIGS / "llama-3.1-8b.json").read_text())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(model_type="gemma"), 'model_type "gemma" is not supported'),
        (lambda c: c.pop("model_type"), r"no model_type \(expected one of 'llama'"),
        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads=3 does not divide"),
        (lambda c: c.pop("hidden_size"), r"hidden_size: missing \(expected an integer in \[1, "),
        (lambda c: c.update(hidden_size="4096"), 'hidden_size: expected an integer in .*, got "4096"'),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (lambda c: c.update(attention_bias=True), "'attention_bias' is true"),
        (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
        (
            lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            r"rope_scaling\.low_freq_factor: missing",
        ),
    ],
)
def test_bad_llama_config(tmp_path: Path, mutate, message: str) -> None:
    cfg = _llama_dict()
    mutate(cfg)
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        ArchConfig.from_json(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("layer", "mutate", "message"),
    [
        (
            0,
            lambda b: b["attention"].update(n_heads_in_group=3),
            r"block_configs\[0\]\.attention\.n_heads_in_group=3 does not divide",
        ),
        (
            1,
            lambda b: b["attention"].update(n_heads_in_group=None),
            r"block_configs\[1\]\.attention\.n_heads_in_group: missing \(expected an integer",
        ),
        (
            2,
            lambda b: b["attention"].update(num_sink_tokens=4),
            r"block_configs\[2\]\.attention\.num_sink_tokens=4 asks for",
        ),
        (
            2,
            lambda b: b["attention"].update(window_length=4096),
            r"block_configs\[2\]\.attention: window_length 4096 on an attention that is replaced",
        ),
        (0, lambda b: b["ffn"].update(sparsify=["x"]), r"block_configs\[0\]\.ffn\.sparsify=\['x'\] asks for"),
        (3, lambda b: b["ffn"].update(moe={"num_experts": 8}), r"block_configs\[3\]\.ffn\.moe="),
        (
            0,
            lambda b: b["attention"].update(flash_mla=True),
            r"block_configs\[0\]\.attention\.flash_mla is not a field",
        ),
        (
            4,
            lambda b: b["ffn"].update(no_op=False, ffn_mult=-1.0),
            r"block_configs\[4\]\.ffn\.ffn_mult: expected a positive finite number, got -1.0",
        ),
        (
            2,
            lambda b: b["attention"].update(no_op=True),
            r"block_configs\[2\]\.attention: no_op and replace_with_linear",
        ),
    ],
)
def test_bad_nas_block(tmp_path: Path, layer: int, mutate, message: str) -> None:
    cfg = nas_config()
    mutate(cfg["block_configs"][layer])
    with pytest.raises(ConfigError, match=message):
        ArchConfig.from_json(_write(tmp_path, cfg))


def test_nas_neutral_keys_accepted() -> None:
    """Super-49B carries sparsify/window_length/sink keys at neutral values: they must load."""
    arch = ArchConfig.from_json(CONFIGS / "llama-3_3-nemotron-super-49b-v1.json")
    assert arch.n_layers == 80


@pytest.mark.parametrize("name", ["llama-3.1-8b.json", "llama-3.1-70b.json"])
def test_fields_left_out_read_as_transformers_reads_them(name: str, tmp_path: Path) -> None:
    """The same config.json, the same model: rms_norm_eps and max_position_embeddings, left out, take
    transformers' LlamaConfig defaults (tessera read 1e-5 and 8192 before)."""
    from transformers import LlamaConfig

    cfg = json.loads((CONFIGS / name).read_text())
    for key in ("rms_norm_eps", "max_position_embeddings"):
        del cfg[key]
    arch = ArchConfig.from_json(_write(tmp_path, cfg))
    reference = LlamaConfig(**cfg)
    assert (arch.rms_norm_eps, arch.max_position_embeddings) == (
        reference.rms_norm_eps,
        reference.max_position_embeddings,
    )


def test_block_count_mismatch(tmp_path: Path) -> None:
    cfg = nas_config()
    cfg["num_hidden_layers"] = 9
    with pytest.raises(ConfigError, match="block_configs has 8 entries but num_hidden_layers is 9"):
        ArchConfig.from_json(_write(tmp_path, cfg))


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ArchConfig.from_json(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        ArchConfig.from_json(tmp_path)


# Issue 15: every field the reader reads is type- and range-checked; a wrong type is an error naming the
# field, never a silent misread (a JSON "false" is a true string, a JSON true is an int to Python).
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(tie_word_embeddings="false"), r'tie_word_embeddings: expected true or false, got "false"'),
        (lambda c: c.update(tie_word_embeddings=0), r"tie_word_embeddings: expected true or false, got 0"),
        (lambda c: c.update(attention_bias="false"), r'attention_bias: expected true or false, got "false"'),
        (lambda c: c.update(mlp_bias=0), r"mlp_bias: expected true or false, got 0"),
        (
            lambda c: c.update(bos_token_id="128000"),
            r'bos_token_id: expected a token id in \[0, 128256\), got "128000"',
        ),
        (lambda c: c.update(bos_token_id=True), r"bos_token_id: expected a token id in \[0, 128256\), got true"),
        (lambda c: c.update(bos_token_id=-1), r"bos_token_id: expected a token id in \[0, 128256\), got -1"),
        (lambda c: c.update(eos_token_id="2"), r'eos_token_id: expected a token id in \[0, 128256\), got "2"'),
        (
            lambda c: c.update(eos_token_id=[1, "2"]),
            r'eos_token_id\[1\]: expected a token id in \[0, 128256\), got "2"',
        ),
        (lambda c: c.update(eos_token_id=128256), r"eos_token_id: expected a token id in \[0, 128256\), got 128256"),
        (lambda c: c.update(pad_token_id="0"), r'pad_token_id: expected an integer in \[-1, \d+\] or null, got "0"'),
        (lambda c: c.update(rms_norm_eps=float("nan")), r"rms_norm_eps: expected a number in \(0, 1\), got NaN"),
        (lambda c: c.update(rms_norm_eps=float("inf")), r"rms_norm_eps: expected a number in \(0, 1\), got Infinity"),
        (lambda c: c.update(rms_norm_eps=-1e-5), r"rms_norm_eps: expected a number in \(0, 1\), got -1e-05"),
        (lambda c: c.update(rms_norm_eps=0), r"rms_norm_eps: expected a number in \(0, 1\), got 0"),
        (lambda c: c.update(rms_norm_eps=True), r"rms_norm_eps: expected a number in \(0, 1\), got true"),
        (lambda c: c.update(rms_norm_eps=int("1" * 400)), r"rms_norm_eps: expected a number in \(0, 1\), got 1111"),
        (lambda c: c.update(rope_theta=float("inf")), r"rope_theta: expected a positive finite number, got Infinity"),
        (lambda c: c.update(hidden_size=True), r"hidden_size: expected an integer in \[1, \d+\], got true"),
        (lambda c: c.update(hidden_size=4096.0), r"hidden_size: expected an integer in \[1, \d+\], got 4096.0"),
        (lambda c: c.update(vocab_size=0), r"vocab_size: expected an integer in \[1, \d+\], got 0"),
        (
            lambda c: c.update(intermediate_size="14336"),
            r'intermediate_size: expected an integer in \[1, \d+\], got "14336"',
        ),
        (
            lambda c: c.update(num_key_value_heads=True),
            r"num_key_value_heads: expected an integer in \[1, \d+\], got true",
        ),
        (lambda c: c.update(head_dim=0), r"head_dim: expected an integer in \[1, \d+\], got 0"),
        (lambda c: c.update(torch_dtype="int8"), r'torch_dtype: expected one of "bfloat16", .*, got "int8"'),
        (lambda c: c.update(torch_dtype=16), r'torch_dtype: expected one of "bfloat16", .*, got 16'),
        (
            lambda c: c.update(rope_parameters="llama3", rope_scaling=None),
            r'rope_parameters: expected an object or null, got "llama3"',
        ),
    ],
)
def test_wrongly_typed_llama_fields(tmp_path: Path, mutate, message: str) -> None:
    cfg = _llama_dict()
    mutate(cfg)
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        ArchConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert str(path) not in str(err.value)[len(f"{path}: ") :]  # the file named once


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"factor": None}, r"rope_scaling\.factor: missing \(expected a finite number >= 1\)"),
        ({"factor": "8.0"}, r'rope_scaling\.factor: expected a finite number >= 1, got "8.0"'),
        ({"factor": float("nan")}, r"rope_scaling\.factor: expected a finite number >= 1, got NaN"),
        ({"factor": 0}, r"rope_scaling\.factor: expected a finite number >= 1, got 0"),
        ({"low_freq_factor": [1]}, r"rope_scaling\.low_freq_factor: expected a positive finite number, got \[1\]"),
        ({"high_freq_factor": 1.0}, r"rope_scaling\.high_freq_factor: expected a finite number above low_freq_factor"),
        (
            {"original_max_position_embeddings": 8192.0},
            r"rope_scaling\.original_max_position_embeddings: expected an integer in \[1, \d+\], got 8192.0",
        ),
        ({"rope_type": None, "type": None}, r"rope_scaling type None is not supported"),
    ],
)
def test_wrongly_typed_rope_scaling(tmp_path: Path, scaling: dict, message: str) -> None:
    cfg = _llama_dict()
    cfg["rope_scaling"].update(scaling)
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        ArchConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: ")


def test_rope_parameters_of_transformers_5_are_checked_too(tmp_path: Path) -> None:
    cfg = _llama_dict()
    scaling = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    del cfg["rope_theta"]
    assert ArchConfig.from_json(_write(tmp_path, cfg)).rope == ArchConfig.from_json(CONFIGS / "llama-3.1-8b.json").rope
    cfg["rope_parameters"]["rope_theta"] = "5e5"
    with pytest.raises(ConfigError, match=r'rope_parameters\.rope_theta: expected a positive finite number, got "5e5"'):
        ArchConfig.from_json(_write(tmp_path, cfg))


# The sanity bounds sit far above every published model (all of configs/ loads, test_shared_config_counts)
# and refuse what would exhaust memory before a weight is read.
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(num_hidden_layers=10**12), r"num_hidden_layers: expected an integer in \[1, 16384\]"),
        (
            lambda c: c.update(max_position_embeddings=2**40),
            r"max_position_embeddings: expected an integer in \[1, 16777216\]",
        ),
        (lambda c: c.update(hidden_size=2**40), r"hidden_size: expected an integer in \[1, 16777216\]"),
        (lambda c: c.update(vocab_size=2**40), r"vocab_size: expected an integer in \[1, 16777216\]"),
        (lambda c: c.update(intermediate_size=2**40), r"intermediate_size: expected an integer in \[1, 16777216\]"),
    ],
)
def test_absurd_sizes_are_refused(tmp_path: Path, mutate, message: str) -> None:
    cfg = _llama_dict()
    mutate(cfg)
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        ArchConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("layer", "mutate", "message"),
    [
        (
            3,
            lambda b: b["attention"].update(no_op="false"),
            r'block_configs\[3\]\.attention\.no_op: expected true or false, got "false"',
        ),
        (
            2,
            lambda b: b["attention"].update(replace_with_linear=1),
            r"block_configs\[2\]\.attention\.replace_with_linear: expected true or false, got 1",
        ),
        (
            0,
            lambda b: b["ffn"].update(no_op="true"),
            r'block_configs\[0\]\.ffn\.no_op: expected true or false, got "true"',
        ),
        (
            3,
            lambda b: b["ffn"].update(replace_with_linear="yes"),
            r'block_configs\[3\]\.ffn\.replace_with_linear: expected true or false, got "yes"',
        ),
        (
            0,
            lambda b: b["attention"].update(n_heads_in_group=True),
            r"block_configs\[0\]\.attention\.n_heads_in_group: expected an integer in \[1, \d+\], got true",
        ),
        (
            0,
            lambda b: b["ffn"].update(intermediate_size=256.0),
            r"block_configs\[0\]\.ffn\.intermediate_size: expected an integer in \[1, \d+\], got 256.0",
        ),
        (
            0,
            lambda b: b["ffn"].update(ffn_mult="6.0"),
            r'block_configs\[0\]\.ffn\.ffn_mult: expected a positive finite number, got "6.0"',
        ),
        (
            0,
            lambda b: b["ffn"].update(ffn_mult=1e308),
            r"block_configs\[0\]\.ffn\.ffn_mult: expected a multiplier giving an FFN width in \[1, 16777216\], "
            r"got 1e\+308",
        ),
        (
            0,
            lambda b: b["ffn"].update(ffn_mult=1e-9),
            r"block_configs\[0\]\.ffn\.ffn_mult: expected a multiplier giving an FFN width in \[1, 16777216\], "
            r"got 1e-09",
        ),
        (
            2,
            lambda b: b["attention"].update(unshifted_sink=0),
            r"block_configs\[2\]\.attention\.unshifted_sink=0 asks for",
        ),
        (
            2,
            lambda b: b["attention"].update(num_sink_tokens=False),
            r"block_configs\[2\]\.attention\.num_sink_tokens=False asks for",
        ),
    ],
)
def test_wrongly_typed_nas_block_fields(tmp_path: Path, layer: int, mutate, message: str) -> None:
    cfg = nas_config()
    mutate(cfg["block_configs"][layer])
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=message) as err:
        ArchConfig.from_json(path)
    assert str(err.value).startswith(f"{path}: ")


def test_unknown_block_fields_are_refused_not_ignored(tmp_path: Path) -> None:
    """A block key other than attention and ffn (Puzzle's parallel_blocks, anything else) would change the model:
    read as the plain block, `info` and the search worked on the wrong architecture. Null or empty is neutral."""
    cfg = nas_config()
    cfg["block_configs"][0]["parallel_blocks"] = None
    cfg["block_configs"][1]["parallel_blocks"] = []
    assert ArchConfig.from_json(_write(tmp_path, cfg)) == ArchConfig.from_json(_write(tmp_path, nas_config()))
    cfg["block_configs"][1]["parallel_blocks"] = [{"attention": {"no_op": True}, "ffn": {"no_op": True}}]
    with pytest.raises(ConfigError, match=r"block_configs\[1\]\.parallel_blocks=.* asks for something tessera"):
        ArchConfig.from_json(_write(tmp_path, cfg))
    cfg = nas_config()
    cfg["block_configs"][0]["moe_router"] = {"experts": 8}
    with pytest.raises(ConfigError, match=r"block_configs\[0\]\.moe_router is not a field tessera knows"):
        ArchConfig.from_json(_write(tmp_path, cfg))


def test_null_bool_is_false_and_null_sizes_take_defaults(tmp_path: Path) -> None:
    """JSON null means "the default" throughout Hugging Face configs (num_key_value_heads: null in nemotron-nas)."""
    cfg = nas_config()
    cfg["block_configs"][0]["attention"]["no_op"] = None
    cfg.update(tie_word_embeddings=None, bos_token_id=None, pad_token_id=None, eos_token_id=[])
    arch = ArchConfig.from_json(_write(tmp_path, cfg))
    assert arch.blocks[0].attention.kind == "gqa" and not arch.tie_embeddings
    assert arch.bos_token_id is None and arch.eos_token_ids == ()


def test_generation_config_adds_its_end_of_turn_tokens(tmp_path: Path) -> None:
    """An instruct checkpoint lists its end-of-turn token only in generation_config.json (Llama-3-Instruct's
    <|eot_id|> beside config.json's <|end_of_text|>): a reply must stop at it, as transformers' generate does.
    Its ids join config.json's, each once; a bad one is named in that file."""
    cfg = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    cfg["eos_token_id"] = 128001
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ArchConfig.from_json(tmp_path).eos_token_ids == (128001,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009, 128009]}))
    assert ArchConfig.from_json(tmp_path).eos_token_ids == (128001, 128008, 128009)
    assert ArchConfig.from_json(tmp_path / "config.json").eos_token_ids == (128001, 128008, 128009)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 128009, "temperature": 0.6}))
    assert ArchConfig.from_json(tmp_path).eos_token_ids == (128001, 128009)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, "x"]}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id\[1\]: expected a token id"):
        ArchConfig.from_json(tmp_path)
    (tmp_path / "generation_config.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"generation_config.json: expected a JSON object"):
        ArchConfig.from_json(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json today
        '{"vocab_size": ' + "9" * 5000 + "}",  # past Python's int-string limit: a ValueError, not JSONDecodeError
        "\udcff",  # not UTF-8
    ],
)
def test_hostile_json_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        ArchConfig.from_json(path)


def test_float64_checkpoints_have_costs(tmp_path: Path) -> None:
    """`tessera info` reads summary(): a float64 checkpoint (which `generate` loads) must have a byte count."""
    cfg = _llama_dict()
    cfg["torch_dtype"] = "float64"
    arch = ArchConfig.from_json(_write(tmp_path, cfg))
    assert arch.summary()["weight_bytes"] == 8 * arch.num_params()


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "old\n")
    atomic_write_bytes(target, b"new\n")
    assert target.read_text() == "new\n"

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "newer\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_an_atomic_write_through_a_link_replaces_the_file_it_names(tmp_path: Path) -> None:
    """`calibrate --out link.json`: the link stays a link and its target gets the text (a plain rename put a
    regular file in the link's place and left the target stale)."""
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    atomic_write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_save_json_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """config.json is written beside and renamed into place (atomic_write_text)."""
    arch = ArchConfig.from_json(CONFIGS / "llama-3.1-8b.json")
    calls = []
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append((Path(src).parent, Path(dst))))
    arch.save_json(tmp_path / "config.json")
    assert calls == [(tmp_path, tmp_path / "config.json")]


@pytest.mark.parametrize("first", ["tessera.hf_config", "tessera.config"])
def test_formats_module_imports_without_a_cycle(first: str) -> None:
    """The formats (tessera/hf_config.py) build the architecture classes and the classes' methods call the
    formats: either module imported first in a fresh interpreter must still read a config."""
    path = CONFIGS / "llama-3.1-8b.json"
    code = f"import {first}; from tessera.config import ArchConfig; print(ArchConfig.from_json({str(path)!r}).n_layers)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "32\n", result.stderr


def test_methods_are_the_formats_module(tmp_path: Path) -> None:
    arch = ArchConfig.from_json(CONFIGS / "llama-3_1-nemotron-51b-instruct.json")
    assert hf_config.load(CONFIGS / "llama-3_1-nemotron-51b-instruct.json") == arch
    assert hf_config.to_dict(arch) == arch.to_hf_dict()
    hf_config.save(arch, tmp_path / "config.json", fmt="nemotron-nas")
    assert ArchConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text())) == arch


def _rank_shape(name: str, shape: tuple[int, ...], tp: int, head_dim: int) -> tuple[int, ...]:
    """A tensor's shard on one rank, from its Hugging Face name (written out independently of config.py's
    formulas): column-parallel (output rows split) for q/k/v, gate/up and the vocabulary matrices, K/V rows
    replicated a head per rank when there are fewer heads than ranks; row-parallel (input columns split) for
    o, down and the linear replacements; norms whole."""
    if name.endswith(("k_proj.weight", "v_proj.weight")) and shape[0] // head_dim < tp:
        return (head_dim, *shape[1:])
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")) or (
        name.endswith(("embed_tokens.weight", "lm_head.weight"))
    ):
        return (-(-shape[0] // tp), *shape[1:])
    if name.endswith(("o_proj.weight", "down_proj.weight", "linear_attn.weight", "linear_mlp.weight")):
        return (shape[0], -(-shape[1] // tp))
    assert name.endswith("norm.weight"), name
    return shape


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_rank_memory_equals_the_shards_of_every_tensor(name: str, tp: int) -> None:
    """`tessera info --tensor-parallel-size`: a rank's parameters are the sum of its shard of every tensor of the
    checkpoint (Nemotron-51B's 1-, 2- and 4-KV-head layers replicated at 8 ranks, Ultra-253B's fused FFNs split),
    and one rank holds the whole model at tp 1."""
    from math import prod

    from tessera.runtime.weights import hf_weight_shapes

    arch = ArchConfig.from_json(CONFIGS / name)
    shards = {n: _rank_shape(n, s, tp, arch.head_dim) for n, s in hf_weight_shapes(arch).items()}
    summary = arch.tensor_parallel_summary(tp)
    assert summary["rank_num_params"] == sum(prod(s) for s in shards.values())
    kv = sum(s[0] for n, s in shards.items() if n.endswith("k_proj.weight"))
    assert summary["rank_kv_bytes_per_token"] == 2 * kv * 2  # K and V rows, bf16
    assert summary["rank_weight_bytes"] == 2 * summary["rank_num_params"]  # bf16
    # FP8: the layers' tensors at one byte, the embedding, head and final norm at two, and the rank's rows of the
    # head's FP8 copy at a byte a weight and an fp32 scale a row.
    model_wide = sum(prod(s) for n, s in shards.items() if not n.startswith("model.layers."))
    rows = shards["model.embed_tokens.weight"][0]
    head_copy = rows * (arch.hidden_size + 4)
    assert arch.rank_weight_bytes(tp, "float8_e4m3fn") == summary["rank_num_params"] + model_wide + head_copy
    if tp == 1:
        assert summary["rank_num_params"] == arch.num_params()
        assert arch.rank_weight_bytes(1, "float8_e4m3fn") == arch.weight_bytes("float8_e4m3fn")


def test_tensor_parallel_info_on_ultra_and_its_errors(capsys, tmp_path: Path) -> None:
    from tessera.cli import main

    assert main(
        ["info", "--model", str(CONFIGS / "llama-3_1-nemotron-ultra-253b-v1.json"), "--tensor-parallel-size", "8"]
    ) in (0, None)
    out = capsys.readouterr().out
    assert "tensor parallel over 8 ranks, per rank: 31,677,251,584 parameters" in out
    assert "GiB of weights (bfloat16)" in out
    fp8 = json.loads((CONFIGS / "llama-3.1-70b.json").read_text()) | {
        "quantization_config": hf_config.quantization_config()
    }
    main(["info", "--model", str(_write(tmp_path, fp8)), "--tensor-parallel-size", "8"])
    out = capsys.readouterr().out  # the per-rank bytes are FP8's, and said to be
    per_rank = ArchConfig.from_json(_write(tmp_path, fp8)).rank_weight_bytes(8) / 2**30
    assert f"{per_rank:.2f} GiB of weights (float8_e4m3fn projections and LM head copy" in out
    with pytest.raises(SystemExit) as e:
        main(["info", "--model", str(CONFIGS / "llama-3.1-70b.json"), "--tensor-parallel-size", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "llama-3.1-70b.json: --tensor-parallel-size: tensor parallel size 3" in err and err.count("\n") == 1
    # Shares are the larger ones first: a width of 7 over 6 ranks is 2, 2, 2, 1, 0, 0, and a rank with none of it
    # failed as it built its shard (on that rank alone); refused up front, by name.
    narrow = BlockConfig(AttentionConfig("gqa", 6), FFNConfig("swiglu", 7))
    arch = ArchConfig(vocab_size=103, hidden_size=48, n_heads=12, head_dim=4, blocks=(narrow,))
    arch.check_tensor_parallel(3)
    with pytest.raises(ConfigError, match="layer 0's FFN width 7 over 6 ranks in shares of 2 leaves the last rank"):
        arch.check_tensor_parallel(6)
    three = BlockConfig(AttentionConfig("gqa", 3), FFNConfig("swiglu", 64))  # 12 heads split in 2, 3 KV heads not
    arch = ArchConfig(vocab_size=10, hidden_size=48, n_heads=12, head_dim=4, blocks=(three,))
    with pytest.raises(ConfigError, match=r"layer 0: 3 KV heads cannot be split over 2 ranks"):
        arch.check_tensor_parallel(2)
