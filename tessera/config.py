"""Architecture config: what a heterogeneous decoder is made of, and what it costs.

One small frozen dataclass per concern (attention, FFN, block, rope, model). Readers and writers for the two
Hugging Face formats tessera serves and produces: `LlamaForCausalLM` (every layer the same) and
`nemotron-nas` / `DeciLMForCausalLM` (per-layer `block_configs`, as in NVIDIA's Puzzle models). The cost
formulas (parameters, weight bytes, KV bytes per token, FLOPs per token) live here so the cost model, the
search and `tessera info` all use one definition (counting rules: configs/README.md).

config.json is an input boundary (STYLE 14): the readers check every field they read for type and range
(a JSON "false" is a true string, and Python's bool is an int) and refuse sizes beyond generous sanity bounds,
with a one-line `ConfigError` naming the file and field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from tessera.files import atomic_write_text

AttentionKind = Literal["gqa", "linear", "none"]
FFNKind = Literal["swiglu", "linear", "none"]

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
# Storage dtypes a checkpoint (config "torch_dtype") may declare; float64 loads (cast to the run dtype) like any.
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}

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


def read_json(path: Path, expected: str, error: type[ValueError]) -> Any:
    """The parsed JSON of a file; `error` names the file and what was expected when it is missing, unreadable
    or not JSON."""
    if not path.is_file():
        raise error(f"{path}: no such file (expected {expected})")
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    # ValueError: JSONDecodeError, bytes that are not UTF-8, integers past Python's 4300-digit limit;
    # RecursionError: arrays nested a hundred thousand deep.
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from None


def json_excerpt(value: Any, limit: int = 60) -> str:
    """A value as JSON spells it ("false" is a string, false a boolean), cut to `limit` characters: how the
    readers quote a bad value in an error message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config.json that tessera cannot turn into a correct model; the message names file and field."""


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (nemotron-nas rounds FFN widths up to a multiple of 256)."""
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def dtype_bytes(dtype: str) -> int:
    if dtype not in _DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AttentionConfig:
    kind: AttentionKind = "gqa"
    n_kv_heads: int | None = None  # only for "gqa"; n_heads must be a multiple of it

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "linear", "none"):
            raise ConfigError(f"attention kind {self.kind!r}: expected 'gqa', 'linear' or 'none'")
        if self.kind == "gqa" and (self.n_kv_heads is None or self.n_kv_heads < 1):
            raise ConfigError(f"gqa attention needs n_kv_heads >= 1, got {self.n_kv_heads}")
        if self.kind != "gqa" and self.n_kv_heads is not None:
            raise ConfigError(f"{self.kind} attention has no KV heads, got n_kv_heads={self.n_kv_heads}")

    @property
    def name(self) -> str:
        return f"gqa_kv{self.n_kv_heads}" if self.kind == "gqa" else f"attn_{self.kind}"


