"""Architecture config: what a heterogeneous decoder is made of, and what it costs.

One small frozen dataclass per concern (attention, FFN, block, rope, model). The cost formulas (parameters,
weight bytes, KV bytes per token, FLOPs per token) live here so the cost model, the search and `tessera info`
all use one definition (counting rules: configs/README.md). The Hugging Face config.json formats that describe
these classes (`LlamaForCausalLM`, `nemotron-nas`) are read and written by tessera/hf_config.py, which
`ArchConfig.from_json` / `from_hf_dict` / `to_hf_dict` / `save_json` call. `ConfigError`, `read_json` and
`json_excerpt` are the input-boundary vocabulary every reader of a user's file shares (STYLE 14).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from tessera.errors import UserError

AttentionKind = Literal["gqa", "linear", "none"]
FFNKind = Literal["swiglu", "linear", "none"]
# The Hugging Face model families a parent may come from; a child keeps its parent's (runtime/weights.py and
# tessera/hf_config.py say what each adds to the Llama block: q/k/v biases, per-head q/k norms, windows).
Family = Literal["llama", "qwen2", "qwen3", "mistral"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")

# Storage dtypes a checkpoint (config "torch_dtype") may declare; float64 loads (cast to the run dtype) like any.
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


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


class ConfigError(UserError):
    """A config.json that tessera cannot turn into a correct model; the message names file and field."""


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (nemotron-nas rounds FFN widths up to a multiple of 256)."""
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


FP8_NAME = "float8_e4m3fn"  # a model whose projection matrices are E4M3 (`--dtype fp8`, kernels/fp8.py)


def activation_dtype(dtype: str) -> str:
    """What a model run in `dtype` keeps its activations, KV cache, embeddings, norms and stored LM head in: FP8
    quantizes the projection matrices (and reads the head through an FP8 copy, `ArchConfig.head_copy_bytes`), the
    rest is bf16."""
    return "bfloat16" if dtype == FP8_NAME else dtype


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AttentionConfig:
    kind: AttentionKind = "gqa"
    n_kv_heads: int | None = None  # only for "gqa"; n_heads must be a multiple of it
    # Only for "gqa": a query at position p sees the keys at p - window + 1 .. p (Mistral's and Qwen's
    # sliding_window: `window` keys, its own included); None sees every earlier key.
    window: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "linear", "none"):
            raise ConfigError(f"attention kind {self.kind!r}: expected 'gqa', 'linear' or 'none'")
        if self.kind == "gqa" and (self.n_kv_heads is None or self.n_kv_heads < 1):
            raise ConfigError(f"gqa attention needs n_kv_heads >= 1, got {self.n_kv_heads}")
        if self.kind != "gqa" and (self.n_kv_heads is not None or self.window is not None):
            raise ConfigError(
                f"{self.kind} attention has no KV heads or window, got n_kv_heads={self.n_kv_heads}, "
                f"window={self.window}"
            )
        if self.window is not None and (type(self.window) is not int or self.window < 1):
            raise ConfigError(f"an attention window is a number of keys >= 1, got {self.window!r}")

    @property
    def name(self) -> str:
        if self.kind != "gqa":
            return f"attn_{self.kind}"
        return f"gqa_kv{self.n_kv_heads}" + ("" if self.window is None else f"_w{self.window}")

    def kv_tokens(self, context_len: int) -> int:
        """The cached tokens a sequence of `context_len` tokens keeps (and a decode step reads): all of them,
        the last `window` under a window, none without a cache."""
        if self.kind != "gqa":
            return 0
        return context_len if self.window is None else min(context_len, self.window)


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


