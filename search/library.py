"""The search space and the block library: which variants each layer may take, and what each one costs and scores.

Search space (Puzzle §3): per layer, attention is GQA with any KV-head count that divides the parent's, each
with the parent's own window and, when asked (`windows`), narrower ones (as gpt-oss-puzzle chooses 128, 8192
or full per layer), a single [H, H] linear layer, or nothing; the FFN is a SwiGLU at a list of width ratios of
the parent's (rounded to a hardware-friendly multiple), a linear layer, or nothing. A block variant is one
(attention, FFN) pair, named by `BlockConfig.name` ("gqa_kv2+ffn_384", "gqa_kv8_w128+ffn_1024",
"attn_none+ffn_linear").

The block library is JSON in the schema of NVIDIA's published Puzzle demo, so libraries are portable between
tools: `{"layer_0": {"<variant>": {"stats": {...}, "metrics": {...}}, ...}, ...}`. The MIP reads any numeric
`stats.*` / `metrics.*` key; tessera's own libraries also carry the block's shape in `stats` so a choice of
variant names can be assembled back into a model.

Libraries are written atomically (tessera/files.py), as is everything else the search writes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig, read_json
from tessera.errors import UserError
from tessera.files import atomic_write_text

Library = dict[str, dict[str, dict[str, dict[str, Any]]]]


class LibraryError(UserError):
    """A block library file that does not follow the schema; the message names the file and the entry."""


@dataclass(frozen=True)
class SearchSpace:
    """Which variants every layer may take; the defaults are Puzzle's (54 options per layer on Llama-70B)."""

    kv_heads: tuple[int, ...] | None = None  # None: every divisor of the parent layer's KV-head count
    ffn_ratios: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.1)
    # Every pruned FFN width is a multiple of this. 256 keeps GEMMs on whole tensor-core tiles and is the only
    # grid a nemotron-nas config expresses: vLLM, SGLang, TensorRT-LLM and mlx-lm size an FFN as
    # find_multiple(int(2 * ffn_mult * hidden / 3), 256) from its ffn_mult, ignoring a per-block width. Another
    # multiple makes children only tessera loads (their export says so). A parent width below it stays the only one.
    ffn_multiple: int = 256
    linear_attention: bool = True
    no_attention: bool = True
    linear_ffn: bool = True
    no_ffn: bool = True
    # Attention windows offered beside each KV-head count (narrower than the parent layer's own, if it has one).
    # None by default: a window saves KV memory and time only where contexts outgrow it, so a search asks for
    # it with scenarios that long (`--windows 128,512`, text of twice the widest: `--seq-len 1024`, OptimizeConfig).
    windows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(type(w) is not int or w < 1 for w in self.windows):
            raise UserError(f"windows must be numbers of keys >= 1, got {self.windows}")
        if any(not 0 < r <= 1 for r in self.ffn_ratios):
            raise UserError(f"ffn_ratios must lie in (0, 1], got {self.ffn_ratios}")
        if self.ffn_multiple < 1:
            raise UserError(f"ffn_multiple must be >= 1, got {self.ffn_multiple}")

    def attention_variants(self, arch: ArchConfig, layer: int) -> list[AttentionConfig]:
        parent = arch.blocks[layer].attention
        out: list[AttentionConfig] = []
        if parent.kind == "gqa":
            counts = self.kv_heads or tuple(k for k in range(parent.n_kv_heads, 0, -1) if parent.n_kv_heads % k == 0)
            # The parent's own attention is always a choice (as its FFN is): the search is timed and scored
            # against the parent, whose blocks must be in the library.
            counts = (parent.n_kv_heads, *(k for k in counts if k != parent.n_kv_heads))
            # The parent's window (None: full) first; a window never widens: the weights never saw further back.
            narrower = sorted({w for w in self.windows if parent.window is None or w < parent.window}, reverse=True)
            windows = [parent.window, *narrower]
            out += [AttentionConfig("gqa", k, window=w) for k in counts if parent.n_kv_heads % k == 0 for w in windows]
        # Switches add replacements; the parent's own kind is offered whatever they say.
        if parent.kind == "linear" or (parent.kind == "gqa" and self.linear_attention):
            out.append(AttentionConfig("linear"))
        if self.no_attention or parent.kind == "none":
            out.append(AttentionConfig("none"))
        return out

    def ffn_variants(self, arch: ArchConfig, layer: int) -> list[FFNConfig]:
        parent = arch.blocks[layer].ffn
        out: list[FFNConfig] = []
        if parent.kind == "swiglu":
            m = self.ffn_multiple
            widths = {
                min(parent.intermediate_size, max(m, m * round(r * parent.intermediate_size / m)))
                for r in self.ffn_ratios
            }
            widths.add(parent.intermediate_size)  # the parent's own FFN is always a choice
            out += [FFNConfig("swiglu", w) for w in sorted(widths, reverse=True)]
        if parent.kind == "linear" or (parent.kind == "swiglu" and self.linear_ffn):
            out.append(FFNConfig("linear"))
        if self.no_ffn or parent.kind == "none":
            out.append(FFNConfig("none"))
        return out

    def block_variants(self, arch: ArchConfig, layer: int) -> list[BlockConfig]:
        return [BlockConfig(a, f) for a in self.attention_variants(arch, layer) for f in self.ffn_variants(arch, layer)]


