"""Hugging Face config.json: reading and writing the formats tessera serves and produces.

- The families' own formats, every layer the same: `LlamaForCausalLM`, `Qwen2ForCausalLM` (q/k/v biases,
  optional sliding windows per `layer_types`), `Qwen3ForCausalLM` (per-head q/k RMSNorm, `head_dim` of its
  own) and `MistralForCausalLM` (one `sliding_window` for every layer, or null).
- `nemotron-nas` / `DeciLMForCausalLM`: a Llama-family model with per-layer `block_configs`, as in NVIDIA's
  Puzzle models (`n_kv_heads = n_heads // n_heads_in_group`, `intermediate_size = find_multiple(int(2 *
  ffn_mult * hidden / 3), 256)`, `window_length` for a windowed layer).
- tessera's own format: a family's config.json plus the same `block_configs` (any family; what a Qwen or
  Mistral child is saved as, since no other runtime has a heterogeneous format for them).
The architecture they describe and its cost formulas are tessera/config.py; `ArchConfig.from_json`,
`.from_hf_dict`, `.to_hf_dict` and `.save_json` call this module.

config.json is an input boundary (STYLE 14): the readers check every field they read for type and range
(a JSON "false" is a true string, and Python's bool is an int) and refuse sizes beyond generous sanity bounds,
with a one-line `ConfigError` naming the file and field. Unknown per-layer keys are accepted only at their
neutral value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from tessera.config import (
    DTYPE_BYTES,
    ArchConfig,
    AttentionConfig,
    BlockConfig,
    ConfigError,
    FFNConfig,
    RopeConfig,
    ffn_mult_to_intermediate_size,
    json_excerpt,
    read_json,
)
from tessera.files import atomic_write_text

# "family": the parent family's own format (every layer the same); "nemotron-nas": per-layer blocks of a
# Llama-family model; "tessera": the family's format plus per-layer block_configs; "auto": the first of these
# that expresses the architecture.
Format = Literal["auto", "family", "nemotron-nas", "tessera"]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
MODEL_TYPES = (*ARCHITECTURES, "nemotron-nas")
_LAYER_TYPES = ("full_attention", "sliding_attention")
# max_position_embeddings when a config leaves it out: each family's config class default in transformers
# (LlamaConfig's, which nemotron-nas's DeciLMConfig inherits, is 2048): the same config.json, the same model.
_DEFAULT_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "mistral": 131072}

# Per-layer keys of nemotron-nas block_configs that the runtime accepts only at their neutral value.
_NEUTRAL_ATTENTION_KEYS = {
    "sparsify": (None, [], False),
    "num_sink_tokens": (None, 0),
    "unshifted_sink": (False, None),
    "use_prefill_window_in_sink_attention": (False, None),
    "llama4": (None,),
    "mamba": (None,),
}
_NEUTRAL_FFN_KEYS = {"sparsify": (None, [], False), "moe": (None,), "no_op_moe": (None,)}

# Sanity bounds on config.json sizes: far above any published model, so only a corrupt or hostile file trips
# them, and low enough that nothing sized from the config exhausts memory before a weight is read.
_MAX_LAYERS = 2**14  # 100x Ultra-253B's 162 layers (`(block,) * 10**12` is a MemoryError)
# Any width, head count or vocabulary: 39x Ultra-253B's widest fused FFN (425,984), 64x the largest
# vocabularies (256k).
_MAX_DIM = 2**24
# 128x Llama-3.1's 131,072 and 4x the longest Llama-architecture checkpoints (Gradient's 4,194,304-token
# Llama-3-8B). Nothing is allocated in proportion to it: rotary angles are computed from each step's positions
# and the engine's default KV pool is capped by the memory there is.
_MAX_POSITIONS = 2**24


def load(path: str | Path) -> ArchConfig:
    """The architecture in a config.json, or in the config.json of a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = read_json(path, "a Hugging Face config.json", ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    arch = parse(cfg, str(path))
    return replace(arch, eos_token_ids=arch.eos_token_ids + _generation_eos(path.parent, arch))


def _generation_eos(folder: Path, arch: ArchConfig) -> tuple[int, ...]:
    """End-of-sequence ids that generation_config.json adds to config.json's: an instruct checkpoint lists its
    end-of-turn token there (Llama-3-Instruct's <|eot_id|>), and a reply must stop at it, as transformers and vLLM
    stop. Only type-checked otherwise: tessera reads no other generation default."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    cfg = read_json(path, "a Hugging Face generation_config.json", ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return tuple(i for i in dict.fromkeys(_eos_ids(cfg, str(path), arch.vocab_size)) if i not in arch.eos_token_ids)


def _bad(source: str, name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: {name}: expected {expected}, got {json_excerpt(value)}")


def _missing(source: str, name: str, expected: str) -> ConfigError:
    return ConfigError(f"{source}: {name}: missing (expected {expected})")


# The typed field readers. JSON null means "not set" throughout Hugging Face configs (nemotron-nas writes
# num_key_value_heads: null), so null and absent both give the default, or a "missing" error without one.


def _get(section: dict[str, Any], key: str, source: str, kind: type, default: Any = ..., name: str = "") -> Any:
    """A list or object field."""
    name, expected = name or key, {list: "a list", dict: "an object"}[kind]
    value = section.get(key)
    if value is None:
        if default is ...:
            raise _missing(source, name, expected)
        return default
    if not isinstance(value, kind):
        raise _bad(source, name, expected if default is ... else f"{expected} or null", value)
    return value


def _int(
    section: dict[str, Any],
    key: str,
    source: str,
    default: Any = ...,
    lo: int = 1,
    hi: int = _MAX_DIM,
    name: str = "",
    expected: str = "",
) -> Any:
    """An integer field in [lo, hi]."""
    name, expected = name or key, expected or f"an integer in [{lo}, {hi}]"
    value = section.get(key)
    if value is None:
        if default is ...:
            raise _missing(source, name, expected)
        return default
    if type(value) is not int or not lo <= value <= hi:  # type(), not isinstance: true is an int to Python
        raise _bad(source, name, expected, value)
    return value


def _float(
    section: dict[str, Any],
    key: str,
    source: str,
    default: Any = ...,
    ok: Callable[[float], bool] = lambda x: x > 0,
    expected: str = "a positive finite number",
    name: str = "",
) -> Any:
    """A finite number field (a JSON integer is a number too) for which `ok` holds."""
    name = name or key
    value = section.get(key)
    if value is None:
        if default is ...:
            raise _missing(source, name, expected)
        return default
    number = _as_float(value)
    if number is None or not ok(number):
        raise _bad(source, name, expected, value)
    return number


def _as_float(value: Any) -> float | None:
    """A JSON number as a finite float; None for anything else (a bool, a string, NaN, inf, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _bool(section: dict[str, Any], key: str, source: str, name: str = "") -> bool:
    """A boolean field, false when absent or null. Only JSON true/false: "false" and 0 are refused."""
    value = section.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise _bad(source, name or key, "true or false", value)
    return value


def _token_id(value: Any, source: str, name: str, vocab_size: int) -> int:
    if type(value) is not int or not 0 <= value < vocab_size:
        raise _bad(source, name, f"a token id in [0, {vocab_size})", value)
    return value


def _eos_ids(cfg: dict[str, Any], source: str, vocab_size: int) -> tuple[int, ...]:
    """eos_token_id: one token id, a list of them, or null."""
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        return tuple(_token_id(e, source, f"eos_token_id[{j}]", vocab_size) for j, e in enumerate(eos))
    return () if eos is None else (_token_id(eos, source, "eos_token_id", vocab_size),)


def _read_rope(cfg: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (theta inside); older files "rope_theta" + "rope_scaling".
    params = _get(cfg, "rope_parameters", source, dict, {})
    scaling = _get(cfg, "rope_scaling", source, dict, {})
    section = "rope_scaling" if scaling else "rope_parameters"
    scaling = scaling or params
    if cfg.get("rope_theta") is not None:
        theta = _float(cfg, "rope_theta", source)
    else:
        theta = _float(params, "rope_theta", source, 10000.0, name="rope_parameters.rope_theta")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "llama3":
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (expected 'llama3' or none)")
    low = _float(scaling, "low_freq_factor", source, name=f"{section}.low_freq_factor")
    return RopeConfig(
        theta=theta,
        # Llama 3 divides low frequencies by `factor` to stretch the context: below 1 it would shrink it.
        factor=_float(
            scaling, "factor", source, ok=lambda x: x >= 1, expected="a finite number >= 1", name=f"{section}.factor"
        ),
        low_freq_factor=low,
        # The smoothing between the two bands divides by high - low.
        high_freq_factor=_float(
            scaling,
            "high_freq_factor",
            source,
            ok=lambda x: x > low,
            expected=f"a finite number above low_freq_factor ({low})",
            name=f"{section}.high_freq_factor",
        ),
        original_max_position_embeddings=_int(
            scaling,
            "original_max_position_embeddings",
            source,
            hi=_MAX_POSITIONS,
            name=f"{section}.original_max_position_embeddings",
        ),
    )


def _read_dtype(cfg: dict[str, Any], source: str) -> str:
    key = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"  # transformers >= 5 writes "dtype"
    value = cfg.get(key)
    if value is None:
        return "bfloat16"
    if not isinstance(value, str) or value not in DTYPE_BYTES:
        raise _bad(source, key, "one of " + ", ".join(json.dumps(d) for d in sorted(DTYPE_BYTES)), value)
    return value


# The one quantized layout tessera reads and writes: compressed-tensors "FP8 dynamic" (llm-compressor's scheme, read
# by vLLM and SGLang): E4M3 weights with one scale per output channel (`<name>.weight_scale`, [N, 1]), activations
# quantized per token at run time, the LM head (and embeddings, norms) left in `torch_dtype` (kernels/fp8.py).
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
FP8_ACTIVATIONS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}


# Static per-tensor FP8 KV-cache scales, one K and one V scale per attention layer (`self_attn.k_scale`,
# `self_attn.v_scale`, [1] fp32): compressed-tensors' kv_cache_scheme, as llm-compressor writes it and vLLM reads it.
FP8_KV_CACHE = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}


def quantization_config(weights: bool = True, kv_cache: bool = False) -> dict[str, Any]:
    """config.json's "quantization_config" for a checkpoint written by tessera: FP8 weights, FP8 KV-cache scales,
    or both."""
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": ["lm_head"],
    }
    if weights:
        config["config_groups"]["group_0"] = {
            "targets": ["Linear"],
            "weights": dict(FP8_WEIGHTS),  # copies: a caller editing its config must not change the scheme
            "input_activations": dict(FP8_ACTIVATIONS),
        }
    if kv_cache:
        config["kv_cache_scheme"] = dict(FP8_KV_CACHE)
    return config


