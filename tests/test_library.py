"""The search space (search/library.py): the block variants per layer and their names."""

from __future__ import annotations

from tessera.config import AttentionConfig, BlockConfig, FFNConfig
from tessera.search.library import SearchSpace, block_from_name

from .conftest import FFN96, tiny_arch


def test_search_space_variants():
    arch = tiny_arch()
    space = SearchSpace(ffn_ratios=(1.0, 0.75, 0.5, 0.25, 0.1), ffn_multiple=16)
    assert [a.name for a in space.attention_variants(arch, 0)] == [
        "gqa_kv4",
        "gqa_kv2",
        "gqa_kv1",
        "attn_linear",
        "attn_none",
    ]
    # 96 · ratio rounded to the multiple, never below one multiple
    widths = [f.intermediate_size for f in space.ffn_variants(arch, 0) if f.kind == "swiglu"]
    assert widths == sorted({16 * max(1, round(r * 96 / 16)) for r in space.ffn_ratios}, reverse=True)
    assert len(space.block_variants(arch, 0)) == 5 * (len(widths) + 2)
    assert block_from_name("gqa_kv2+ffn_48") == BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 48))
    # KV-head counts that leave the parent's out still keep it (the parent's blocks are timed and scored as
    # the reference); without it, calibration failed on the parent's block after timing every other one.
    assert [a.name for a in SearchSpace(kv_heads=(2, 1)).attention_variants(arch, 0)][:3] == [
        "gqa_kv4",
        "gqa_kv2",
        "gqa_kv1",
    ]
    assert block_from_name("attn_none+ffn_linear") == BlockConfig(AttentionConfig("none"), FFNConfig("linear"))


def test_a_switched_off_kind_the_parent_has_stays_a_choice():
    """--no-linear-attention and --no-linear-ffn turn off replacements, not the parent's own blocks: a
    Nemotron-51B-like parent keeps its linear layers as choices (without them calibration failed on the parent's
    block), while its GQA layers get no linear replacement."""
    base = tiny_arch()
    g = base.blocks[0]
    linear = BlockConfig(AttentionConfig("linear"), FFNConfig("linear"))
    arch = base.with_blocks([g, linear, *base.blocks[2:]])
    space = SearchSpace(linear_attention=False, linear_ffn=False, ffn_multiple=16)
    assert [a.name for a in space.attention_variants(arch, 1)] == ["attn_linear", "attn_none"]
    assert [f.name for f in space.ffn_variants(arch, 1)] == ["ffn_linear", "ffn_none"]
    assert linear in space.block_variants(arch, 1)
    assert "attn_linear" not in {a.name for a in space.attention_variants(arch, 0)}
    assert "ffn_linear" not in {f.name for f in space.ffn_variants(arch, 0)}


def test_default_widths_are_ones_every_nemotron_nas_reader_builds():
    """By default every pruned width is one `ffn_mult` expresses (vLLM's rule, written out here): the export
    of any child then needs no tessera-only width. The demo parent gets 768/512/256; Llama-3.1-8B's 14336 five
    widths; a parent narrower than 256 keeps its own width only."""
    import dataclasses

    def theirs(width: int, hidden: int) -> int:  # find_multiple(int(2 * ffn_mult * hidden / 3), 256)
        n = int(2 * (width * 3 / (2 * hidden)) * hidden / 3)
        return -(-n // 256) * 256

    space = SearchSpace()
    for hidden, width, expected in ((256, 768, [768, 512, 256]), (4096, 14336, [14336, 10752, 7168, 3584, 1536])):
        base = tiny_arch()
        arch = dataclasses.replace(
            base, hidden_size=hidden, blocks=(BlockConfig(AttentionConfig("gqa", 4), FFNConfig("swiglu", width)),)
        )
        widths = [f.intermediate_size for f in space.ffn_variants(arch, 0) if f.kind == "swiglu"]
        assert widths == expected
        assert all(theirs(w, hidden) == w for w in widths)
    assert [f.intermediate_size for f in space.ffn_variants(tiny_arch(), 0) if f.kind == "swiglu"] == [96]


def test_windowed_variants_beside_each_kv_count_never_wider_than_the_parents():
    """`windows` adds a windowed variant beside each KV-head count; a windowed parent keeps its own window and
    offers only narrower ones. Names round-trip through block_from_name."""
    import dataclasses

    space = SearchSpace(kv_heads=(4, 1), windows=(512, 32), linear_attention=False, no_attention=False)
    names = [a.name for a in space.attention_variants(tiny_arch(), 0)]
    assert names == ["gqa_kv4", "gqa_kv4_w512", "gqa_kv4_w32", "gqa_kv1", "gqa_kv1_w512", "gqa_kv1_w32"]
    windowed = dataclasses.replace(tiny_arch(1), blocks=(BlockConfig(AttentionConfig("gqa", 4, window=64), FFN96),))
    assert [a.name for a in space.attention_variants(windowed, 0)] == [
        "gqa_kv4_w64",
        "gqa_kv4_w32",
        "gqa_kv1_w64",
        "gqa_kv1_w32",
    ]
    for a in space.attention_variants(tiny_arch(), 0):
        block = BlockConfig(a, FFN96)
        assert block_from_name(block.name) == block
