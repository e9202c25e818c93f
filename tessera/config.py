"""Architecture config: what a heterogeneous decoder is made of, and what it costs.

One small frozen dataclass per concern (attention, FFN, block, rope, model). Readers and writers for the two
Hugging Face formats tessera serves and produces: `LlamaForCausalLM` (every layer the same) and
`nemotron-nas` / `DeciLMForCausalLM` (per-layer `block_configs`, as in NVIDIA's Puzzle models). The cost
formulas (parameters, weight bytes, KV bytes per token, FLOPs per token) live here so the cost model, the
search and `tessera info` all use one definition (counting rules: configs/README.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

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
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


def read_json(path: Path, expected: str, error: type[ValueError]) -> Any:
    """The parsed JSON of a file; `error` names the file and what was expected when it is missing or not JSON."""
    if not path.is_file():
        raise error(f"{path}: no such file (expected {expected})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


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
        Path(path).write_text(json.dumps(self.to_hf_dict(fmt), indent=2) + "\n")


def _eos_to_json(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def _get(cfg: dict[str, Any], key: str, source: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: field {key!r} is missing (expected {_kind_name(kind)})")
        return default
    value = cfg[key]
    # bool is an int in Python; a JSON true where a number belongs is still a mistake.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise ConfigError(f"{source}: field {key!r} is {value!r}, expected {_kind_name(kind)}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def _read_rope(cfg: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (theta inside); older files "rope_theta" + "rope_scaling".
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: field 'rope_scaling' is {scaling!r}, expected an object or null")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{source}: field 'rope_theta' is {theta!r}, expected a positive number")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "llama3":
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (expected 'llama3' or none)")
    try:
        return RopeConfig(
            theta=float(theta),
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: rope_scaling (llama3) is missing field {e.args[0]!r}") from None


def _from_hf_dict(cfg: dict[str, Any], source: str) -> ArchConfig:
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "nemotron-nas"):
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (expected 'llama' or 'nemotron-nas')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConfigError(f"{source}: field {key!r} is true; tessera's blocks have no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu' for SwiGLU)")

    hidden = _get(cfg, "hidden_size", source, int)
    n_heads = _get(cfg, "num_attention_heads", source, int)
    n_layers = _get(cfg, "num_hidden_layers", source, int)
    if n_heads < 1 or (hidden % n_heads and "head_dim" not in cfg):
        raise ConfigError(f"{source}: num_attention_heads={n_heads} does not divide hidden_size={hidden}")
    head_dim = _get(cfg, "head_dim", source, int, hidden // n_heads)

    if model_type == "llama":
        n_kv = _get(cfg, "num_key_value_heads", source, int, n_heads)
        if n_kv < 1 or n_heads % n_kv:
            raise ConfigError(f"{source}: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
        width = _get(cfg, "intermediate_size", source, int)
        block = BlockConfig(AttentionConfig("gqa", n_kv), FFNConfig("swiglu", width))
        blocks = (block,) * n_layers
    else:
        raw = _get(cfg, "block_configs", source, list)
        if len(raw) != n_layers:
            raise ConfigError(f"{source}: block_configs has {len(raw)} entries but num_hidden_layers is {n_layers}")
        blocks = tuple(_nas_block(b, i, hidden, n_heads, source) for i, b in enumerate(raw))

    spans = _read_fusion_spans(cfg, source)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    try:
        return ArchConfig(
            vocab_size=_get(cfg, "vocab_size", source, int),
            hidden_size=hidden,
            n_heads=n_heads,
            head_dim=head_dim,
            blocks=blocks,
            rope=_read_rope(cfg, source),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", source, (int, float), 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=_get(cfg, "max_position_embeddings", source, int, 8192),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            fusion_spans=spans,
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
    if not isinstance(raw, dict) or not isinstance(raw.get("attention"), dict) or not isinstance(raw.get("ffn"), dict):
        raise ConfigError(f"{where}: expected an object with 'attention' and 'ffn' objects")
    att, ffn = raw["attention"], raw["ffn"]
    _check_neutral(att, _NEUTRAL_ATTENTION_KEYS, f"{where}.attention")
    _check_neutral(ffn, _NEUTRAL_FFN_KEYS, f"{where}.ffn")

    if att.get("no_op") and att.get("replace_with_linear"):
        raise ConfigError(f"{where}.attention: no_op and replace_with_linear are both true")
    if att.get("no_op"):
        attention = AttentionConfig("none")
    elif att.get("replace_with_linear"):
        attention = AttentionConfig("linear")
    else:
        group = att.get("n_heads_in_group")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ConfigError(f"{where}.attention.n_heads_in_group is {group!r}, expected a positive integer")
        if n_heads % group:
            raise ConfigError(
                f"{where}.attention.n_heads_in_group={group} does not divide num_attention_heads={n_heads}"
            )
        attention = AttentionConfig("gqa", n_heads // group)

    if ffn.get("no_op") and ffn.get("replace_with_linear"):
        raise ConfigError(f"{where}.ffn: no_op and replace_with_linear are both true")
    if ffn.get("no_op"):
        ffn_cfg = FFNConfig("none")
    elif ffn.get("replace_with_linear"):
        ffn_cfg = FFNConfig("linear")
    elif ffn.get("intermediate_size") is not None:
        width = ffn["intermediate_size"]
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ConfigError(f"{where}.ffn.intermediate_size is {width!r}, expected a positive integer")
        ffn_cfg = FFNConfig("swiglu", width)
    else:
        mult = ffn.get("ffn_mult")
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not math.isfinite(mult) or mult <= 0:
            raise ConfigError(f"{where}.ffn.ffn_mult is {mult!r}, expected a positive number")
        ffn_cfg = FFNConfig("swiglu", ffn_mult_to_intermediate_size(mult, hidden))
    return BlockConfig(attention, ffn_cfg)


def _check_neutral(section: dict[str, Any], neutral: dict[str, tuple], where: str) -> None:
    known = {"n_heads_in_group", "no_op", "replace_with_linear", "ffn_mult", "intermediate_size"}
    for key, value in section.items():
        if key in known:
            continue
        if key not in neutral:
            raise ConfigError(f"{where}.{key} is not a field tessera knows; refusing rather than ignoring it")
        if value not in neutral[key]:
            raise ConfigError(
                f"{where}.{key}={value!r} asks for something tessera does not run (supported: {neutral[key][0]!r})"
            )