EMPTY_BLOCK = BlockConfig(AttentionConfig("none"), FFNConfig("none"))  # a layer that is skipped entirely


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # Llama-3 frequency scaling ("rope_type": "llama3"); factor None means plain RoPE.
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def share(total: int, rank: int, size: int) -> range:
    """Rank's contiguous share of `total` rows over `size` tensor-parallel ranks: the larger shares first (ceil),
    the last may be shorter (runtime/parallel.py's shard rules; rank 0's is the largest, what the rank_* formulas
    count)."""
    step = -(-total // size)
    return range(min(total, rank * step), min(total, (rank + 1) * step))


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
    # fused wide FFN (the released Ultra-253B layout). Written in tessera's nemotron-nas exports as
    # "ffn_fusion_spans" ([] for none); None (a config without the key) has `fused_ffn_spans()` infer them from
    # the layout, which a Puzzle child's could mimic: a child is built with the record (with_blocks: none).
    fusion_spans: tuple[tuple[int, int], ...] | None = None
    family: Family = "llama"  # the Hugging Face family of the parent (its config.json's model_type)
    # "fp8": the checkpoint's projection matrices are E4M3 with per-channel scales (tessera/hf_config.py); None: all
    # weights in `dtype`.
    quantization: str | None = None
    # Whether the checkpoint holds per-layer FP8 KV-cache scales (`self_attn.k_scale`, `v_scale`: config.json's
    # quantization_config.kv_cache_scheme), calibrated by `tessera quantize --kv-cache-scales`.
    kv_cache_scales: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r}: expected one of {', '.join(FAMILIES)}")
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
        for first, last in self.fusion_spans or ():
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

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections (Qwen2's attention; never on o)."""
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """An RMSNorm over head_dim on each query and key head before RoPE (Qwen3's attention)."""
        return self.family == "qwen3"

    def with_blocks(self, blocks: list[BlockConfig] | tuple[BlockConfig, ...]) -> ArchConfig:
        """The same model with other blocks (recorded fusion spans do not carry over, nor KV-cache scales: they were
        calibrated on the old blocks' keys and values)."""
        return replace(self, blocks=tuple(blocks), fusion_spans=(), kv_cache_scales=False)

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
        if self.fusion_spans is not None:
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
            extras = (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
            return h * q + 2 * h * kv + q * h + h + extras  # q, k, v, o projections + input norm (+ biases, q/k norms)
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

    @property
    def run_dtype(self) -> str:
        """The dtype the cost formulas default to: the checkpoint's storage dtype, FP8 for an FP8 checkpoint."""
        return FP8_NAME if self.quantization == "fp8" else self.dtype

    def weight_bytes(self, dtype: str | None = None) -> int:
        """The blocks' weights in `dtype`, the embedding, head and final norm in its activation dtype, and in FP8
        the head's FP8 copy (the blocks' norms count at one byte too: a few kilobytes under): one rank's weights
        when the model is not split."""
        return self.rank_weight_bytes(1, dtype)

    def head_copy_bytes(self, rows: int, dtype: str) -> int:
        """In FP8, what `rows` vocabulary rows of the LM head's FP8 copy take (one byte a weight, an fp32 scale a
        row; runtime/model.py), beside the bf16 head the checkpoint keeps; 0 in other dtypes."""
        return rows * (self.hidden_size + 4) if dtype == FP8_NAME else 0

    def kv_value_dtype(self, dtype: str | None = None, kv_dtype: str | None = None) -> str:
        """What the KV cache stores: `kv_dtype` when given (FP8_NAME: an FP8 cache), else the activation dtype of
        the model's `dtype` (FP8 weights keep a bf16 cache)."""
        return kv_dtype or activation_dtype(dtype or self.run_dtype)

    def kv_bytes_per_token_layer(
        self, block: BlockConfig, dtype: str | None = None, kv_dtype: str | None = None
    ) -> int:
        if block.attention.kind != "gqa":
            return 0  # linear and no-op attention keep no cache
        return 2 * block.attention.n_kv_heads * self.head_dim * dtype_bytes(self.kv_value_dtype(dtype, kv_dtype))

    def kv_bytes_per_token(self, dtype: str | None = None, kv_dtype: str | None = None) -> int:
        return sum(self.kv_bytes_per_token_layer(b, dtype, kv_dtype) for b in self.blocks)

    def kv_bytes(self, context_len: int, dtype: str | None = None, kv_dtype: str | None = None) -> int:
        """KV bytes one sequence of `context_len` tokens keeps: a windowed layer its last `window` tokens only."""
        return sum(
            b.attention.kv_tokens(context_len) * self.kv_bytes_per_token_layer(b, dtype, kv_dtype) for b in self.blocks
        )

    def decode_step_bytes(
        self, batch: int, context_len: int, dtype: str | None = None, kv_dtype: str | None = None
    ) -> int:
        """Fewest bytes one decode step must read: every block's weights and the final norm once, the LM head
        once as logits read it (in FP8 its FP8 copy; the input embedding not at all: a lookup reads `batch`
        rows) plus each sequence's KV cache at `context_len` tokens (a windowed layer's last `window`). Divided
        by the memory bandwidth, the floor of a decode step's time."""
        dtype = dtype or self.run_dtype
        blocks = sum(self.block_params(b) for b in self.blocks)
        wide = dtype_bytes(activation_dtype(dtype))
        head = self.head_copy_bytes(self.vocab_size, dtype) or self.vocab_size * self.hidden_size * wide
        weights = blocks * dtype_bytes(dtype) + self.hidden_size * wide + head
        return weights + batch * self.kv_bytes(context_len, dtype, kv_dtype)

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
            flops += 4 * self.n_heads * self.head_dim * block.attention.kv_tokens(context_len)
        return flops

    # Tensor parallelism over `tp` ranks, Megatron-style as vLLM shards a Llama: q/k/v and gate/up split by output
    # rows, o and down (and the linear replacements) by input columns, the embedding and LM head by vocabulary
    # rows, norms whole on every rank. The one definition of a rank's share (STYLE 11).

    def check_tensor_parallel(self, tp: int) -> None:
        if tp < 1 or self.n_heads % tp:
            raise ConfigError(
                f"tensor parallel size {tp}: expected a positive divisor of num_attention_heads ({self.n_heads})"
            )
        widths = [("vocab_size", self.vocab_size)]
        for i, block in enumerate(self.blocks):
            if block.attention.kind == "gqa":
                self.rank_kv_heads(block.attention, tp, i)
            if block.ffn.kind == "swiglu":
                widths.append((f"layer {i}'s FFN width", block.ffn.intermediate_size))
            if "linear" in (block.attention.kind, block.ffn.kind):
                widths.append((f"layer {i}'s linear sublayer (hidden_size)", self.hidden_size))
        for what, total in widths:  # shares are the larger ones first: none may be empty
            if not share(total, tp - 1, tp):
                raise ConfigError(
                    f"{what} {total} over {tp} ranks in shares of {len(share(total, 0, tp))} leaves the last rank none"
                )

    def rank_kv_heads(self, attention: AttentionConfig, tp: int, layer: int | None = None) -> int:
        """KV heads one rank holds: an even share, or one head (replicated on tp / n_kv ranks, as vLLM does) when
        the layer has fewer than tp."""
        n = attention.n_kv_heads
        if (n >= tp and n % tp) or (n < tp and tp % n):
            where = "" if layer is None else f"layer {layer}: "
            raise ConfigError(f"{where}{n} KV heads cannot be split over {tp} ranks nor replicated evenly")
        return max(1, n // tp)

    def rank_block_params(self, block: BlockConfig, tp: int) -> int:
        """One rank's parameters of a block (an FFN width that tp does not divide: the larger shares)."""
        h, d = self.hidden_size, self.head_dim
        att, ffn = block.attention, block.ffn
        n = 0
        if att.kind == "gqa":
            q, kv = self.n_heads // tp * d, self.rank_kv_heads(att, tp) * d
            n += h * q + 2 * h * kv + q * h + h + (q + 2 * kv if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        elif att.kind == "linear":
            n += h * len(share(h, 0, tp)) + h
        if ffn.kind == "swiglu":
            n += 3 * h * len(share(ffn.intermediate_size, 0, tp)) + h
        elif ffn.kind == "linear":
            n += h * len(share(h, 0, tp)) + h
        return n

    def rank_params(self, tp: int) -> int:
        """One rank's parameters: its vocabulary rows of the embedding (and untied head), the final norm, its
        share of every block."""
        rows = len(share(self.vocab_size, 0, tp)) * self.hidden_size
        head = 0 if self.tie_embeddings else rows
        return rows + head + self.hidden_size + sum(self.rank_block_params(b, tp) for b in self.blocks)

    def rank_weight_bytes(self, tp: int, dtype: str | None = None) -> int:
        """One rank's weights, counted as `weight_bytes` counts the whole: its share of the blocks in `dtype`, its
        vocabulary rows and the final norm in the activation dtype (FP8: blocks at one byte, the rest at two, and
        its rows of the head's FP8 copy)."""
        dtype = dtype or self.run_dtype
        blocks = sum(self.rank_block_params(b, tp) for b in self.blocks)
        rest = (self.rank_params(tp) - blocks) * dtype_bytes(activation_dtype(dtype))
        return blocks * dtype_bytes(dtype) + rest + self.head_copy_bytes(len(share(self.vocab_size, 0, tp)), dtype)

    def rank_kv_bytes_per_token(self, tp: int, dtype: str | None = None) -> int:
        per_head = 2 * self.head_dim * dtype_bytes(activation_dtype(dtype or self.run_dtype))
        return sum(per_head * self.rank_kv_heads(b.attention, tp) for b in self.blocks if b.attention.kind == "gqa")

    def tensor_parallel_summary(self, tp: int, dtype: str | None = None) -> dict[str, Any]:
        """A rank's memory under `tp`-way tensor parallelism (`tessera info --tensor-parallel-size`)."""
        self.check_tensor_parallel(tp)
        params = self.rank_params(tp)
        return {
            "tensor_parallel_size": tp,
            "rank_num_params": params,
            "rank_weight_bytes": self.rank_weight_bytes(tp, dtype),
            "rank_kv_bytes_per_token": self.rank_kv_bytes_per_token(tp, dtype),
            "replicated_kv_layers": [
                i for i, b in enumerate(self.blocks) if b.attention.kind == "gqa" and b.attention.n_kv_heads < tp
            ],
        }

    def summary(self) -> dict[str, Any]:
        """What `tessera info --json` prints."""
        return {
            "num_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.n_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "family": self.family,
            "num_params": self.num_params(),
            "dtype": self.run_dtype,
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
                    "window": b.attention.window,
                    "ffn": b.ffn.kind,
                    "intermediate_size": b.ffn.intermediate_size,
                    "num_params": self.block_params(b),
                    "kv_bytes_per_token": self.kv_bytes_per_token_layer(b),
                }
                for i, b in enumerate(self.blocks)
            ],
        }

    def is_uniform(self) -> bool:
        """True when every layer is the same full GQA + SwiGLU block (a plain parent of its family)."""
        first = self.blocks[0]
        return first.attention.kind == "gqa" and first.ffn.kind == "swiglu" and all(b == first for b in self.blocks)

    # Hugging Face config.json: the formats live in tessera/hf_config.py, imported on call because it imports
    # these classes.

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
        from tessera import hf_config

        return hf_config.parse(cfg, source)

    @classmethod
    def from_json(cls, path: str | Path) -> ArchConfig:
        from tessera import hf_config

        return hf_config.load(path)

    def to_hf_dict(self, fmt: Literal["auto", "family", "nemotron-nas", "tessera"] = "auto") -> dict[str, Any]:
        """config.json contents in a format of tessera/hf_config.py ("auto": the family's own when it can)."""
        from tessera import hf_config

        return hf_config.to_dict(self, fmt)

    def save_json(self, path: str | Path, fmt: Literal["auto", "family", "nemotron-nas", "tessera"] = "auto") -> None:
        from tessera import hf_config

        hf_config.save(self, path, fmt)