@dataclass(frozen=True)
class FFNConfig:
    kind: FFNKind = "swiglu"
    intermediate_size: int | None = None  # only for "swiglu"

    def __post_init__(self) -> None:
        if self.kind not in ("swiglu", "linear", "none"):
            raise ConfigError(f"ffn kind {self.kind!r}: expected 'swiglu', 'linear' or 'none'")
        if self.kind == "swiglu" and (self.intermediate_size is None or self.intermediate_size < 1):
            raise ConfigError(f"swiglu ffn needs intermediate_size >= 1, got {self.intermediate_size}")
        if self.kind != "swiglu" and self.intermediate_size is not None:
            raise ConfigError(f"{self.kind} ffn has no width, got intermediate_size={self.intermediate_size}")

    @property
    def name(self) -> str:
        return f"ffn_{self.intermediate_size}" if self.kind == "swiglu" else f"ffn_{self.kind}"


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    @property
    def is_empty(self) -> bool:
        """Attention and FFN both no-op: the layer has no weights, launches nothing and holds no cache."""
        return self.attention.kind == "none" and self.ffn.kind == "none"


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # Llama-3 frequency scaling ("rope_type": "llama3"); factor None means plain RoPE.
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    n_heads: int
    head_dim: int
    blocks: tuple[BlockConfig, ...]
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # the checkpoint's storage dtype (config "torch_dtype")
    # FFN-Fusion groups, (first, last) layer spans: layers first..last-1 are empty and layer `last` holds the
    # fused wide FFN (the released Ultra-253B layout). Written by `tessera fuse` as "ffn_fusion_spans";
    # for configs without the key, `fused_ffn_spans()` infers them from the layout.
    fusion_spans: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "n_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.blocks:
            raise ConfigError("the model needs at least one layer (blocks is empty)")
        for i, block in enumerate(self.blocks):
            kv = block.attention.n_kv_heads
            if kv is not None and self.n_heads % kv:
                raise ConfigError(f"layer {i}: n_kv_heads={kv} does not divide n_heads={self.n_heads}")
        for first, last in self.fusion_spans:
            if not 0 <= first < last < self.n_layers:
                raise ConfigError(f"ffn_fusion_spans [{first}, {last}]: expected 0 <= first < last < {self.n_layers}")
            if not all(b.is_empty for b in self.blocks[first:last]):
                raise ConfigError(f"ffn_fusion_spans [{first}, {last}]: layers {first}..{last - 1} must be empty")
            fused = self.blocks[last]
            if fused.attention.kind != "none" or fused.ffn.kind != "swiglu":
                raise ConfigError(f"ffn_fusion_spans [{first}, {last}]: layer {last} must be an attention-free SwiGLU")

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def with_blocks(self, blocks: list[BlockConfig] | tuple[BlockConfig, ...]) -> ArchConfig:
        """The same model with other blocks (recorded fusion spans do not carry over)."""
        return replace(self, blocks=tuple(blocks), fusion_spans=())

    def empty_layers(self) -> list[int]:
        """Layers whose attention and FFN are both no-op: no weights, no kernel launch, no cache."""
        return [i for i, b in enumerate(self.blocks) if b.is_empty]

    def sequential_depth(self) -> int:
        """Sublayers that run one after another (attention and FFN each count one; no-ops count none): the
        depth FFN Fusion shortens."""
        return sum((b.attention.kind != "none") + (b.ffn.kind != "none") for b in self.blocks)

    def fused_ffn_spans(self) -> tuple[tuple[int, int], ...]:
        """The FFN-Fusion groups: the recorded spans, else the ones the layout shows. A config without the
        record (NVIDIA's Ultra-253B) is read as the released model is laid out: a fused FFN is an attention-free
        SwiGLU layer right after one or more empty layers (the rest of its group), wider than any attention
        layer's FFN (a Puzzle child never widens a single FFN beyond its parent's)."""
        if self.fusion_spans:
            return self.fusion_spans
        widest = max((b.ffn.intermediate_size or 0 for b in self.blocks if b.attention.kind != "none"), default=0)
        spans = []
        for i, b in enumerate(self.blocks):
            if b.attention.kind != "none" or b.ffn.kind != "swiglu" or widest == 0 or b.ffn.intermediate_size <= widest:
                continue
            first = i
            while first > 0 and self.blocks[first - 1].is_empty:
                first -= 1
            if first < i:
                spans.append((first, i))
        return tuple(spans)

    # Cost formulas: the one definition (STYLE 11); the cost model and the search call these.

    def attention_params(self, attention: AttentionConfig) -> int:
        h, q = self.hidden_size, self.n_heads * self.head_dim
        if attention.kind == "gqa":
            kv = attention.n_kv_heads * self.head_dim
            return h * q + 2 * h * kv + q * h + h  # q, k, v, o projections + input norm
        if attention.kind == "linear":
            return h * h + h
        return 0

    def ffn_params(self, ffn: FFNConfig) -> int:
        h = self.hidden_size
        if ffn.kind == "swiglu":
            return 3 * h * ffn.intermediate_size + h  # gate, up, down + post-attention norm
        if ffn.kind == "linear":
            return h * h + h
        return 0

    def block_params(self, block: BlockConfig) -> int:
        return self.attention_params(block.attention) + self.ffn_params(block.ffn)

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else embed
        return embed + head + self.hidden_size + sum(self.block_params(b) for b in self.blocks)

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.num_params() * dtype_bytes(dtype or self.dtype)

    def kv_bytes_per_token_layer(self, block: BlockConfig, dtype: str | None = None) -> int:
        if block.attention.kind != "gqa":
            return 0  # linear and no-op attention keep no cache
        return 2 * block.attention.n_kv_heads * self.head_dim * dtype_bytes(dtype or self.dtype)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        return sum(self.kv_bytes_per_token_layer(b, dtype) for b in self.blocks)

    def decode_step_bytes(self, batch: int, context_len: int, dtype: str | None = None) -> int:
        """Fewest bytes one decode step must read: every weight once (the input embedding only as the tied LM
        head: a lookup reads `batch` rows) plus each sequence's KV cache at `context_len` tokens. Divided by
        the memory bandwidth, the floor of a decode step's time."""
        lookup_only = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        weights = (self.num_params() - lookup_only) * dtype_bytes(dtype or self.dtype)
        return weights + batch * context_len * self.kv_bytes_per_token(dtype)

    def flops_per_token(self, context_len: int = 0) -> int:
        """Forward FLOPs for one token attending to `context_len` cached tokens.

        2 FLOPs per weight multiply-add (embedding lookups and norms excluded) plus, for each GQA layer,
        QK^T and PV over the context: 2 * 2 * n_heads * head_dim * context_len.
        """
        h = self.hidden_size
        flops = 2 * self.vocab_size * h  # lm_head
        for block in self.blocks:
            flops += 2 * (self.attention_params(block.attention) - (h if block.attention.kind != "none" else 0))
            flops += 2 * (self.ffn_params(block.ffn) - (h if block.ffn.kind != "none" else 0))
            if block.attention.kind == "gqa":
                flops += 4 * self.n_heads * self.head_dim * context_len
        return flops

    def summary(self) -> dict[str, Any]:
        """What `tessera info --json` prints."""
        return {
            "num_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.n_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "num_params": self.num_params(),
            "dtype": self.dtype,
            "weight_bytes": self.weight_bytes(),
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "flops_per_token": self.flops_per_token(),
            "sequential_depth": self.sequential_depth(),
            "empty_layers": self.empty_layers(),
            "fused_ffns": [
                {"layer": last, "span": [first, last], "intermediate_size": self.blocks[last].ffn.intermediate_size}
                for first, last in self.fused_ffn_spans()
            ],
            "layers": [
                {
                    "layer": i,
                    "attention": b.attention.kind,
                    "n_kv_heads": b.attention.n_kv_heads,
                    "ffn": b.ffn.kind,
                    "intermediate_size": b.ffn.intermediate_size,
                    "num_params": self.block_params(b),
                    "kv_bytes_per_token": self.kv_bytes_per_token_layer(b),
                }
                for i, b in enumerate(self.blocks)
            ],
        }

    # Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
        return _from_hf_dict(cfg, source)

    @classmethod
    def from_json(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        cfg = read_json(path, "a Hugging Face config.json", ConfigError)
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return _from_hf_dict(cfg, str(path))

    def is_uniform_llama(self) -> bool:
        """True when every layer is full GQA + SwiGLU with the same shape (a plain LlamaForCausalLM)."""
        first = self.blocks[0]
        return first.attention.kind == "gqa" and first.ffn.kind == "swiglu" and all(b == first for b in self.blocks)

    def to_hf_dict(self, fmt: Literal["auto", "llama", "nemotron-nas"] = "auto") -> dict[str, Any]:
        """config.json contents: Llama when every layer is the same full block (or asked), else nemotron-nas."""
        if fmt == "auto":
            fmt = "llama" if self.is_uniform_llama() else "nemotron-nas"
        if fmt == "llama" and not self.is_uniform_llama():
            raise ConfigError("a heterogeneous architecture cannot be written as LlamaForCausalLM; use nemotron-nas")
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if fmt == "llama" else "DeciLMForCausalLM"],
            "model_type": "llama" if fmt == "llama" else "nemotron-nas",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_to_json(self.eos_token_ids),
            "torch_dtype": self.dtype,
        }
        if self.rope.factor is not None:
            out["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope.factor,
                "low_freq_factor": self.rope.low_freq_factor,
                "high_freq_factor": self.rope.high_freq_factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
            }
        if fmt == "llama":
            out["num_key_value_heads"] = self.blocks[0].attention.n_kv_heads
            out["intermediate_size"] = self.blocks[0].ffn.intermediate_size
        else:
            out["num_key_value_heads"] = None
            out["intermediate_size"] = None
            out["block_configs"] = [self._block_to_nas(b) for b in self.blocks]
            if self.fusion_spans:
                out["ffn_fusion_spans"] = [list(span) for span in self.fusion_spans]
        return out

    def _block_to_nas(self, block: BlockConfig) -> dict[str, Any]:
        att, ffn = block.attention, block.ffn
        attention = {
            "n_heads_in_group": self.n_heads // att.n_kv_heads if att.kind == "gqa" else None,
            "no_op": att.kind == "none",
            "replace_with_linear": att.kind == "linear",
        }
        ffn_out: dict[str, Any] = {
            "ffn_mult": None,
            "no_op": ffn.kind == "none",
            "replace_with_linear": ffn.kind == "linear",
        }
        if ffn.kind == "swiglu":
            mult = ffn.intermediate_size * 3 / (2 * self.hidden_size)
            ffn_out["ffn_mult"] = mult
            if ffn_mult_to_intermediate_size(mult, self.hidden_size) != ffn.intermediate_size:
                # Not reachable through ffn_mult's round-up to 256 (e.g. a pruned width of 384):
                # record the width explicitly; tessera's reader gives it precedence.
                ffn_out["intermediate_size"] = ffn.intermediate_size
        return {"attention": attention, "ffn": ffn_out}

    def save_json(self, path: str | Path, fmt: Literal["auto", "llama", "nemotron-nas"] = "auto") -> None:
        atomic_write_text(path, json.dumps(self.to_hf_dict(fmt), indent=2) + "\n")