def _read_quantization(cfg: dict[str, Any], source: str) -> tuple[str | None, bool]:
    """(weights, kv_cache_scales): weights "fp8" for a compressed-tensors checkpoint with FP8 per-channel weight
    scales, None for none; whether it holds static per-tensor FP8 KV-cache scales. Any other quantization is
    refused by name (its tensors would load as garbage)."""
    q = cfg.get("quantization_config")
    if q is None:
        return None, False
    expected = (
        "null, or compressed-tensors FP8 with per-channel weights and dynamic per-token activations "
        '(weights {"type": "float", "num_bits": 8, "strategy": "channel"}, "ignore": ["lm_head"]) and/or '
        f"kv_cache_scheme {json.dumps(FP8_KV_CACHE)}"
    )
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        raise _bad(source, "quantization_config", expected, q)
    kv = q.get("kv_cache_scheme")
    # Static and symmetric too: a dynamic or asymmetric scheme has no (or other) scale tensors to load. Only those two
    # may be left out (compressed-tensors' defaults are static, symmetric); a missing type means int there.
    if kv is not None and (
        not isinstance(kv, dict)
        or any(k not in kv for k in ("num_bits", "type", "strategy"))
        or any(kv.get(k, FP8_KV_CACHE[k]) != v for k, v in FP8_KV_CACHE.items())
    ):
        raise _bad(source, "quantization_config.kv_cache_scheme", json.dumps(FP8_KV_CACHE), kv)
    groups = q.get("config_groups")
    if kv is not None and not groups:  # the KV cache's scales alone
        return None, True
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _bad(source, "quantization_config.config_groups", "one group (every Linear layer alike)", groups)
    (group,) = groups.values()
    weights = group.get("weights") if isinstance(group, dict) else None
    # num_bits, type and strategy must be given; symmetric and dynamic may take compressed-tensors' defaults
    # (symmetric, static): an asymmetric scheme has zero points, a dynamic one no stored scales.
    keys = ("num_bits", "type", "strategy")
    if (
        not isinstance(weights, dict)
        or any(weights.get(k) != FP8_WEIGHTS[k] for k in keys)
        or any(weights.get(k, FP8_WEIGHTS[k]) != FP8_WEIGHTS[k] for k in ("symmetric", "dynamic"))
    ):
        raise _bad(source, "quantization_config.config_groups weights", json.dumps(FP8_WEIGHTS), weights)
    # Activations are quantized at run time, per token (finer than a dynamic per-tensor scheme asks, the same
    # arithmetic otherwise); static activations would come with input_scale tensors tessera does not apply, and
    # none at all (weight-only FP8, W8A16) asks for bf16 activations, which tessera's FP8 GEMMs do not compute.
    acts = group.get("input_activations")
    if (
        not isinstance(acts, dict)
        or acts.get("type") != "float"
        or acts.get("num_bits") != 8
        or acts.get("dynamic") is not True
        or acts.get("strategy") not in ("token", "tensor")
        or acts.get("symmetric", True) is not True
    ):
        raise _bad(
            source,
            "quantization_config.config_groups input_activations",
            "dynamic symmetric 8-bit float activations, per token or per tensor",
            acts,
        )
    ignore = q.get("ignore", [])
    if (
        not isinstance(ignore, list)
        or not ignore
        or not all(isinstance(n, str) and n.split(".")[-1] == "lm_head" for n in ignore)
    ):
        raise _bad(source, "quantization_config.ignore", '["lm_head"] (every other Linear quantized)', ignore)
    if q.get("sparsity_config"):
        raise _bad(source, "quantization_config.sparsity_config", "null (dense weights)", q["sparsity_config"])
    return "fp8", kv is not None


