"""Hugging Face config.json: reading and writing the two formats tessera serves and produces.

`LlamaForCausalLM` (every layer the same) and `nemotron-nas` / `DeciLMForCausalLM` (per-layer `block_configs`,
as in NVIDIA's Puzzle models: `n_kv_heads = n_heads // n_heads_in_group`, `intermediate_size =
find_multiple(int(2 * ffn_mult * hidden / 3), 256)`). The architecture they describe and its cost formulas are
tessera/config.py; `ArchConfig.from_json`, `.from_hf_dict`, `.to_hf_dict` and `.save_json` call this module.

config.json is an input boundary (STYLE 14): the readers check every field they read for type and range
(a JSON "false" is a true string, and Python's bool is an int) and refuse sizes beyond generous sanity bounds,
with a one-line `ConfigError` naming the file and field. Unknown per-layer keys are accepted only at their
neutral value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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

Format = Literal["auto", "llama", "nemotron-nas"]

# Per-layer keys of nemotron-nas block_configs that the runtime accepts only at their neutral value.
_NEUTRAL_ATTENTION_KEYS = {
    "sparsify": (None, [], False),
    "window_length": (None,),
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
    return parse(cfg, str(path))


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


def parse(cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
    """The architecture a parsed config.json describes; `source` names it in error messages."""
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "nemotron-nas"):
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (expected 'llama' or 'nemotron-nas')")
    for key in ("attention_bias", "mlp_bias"):
        if _bool(cfg, key, source):
            raise ConfigError(f"{source}: field {key!r} is true; tessera's blocks have no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu' for SwiGLU)")

    hidden = _int(cfg, "hidden_size", source)
    n_heads = _int(cfg, "num_attention_heads", source)
    n_layers = _int(cfg, "num_hidden_layers", source, hi=_MAX_LAYERS)
    if hidden % n_heads and cfg.get("head_dim") is None:
        raise ConfigError(f"{source}: num_attention_heads={n_heads} does not divide hidden_size={hidden}")
    head_dim = _int(cfg, "head_dim", source, hidden // n_heads)
    vocab_size = _int(cfg, "vocab_size", source)

    if model_type == "llama":
        n_kv = _int(cfg, "num_key_value_heads", source, n_heads)
        if n_heads % n_kv:
            raise ConfigError(f"{source}: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
        width = _int(cfg, "intermediate_size", source)
        block = BlockConfig(AttentionConfig("gqa", n_kv), FFNConfig("swiglu", width))
        blocks = (block,) * n_layers
    else:
        raw = _get(cfg, "block_configs", source, list)
        if len(raw) != n_layers:
            raise ConfigError(f"{source}: block_configs has {len(raw)} entries but num_hidden_layers is {n_layers}")
        blocks = tuple(_nas_block(b, i, hidden, n_heads, source) for i, b in enumerate(raw))

    bos = cfg.get("bos_token_id")
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos_ids = tuple(_token_id(e, source, f"eos_token_id[{j}]", vocab_size) for j, e in enumerate(eos))
    else:
        eos_ids = () if eos is None else (_token_id(eos, source, "eos_token_id", vocab_size),)
    # Not used by tessera, only type-checked; old Llama conversions write -1 for "none".
    _int(cfg, "pad_token_id", source, None, lo=-1, expected=f"an integer in [-1, {_MAX_DIM}] or null")
    try:
        return ArchConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            n_heads=n_heads,
            head_dim=head_dim,
            blocks=blocks,
            rope=_read_rope(cfg, source),
            rms_norm_eps=_float(
                cfg, "rms_norm_eps", source, 1e-5, ok=lambda x: 0 < x < 1, expected="a number in (0, 1)"
            ),
            tie_embeddings=_bool(cfg, "tie_word_embeddings", source),
            max_position_embeddings=_int(cfg, "max_position_embeddings", source, 8192, hi=_MAX_POSITIONS),
            bos_token_id=None if bos is None else _token_id(bos, source, "bos_token_id", vocab_size),
            eos_token_ids=eos_ids,
            dtype=_read_dtype(cfg, source),
            fusion_spans=_read_fusion_spans(cfg, source),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_fusion_spans(cfg: dict[str, Any], source: str) -> tuple[tuple[int, int], ...]:
    raw = _get(cfg, "ffn_fusion_spans", source, list, [])
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
    _check_neutral(
        att, _NEUTRAL_ATTENTION_KEYS, {"n_heads_in_group", "no_op", "replace_with_linear"}, f"{where}.attention"
    )
    _check_neutral(
        ffn, _NEUTRAL_FFN_KEYS, {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear"}, f"{where}.ffn"
    )

    replaced = _replaced_by(att, source, a, f"{where}.attention")
    if replaced:
        attention = AttentionConfig(replaced)
    else:
        group = _int(att, "n_heads_in_group", source, name=f"{a}.n_heads_in_group")
        if n_heads % group:
            raise ConfigError(
                f"{where}.attention.n_heads_in_group={group} does not divide num_attention_heads={n_heads}"
            )
        attention = AttentionConfig("gqa", n_heads // group)

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


def to_dict(arch: ArchConfig, fmt: Format = "auto") -> dict[str, Any]:
    """config.json contents: Llama when every layer is the same full block (or asked), else nemotron-nas."""
    if fmt == "auto":
        fmt = "llama" if arch.is_uniform_llama() else "nemotron-nas"
    if fmt == "llama" and not arch.is_uniform_llama():
        raise ConfigError("a heterogeneous architecture cannot be written as LlamaForCausalLM; use nemotron-nas")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if fmt == "llama" else "DeciLMForCausalLM"],
        "model_type": "llama" if fmt == "llama" else "nemotron-nas",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope.theta,
        "rope_scaling": None,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": _eos_to_json(arch.eos_token_ids),
        "torch_dtype": arch.dtype,
    }
    if arch.rope.factor is not None:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": arch.rope.factor,
            "low_freq_factor": arch.rope.low_freq_factor,
            "high_freq_factor": arch.rope.high_freq_factor,
            "original_max_position_embeddings": arch.rope.original_max_position_embeddings,
        }
    if fmt == "llama":
        out["num_key_value_heads"] = arch.blocks[0].attention.n_kv_heads
        out["intermediate_size"] = arch.blocks[0].ffn.intermediate_size
    else:
        out["num_key_value_heads"] = None
        out["intermediate_size"] = None
        out["block_configs"] = [_block_to_nas(arch, b) for b in arch.blocks]
        # vLLM, SGLang, TensorRT-LLM and mlx-lm size each FFN from ffn_mult alone and ignore intermediate_size,
        # which _block_to_nas adds exactly where ffn_mult cannot express the width: the export says so.
        pruned = []
        for i, block in enumerate(out["block_configs"]):
            if "intermediate_size" in block["ffn"]:
                theirs = ffn_mult_to_intermediate_size(block["ffn"]["ffn_mult"], arch.hidden_size)
                pruned.append(f"layer {i}: {block['ffn']['intermediate_size']} saved, {theirs} from ffn_mult")
        if pruned:
            out[TESSERA_ONLY] = (
                "FFN widths that ffn_mult cannot express (find_multiple(int(2 * ffn_mult * hidden / 3), 256)); vLLM, "
                f"SGLang, TensorRT-LLM and mlx-lm would build other shapes, only tessera loads this checkpoint "
                f"({', '.join(pruned)})"
            )
        if arch.fusion_spans:
            out["ffn_fusion_spans"] = [list(span) for span in arch.fusion_spans]
    return out


TESSERA_ONLY = "tessera_only"  # config.json key of an export other runtimes would build wrong shapes from


def _block_to_nas(arch: ArchConfig, block: BlockConfig) -> dict[str, Any]:
    att, ffn = block.attention, block.ffn
    attention = {
        "n_heads_in_group": arch.n_heads // att.n_kv_heads if att.kind == "gqa" else None,
        "no_op": att.kind == "none",
        "replace_with_linear": att.kind == "linear",
    }
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