_NAME = re.compile(
    r"^(?:gqa_kv(?P<kv>\d+)(?:_w(?P<window>\d+))?|attn_(?P<att>linear|none))\+ffn_(?:(?P<width>\d+)|(?P<ffn>linear|none))$"
)


def block_from_name(name: str) -> BlockConfig:
    """Inverse of `BlockConfig.name`: "gqa_kv2_w128+ffn_384" -> BlockConfig(gqa 2 window 128, swiglu 384)."""
    m = _NAME.match(name)
    if m is None:
        raise LibraryError(
            f"variant {name!r}: expected a tessera block name like 'gqa_kv4+ffn_768' or 'attn_none+ffn_linear'"
        )
    window = int(m["window"]) if m["window"] else None
    att = AttentionConfig("gqa", int(m["kv"]), window=window) if m["kv"] else AttentionConfig(m["att"])
    ffn = FFNConfig("swiglu", int(m["width"])) if m["width"] else FFNConfig(m["ffn"])
    return BlockConfig(att, ffn)


def shape_stats(arch: ArchConfig, block: BlockConfig) -> dict[str, Any]:
    """The block's shape and size, as tessera writes them into a library entry's stats."""
    return {
        "attention_kind": block.attention.kind,
        "num_kv_heads": block.attention.n_kv_heads or 0,
        "attention_window": block.attention.window or 0,
        "ffn_kind": block.ffn.kind,
        "ffn_intermediate_size": block.ffn.intermediate_size or 0,
        "num_params": arch.block_params(block),
        "attention_num_params": arch.attention_params(block.attention),
        "ffn_num_params": arch.ffn_params(block.ffn),
    }


def layer_names(library: Library) -> list[str]:
    """The library's layer keys in layer order ("layer_2" before "layer_10")."""

    def order(key: str) -> tuple[int, str]:
        digits = re.findall(r"\d+", key)
        return (int(digits[-1]) if digits else -1, key)

    return sorted(library, key=order)


def read_library(path: str | Path) -> Library:
    path = Path(path)
    data = read_json(path, "a block library JSON", LibraryError)
    check_library(data, str(path))
    return data


def check_library(data: Any, source: str = "library") -> None:
    if not isinstance(data, dict) or not data:
        raise LibraryError(f"{source}: expected a non-empty object of layers {{'layer_0': {{variant: entry}}}}")
    for layer, variants in data.items():
        if not isinstance(variants, dict) or not variants:
            raise LibraryError(f"{source}: {layer}: expected a non-empty object of variants")
        for name, entry in variants.items():
            if not isinstance(entry, dict):
                raise LibraryError(f"{source}: {layer}/{name}: expected an object with 'stats' and 'metrics'")
            for part in ("stats", "metrics"):
                if not isinstance(entry.get(part, {}), dict):
                    raise LibraryError(f"{source}: {layer}/{name}: '{part}' must be an object")


def write_library(library: Library, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(library, indent=1) + "\n")


def value(entry: dict[str, Any], key: str) -> Any:
    """entry["stats"]["runtime_ms"] for key "stats.runtime_ms" (None when absent)."""
    part, _, field = key.partition(".")
    return entry.get(part, {}).get(field) if field else None


def choices_to_blocks(library: Library, choices: dict[str, str]) -> list[BlockConfig]:
    """The chosen variant names, in layer order, as block configs (tessera-named libraries only)."""
    return [block_from_name(choices[layer]) for layer in layer_names(library)]