def parse(cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
    """The architecture a parsed config.json describes; `source` names it in error messages."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: no model_type (expected one of " + ", ".join(map(repr, MODEL_TYPES)) + ")")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {json_excerpt(model_type)} is not supported (expected one of "
            + ", ".join(repr(t) for t in MODEL_TYPES)
            + ")"
        )
    family = "llama" if model_type == "nemotron-nas" else model_type
    # Qwen2 puts biases on q/k/v whatever attention_bias says (its modeling has no such switch); elsewhere
    # attention_bias would add biases tessera's blocks do not have (Qwen3's and Llama's on o_proj too).
    for key in ("mlp_bias",) if family == "qwen2" else ("attention_bias", "mlp_bias"):
        if _bool(cfg, key, source):
            raise ConfigError(f"{source}: field {key!r} is true; tessera's {family} blocks have no such biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu' for SwiGLU)")

    hidden = _int(cfg, "hidden_size", source)
    n_heads = _int(cfg, "num_attention_heads", source)
    n_layers = _int(cfg, "num_hidden_layers", source, hi=_MAX_LAYERS)
    # Qwen3Config's head_dim defaults to 128, not hidden / heads.
    default_head_dim = 128 if family == "qwen3" else hidden // n_heads
    if hidden % n_heads and cfg.get("head_dim") is None and family != "qwen3":
        raise ConfigError(f"{source}: num_attention_heads={n_heads} does not divide hidden_size={hidden}")
    head_dim = _int(cfg, "head_dim", source, default_head_dim)
    vocab_size = _int(cfg, "vocab_size", source)

    if cfg.get("block_configs") is not None or model_type == "nemotron-nas":
        raw = _get(cfg, "block_configs", source, list)
        if len(raw) != n_layers:
            raise ConfigError(f"{source}: block_configs has {len(raw)} entries but num_hidden_layers is {n_layers}")
        blocks = tuple(_nas_block(b, i, hidden, n_heads, source) for i, b in enumerate(raw))
    else:
        n_kv = _int(cfg, "num_key_value_heads", source, n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
        width = _int(cfg, "intermediate_size", source)
        blocks = tuple(
            BlockConfig(AttentionConfig("gqa", n_kv, window=w), FFNConfig("swiglu", width))
            for w in _read_windows(cfg, family, n_layers, source)
        )

    bos = cfg.get("bos_token_id")
    eos_ids = _eos_ids(cfg, source, vocab_size)
    # Not used by tessera, only type-checked; old Llama conversions write -1 for "none".
    _int(cfg, "pad_token_id", source, None, lo=-1, expected=f"an integer in [-1, {_MAX_DIM}] or null")
    quantization, kv_cache_scales = _read_quantization(cfg, source)
    try:
        return ArchConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            n_heads=n_heads,
            head_dim=head_dim,
            blocks=blocks,
            rope=_read_rope(cfg, source),
            rms_norm_eps=_float(
                cfg,
                "rms_norm_eps",
                source,
                1e-6,  # every family's config class default in transformers, LlamaConfig's included
                ok=lambda x: 0 < x < 1,
                expected="a number in (0, 1)",
            ),
            tie_embeddings=_bool(cfg, "tie_word_embeddings", source),
            max_position_embeddings=_int(
                cfg, "max_position_embeddings", source, _DEFAULT_POSITIONS[family], hi=_MAX_POSITIONS
            ),
            bos_token_id=None if bos is None else _token_id(bos, source, "bos_token_id", vocab_size),
            eos_token_ids=eos_ids,
            dtype=_read_dtype(cfg, source),
            fusion_spans=_read_fusion_spans(cfg, source),
            family=family,
            quantization=quantization,
            kv_cache_scales=kv_cache_scales,
        )
    except ConfigError as e:  # ArchConfig's own checks name no file; the field readers above already do
        message = str(e)
        raise ConfigError(message if message.startswith(f"{source}: ") else f"{source}: {message}") from None


def _read_windows(cfg: dict[str, Any], family: str, n_layers: int, source: str) -> list[int | None]:
    """Each layer's attention window, as the family's modeling in transformers reads it: Mistral one
    `sliding_window` for every layer (4096 when the key is absent, none when null); Qwen2/Qwen3 a window only
    with `use_sliding_window`, on the layers `layer_types` calls "sliding_attention" (without the list, those
    from `max_window_layers` on); Llama none."""
    if family == "llama":
        return [None] * n_layers
    if family == "mistral":
        window = None if "sliding_window" in cfg and cfg["sliding_window"] is None else _window(cfg, source)
        return [window] * n_layers
    # As Qwen's config classes: a window only with use_sliding_window, and none when sliding_window is null.
    null = "sliding_window" in cfg and cfg["sliding_window"] is None
    window = _window(cfg, source) if _bool(cfg, "use_sliding_window", source) and not null else None
    types = _get(cfg, "layer_types", source, list, None)
    if types is None:
        first = _int(cfg, "max_window_layers", source, 28, lo=0, hi=_MAX_LAYERS)
        return [window if i >= first else None for i in range(n_layers)]
    if len(types) != n_layers:
        raise ConfigError(f"{source}: layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
    for i, kind in enumerate(types):
        if kind not in _LAYER_TYPES:
            raise _bad(source, f"layer_types[{i}]", " or ".join(repr(t) for t in _LAYER_TYPES), kind)
    return [window if kind == "sliding_attention" else None for kind in types]


def _window(cfg: dict[str, Any], source: str) -> int:
    return _int(cfg, "sliding_window", source, 4096, hi=_MAX_POSITIONS)


def _read_fusion_spans(cfg: dict[str, Any], source: str) -> tuple[tuple[int, int], ...] | None:
    raw = _get(cfg, "ffn_fusion_spans", source, list, None)
    if raw is None:  # no record: ArchConfig.fused_ffn_spans reads the layout
        return None
    for span in raw:
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            raise ConfigError(f"{source}: ffn_fusion_spans entry {span!r}, expected [first_layer, last_layer]")
    return tuple((first, last) for first, last in raw)


def _nas_block(raw: Any, i: int, hidden: int, n_heads: int, source: str) -> BlockConfig:
    where = f"{source}: block_configs[{i}]"
    a, f = f"block_configs[{i}].attention", f"block_configs[{i}].ffn"
    if not isinstance(raw, dict) or not isinstance(raw.get("attention"), dict) or not isinstance(raw.get("ffn"), dict):
        raise ConfigError(f"{where}: expected an object with 'attention' and 'ffn' objects")
    att, ffn = raw["attention"], raw["ffn"]
    # Puzzle's BlockConfig has more (parallel_blocks: sublayers run side by side); set, any would change the
    # model, so it is refused rather than read as the plain block.
    _check_neutral(raw, {"parallel_blocks": (None, [])}, {"attention", "ffn"}, where)
    _check_neutral(
        att,
        _NEUTRAL_ATTENTION_KEYS,
        {"n_heads_in_group", "no_op", "replace_with_linear", "window_length"},
        f"{where}.attention",
    )
    _check_neutral(
        ffn, _NEUTRAL_FFN_KEYS, {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear"}, f"{where}.ffn"
    )

    replaced = _replaced_by(att, source, a, f"{where}.attention")
    window = _int(att, "window_length", source, None, hi=_MAX_POSITIONS, name=f"{a}.window_length")
    if replaced:
        if window is not None:
            raise ConfigError(f"{where}.attention: window_length {window} on an attention that is replaced")
        attention = AttentionConfig(replaced)
    else:
        group = _int(att, "n_heads_in_group", source, name=f"{a}.n_heads_in_group")
        if n_heads % group:
            raise ConfigError(
                f"{where}.attention.n_heads_in_group={group} does not divide num_attention_heads={n_heads}"
            )
        attention = AttentionConfig("gqa", n_heads // group, window=window)

    replaced = _replaced_by(ffn, source, f, f"{where}.ffn")
    if replaced:
        ffn_cfg = FFNConfig(replaced)
    elif ffn.get("intermediate_size") is not None:
        ffn_cfg = FFNConfig("swiglu", _int(ffn, "intermediate_size", source, name=f"{f}.intermediate_size"))
    else:
        mult = _float(ffn, "ffn_mult", source, name=f"{f}.ffn_mult")
        # Bounded before int(): ffn_mult 1e308 makes the width inf (an OverflowError), 1e-9 makes it 0.
        width = 0 if 2 * mult * hidden / 3 > _MAX_DIM else ffn_mult_to_intermediate_size(mult, hidden)
        if width < 1:
            raise _bad(source, f"{f}.ffn_mult", f"a multiplier giving an FFN width in [1, {_MAX_DIM}]", mult)
        ffn_cfg = FFNConfig("swiglu", width)
    return BlockConfig(attention, ffn_cfg)


def _replaced_by(section: dict[str, Any], source: str, name: str, where: str) -> Literal["none", "linear"] | None:
    """What a nemotron-nas sublayer is replaced by: "none" (no_op), "linear" (replace_with_linear) or None
    (kept whole)."""
    no_op = _bool(section, "no_op", source, f"{name}.no_op")
    linear = _bool(section, "replace_with_linear", source, f"{name}.replace_with_linear")
    if no_op and linear:
        raise ConfigError(f"{where}: no_op and replace_with_linear are both true")
    return "none" if no_op else "linear" if linear else None


def _check_neutral(section: dict[str, Any], neutral: dict[str, tuple], known: set[str], where: str) -> None:
    for key, value in section.items():
        if key in known:
            continue
        if key not in neutral:
            raise ConfigError(f"{where}.{key} is not a field tessera knows; refusing rather than ignoring it")
        # Type as well as value: 0 == False in Python, and `unshifted_sink: 0` is not the neutral false.
        if not any(type(value) is type(n) and value == n for n in neutral[key]):
            raise ConfigError(
                f"{where}.{key}={value!r} asks for something tessera does not run (supported: {neutral[key][0]!r})"
            )


def save(arch: ArchConfig, path: str | Path, fmt: Format = "auto") -> None:
    atomic_write_text(path, json.dumps(to_dict(arch, fmt), indent=2) + "\n")


def family_expresses(arch: ArchConfig) -> bool:
    """Whether the family's own config.json describes `arch`: every layer the same full GQA + SwiGLU block but
    for windows the family can place (Llama: none; Mistral: one for all layers; Qwen: any layers)."""
    first = replace(arch.blocks[0], attention=replace(arch.blocks[0].attention, window=None))
    if first.attention.kind != "gqa" or first.ffn.kind != "swiglu":
        return False
    if any(replace(b, attention=replace(b.attention, window=None)) != first for b in arch.blocks):
        return False
    windows = {b.attention.window for b in arch.blocks}
    if arch.family == "llama":
        return windows == {None}
    if arch.family == "mistral":
        return len(windows) == 1
    return len(windows - {None}) <= 1


def to_dict(arch: ArchConfig, fmt: Format = "auto") -> dict[str, Any]:
    """config.json contents. "auto": the family's own format when it expresses the architecture, else
    nemotron-nas for a Llama-family model and tessera's format (the family's config plus block_configs) for
    the others."""
    if fmt == "auto":
        fmt = "family" if family_expresses(arch) else "nemotron-nas" if arch.family == "llama" else "tessera"
    name = ARCHITECTURES[arch.family]
    if fmt == "family" and not family_expresses(arch):
        raise ConfigError(
            f"this heterogeneous architecture cannot be written as {name}; use 'nemotron-nas' (Llama family) or "
            "'tessera'"
        )
    if fmt == "nemotron-nas" and arch.family != "llama":
        raise ConfigError(
            f"a {arch.family} model cannot be written as nemotron-nas (a Llama-family format); use 'tessera'"
        )
    nas = fmt == "nemotron-nas"
    out: dict[str, Any] = {
        "architectures": ["DeciLMForCausalLM" if nas else name],
        "model_type": "nemotron-nas" if nas else arch.family,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope.theta,
        "rope_scaling": None,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": _eos_to_json(arch.eos_token_ids),
        "torch_dtype": arch.dtype,
    }
    if arch.family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if arch.family == "llama":
        out["mlp_bias"] = False
    if arch.rope.factor is not None:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": arch.rope.factor,
            "low_freq_factor": arch.rope.low_freq_factor,
            "high_freq_factor": arch.rope.high_freq_factor,
            "original_max_position_embeddings": arch.rope.original_max_position_embeddings,
        }
    if fmt == "family":
        out["num_key_value_heads"] = arch.blocks[0].attention.n_kv_heads
        out["intermediate_size"] = arch.blocks[0].ffn.intermediate_size
        out.update(_family_windows(arch))
        return out
    out["num_key_value_heads"] = None
    out["intermediate_size"] = None
    out["block_configs"] = [_block_to_nas(arch, b) for b in arch.blocks]
    if arch.fusion_spans is not None:  # [] too: a record of none, so no layout is read as fused
        out["ffn_fusion_spans"] = [list(span) for span in arch.fusion_spans]
    if not nas:
        out[TESSERA_ONLY] = (
            f"per-layer block_configs in a {name} config: only tessera reads them (transformers and vLLM would "
            "build every layer alike)"
        )
        return out
    # vLLM, SGLang, TensorRT-LLM and mlx-lm size each FFN from ffn_mult alone and ignore intermediate_size,
    # which _block_to_nas adds exactly where ffn_mult cannot express the width: the export says so.
    pruned = []
    for i, block in enumerate(out["block_configs"]):
        if "intermediate_size" in block["ffn"]:
            theirs = ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"], arch.hidden_size)
            pruned.append(f"layer {i}: {block['ffn']['intermediate_size']} saved, {theirs} from ffn_mult")
    windowed = [i for i, b in enumerate(arch.blocks) if b.attention.window is not None]
    linear = [i for i, b in enumerate(arch.blocks) if "linear" in (b.attention.kind, b.ffn.kind)]
    why = []
    if pruned:
        why.append(
            "FFN widths that ffn_mult cannot express (find_multiple(int(2 * ffn_mult * hidden / 3), 256)); vLLM, "
            f"SGLang, TensorRT-LLM and mlx-lm would build other shapes, only tessera loads this checkpoint "
            f"({', '.join(pruned)})"
        )
    if windowed:
        why.append(
            f"attention windows (window_length) on layers {windowed}: vLLM's nemotron-nas reads none, only tessera "
            "runs them"
        )
    if linear:  # vLLM and SGLang read replace_with_linear nowhere: n_heads_in_group / ffn_mult null, a TypeError
        why.append(
            f"linear sublayers (replace_with_linear) on layers {linear}: vLLM and SGLang build none (TensorRT-LLM "
            "and the checkpoint format's Hugging Face remote code do)"
        )
    if why:
        out[TESSERA_ONLY] = "; ".join(why)
    return out


def _family_windows(arch: ArchConfig) -> dict[str, Any]:
    """The family's own window fields for `arch` (family_expresses(arch) holds)."""
    windows = [b.attention.window for b in arch.blocks]
    window = next((w for w in windows if w is not None), None)
    if arch.family == "mistral":
        return {"sliding_window": window}
    if arch.family == "llama":
        return {}
    # transformers reads layer_types; max_window_layers says the same for readers that know only it, where
    # the windowed layers are the last ones (the only pattern it expresses).
    first = next((i for i, w in enumerate(windows) if w is not None), arch.n_layers)
    suffix = all(w is not None for w in windows[first:])
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": first if suffix else arch.n_layers,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
    }