def _eos_to_json(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


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
    if not isinstance(value, str) or value not in _DTYPE_BYTES:
        raise _bad(source, key, "one of " + ", ".join(json.dumps(d) for d in sorted(_DTYPE_BYTES)), value)
    return value


def _from_hf_dict(cfg: dict[str, Any], source: str) -> ArchConfig:
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

    no_op, linear = (
        _bool(att, "no_op", source, f"{a}.no_op"),
        _bool(att, "replace_with_linear", source, f"{a}.replace_with_linear"),
    )
    if no_op and linear:
        raise ConfigError(f"{where}.attention: no_op and replace_with_linear are both true")
    if no_op:
        attention = AttentionConfig("none")
    elif linear:
        attention = AttentionConfig("linear")
    else:
        group = _int(att, "n_heads_in_group", source, name=f"{a}.n_heads_in_group")
        if n_heads % group:
            raise ConfigError(
                f"{where}.attention.n_heads_in_group={group} does not divide num_attention_heads={n_heads}"
            )
        attention = AttentionConfig("gqa", n_heads // group)

    no_op, linear = (
        _bool(ffn, "no_op", source, f"{f}.no_op"),
        _bool(ffn, "replace_with_linear", source, f"{f}.replace_with_linear"),
    )
    if no_op and linear:
        raise ConfigError(f"{where}.ffn: no_op and replace_with_linear are both true")
    if no_op:
        ffn_cfg = FFNConfig("none")
    elif linear:
        ffn_cfg = FFNConfig("linear")
    elif ffn.get("intermediate_size") is not None:
        ffn_cfg = FFNConfig("swiglu", _int(ffn, "intermediate_size", source, name=f"{f}.intermediate_size"))
    else:
        mult = _float(ffn, "ffn_mult", source, name=f"{f}.ffn_mult")
        # Bounded before int(): ffn_mult 1e308 makes the width inf (an OverflowError), 1e-9 makes it 0.
        if 2 * mult * hidden / 3 > _MAX_DIM or ffn_mult_to_intermediate_size(mult, hidden) < 1:
            raise _bad(source, f"{f}.ffn_mult", f"a multiplier giving an FFN width in [1, {_MAX_DIM}]", mult)
        ffn_cfg = FFNConfig("swiglu", ffn_mult_to_intermediate_size(mult, hidden))
    return BlockConfig(attention, ffn_cfg)


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
