"""The search space (search/library.py): the block variants per layer and their names."""

from __future__ import annotations

from tessera.config import AttentionConfig, BlockConfig, FFNConfig
from tessera.search.library import SearchSpace, block_from_name

from .conftest import tiny_arch


def test_search_space_variants():
    arch = tiny_arch()
    space = SearchSpace(ffn_ratios=(1.0, 0.75, 0.5, 0.25, 0.1))
    assert [a.name for a in space.attention_variants(arch, 0)] == [
        "gqa_kv4",
        "gqa_kv2",
        "gqa_kv1",
        "attn_linear",
        "attn_none",
    ]
    # 96 · ratio rounded to the multiple (hidden 64 -> 16), never below one multiple
    widths = [f.intermediate_size for f in space.ffn_variants(arch, 0) if f.kind == "swiglu"]
    assert widths == sorted({16 * max(1, round(r * 96 / 16)) for r in space.ffn_ratios}, reverse=True)
    assert len(space.block_variants(arch, 0)) == 5 * (len(widths) + 2)
    assert block_from_name("gqa_kv2+ffn_48") == BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 48))
    assert block_from_name("attn_none+ffn_linear") == BlockConfig(AttentionConfig("none"), FFNConfig("linear"))