TESSERA_ONLY = "tessera_only"  # config.json key of an export other runtimes would build wrong shapes from, or fail on


def _block_to_nas(arch: ArchConfig, block: BlockConfig) -> dict[str, Any]:
    att, ffn = block.attention, block.ffn
    attention = {
        "n_heads_in_group": arch.n_heads // att.n_kv_heads if att.kind == "gqa" else None,
        "no_op": att.kind == "none",
        "replace_with_linear": att.kind == "linear",
    }
    if att.window is not None:
        attention["window_length"] = att.window
    ffn_out: dict[str, Any] = {
        "ffn_mult": None,
        "no_op": ffn.kind == "none",
        "replace_with_linear": ffn.kind == "linear",
    }
    if ffn.kind == "swiglu":
        mult = ffn.intermediate_size * 3 / (2 * arch.hidden_size)
        ffn_out["ffn_mult"] = mult
        if ffn_mult_to_intermediate_size(mult, arch.hidden_size) != ffn.intermediate_size:
            # Not reachable through ffn_mult's round-up to 256 (e.g. a pruned width of 384):
            # record the width explicitly; tessera's reader gives it precedence.
            ffn_out["intermediate_size"] = ffn.intermediate_size
    return {"attention": attention, "ffn": ffn_out}


def _eos_to_json(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)
