"""Initialising a child block from the parent's layer (search/init.py): merged KV heads, linear attention and
linear FFNs, pruned FFN channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.config import AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import Model
from tessera.search.init import ffn_channel_scores, init_layer

from .conftest import FFN96, FP32_EXACT, GQA4, relative_error, tiny_arch


def run_layer(model: Model, layer, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    from tessera.runtime.model import Batch

    batch = Batch.sequences(lengths, h.device)
    cos, sin = model.rope_tables(batch.positions)
    return layer(h, batch, cos, sin)


def test_kv_heads_averaging_is_exact_when_merged_heads_agree():
    parent = Model(tiny_arch(1)).init_weights(std=0.1, seed=2).eval()  # its own: the weights are edited
    layer = parent.layers[0]
    d = 8
    with torch.no_grad():
        qkv = layer.self_attn.w_qkv.clone()
        k = qkv[64 : 64 + 4 * d].view(4, d, 64)
        v = qkv[64 + 4 * d :].view(4, d, 64)
        k[1], k[3], v[1], v[3] = k[0], k[2], v[0], v[2]  # heads (0,1) and (2,3) identical
        layer.self_attn.w_qkv.copy_(qkv)
    child = init_layer(parent.arch, layer, BlockConfig(AttentionConfig("gqa", 2), FFN96), 0)
    h = torch.randn(40, 64)
    assert relative_error(run_layer(parent, child, h, [17, 23]), run_layer(parent, layer, h, [17, 23])) < FP32_EXACT


def test_linear_attention_is_attention_when_each_token_sees_only_itself(parent):
    layer = parent.layers[1]
    child = init_layer(parent.arch, layer, BlockConfig(AttentionConfig("linear"), FFN96), 1)
    h = torch.randn(12, 64)  # 12 sequences of one token: softmax over one key is 1, attention = W_o·v
    assert relative_error(run_layer(parent, child, h, [1] * 12), run_layer(parent, layer, h, [1] * 12)) < FP32_EXACT


def test_linear_ffn_is_down_times_up(parent):
    layer = parent.layers[0]
    child = init_layer(parent.arch, layer, BlockConfig(GQA4, FFNConfig("linear")), 0)
    x = torch.randn(9, 64)
    _, up = layer.mlp.w_gate_up.chunk(2)
    expected = x + F.linear(F.linear(layer.post_attention_layernorm(x), up), layer.mlp.w_down)
    assert relative_error(child.feed_forward(x), expected) < FP32_EXACT


def test_pruning_drops_the_channels_that_contribute_nothing():
    model = Model(tiny_arch(1)).init_weights(std=0.1, seed=1).eval()
    layer = model.layers[0]
    dead = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:48]
    with torch.no_grad():
        layer.mlp.w_down[:, dead] = 0  # half the channels write nothing
    mids = torch.randn(256, 64)
    scores = ffn_channel_scores(layer, mids)
    assert scores[dead].abs().max() == 0 and (scores.clamp_min(0) > 0).sum() == 48
    child = init_layer(model.arch, layer, BlockConfig(GQA4, FFNConfig("swiglu", 48)), 0, scores)
    assert relative_error(child.feed_forward(mids), layer.feed_forward(mids)) < FP32_EXACT
    with pytest.raises(ValueError, match="needs channel scores"):
        init_layer(model.arch, layer, BlockConfig(GQA4, FFNConfig("swiglu", 48)), 0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_merge_with_the_families_biases_and_norms(family):
    """Qwen2's k/v biases merge with their heads, Qwen3's q/k norms carry over: exact when merged heads agree."""
    import dataclasses

    arch = dataclasses.replace(tiny_arch(1), family=family)
    parent = Model(arch).init_weights(std=0.1, seed=3).eval()
    attn, d = parent.layers[0].self_attn, 8
    with torch.no_grad():
        for param in (attn.w_qkv, *((attn.b_qkv,) if family == "qwen2" else ())):
            k = param[64 : 64 + 4 * d].view(4, d, -1)
            v = param[64 + 4 * d :].view(4, d, -1)
            k[1], k[3], v[1], v[3] = k[0], k[2], v[0], v[2]
        if family == "qwen3":
            attn.k_norm.weight.uniform_(0.5, 1.5)
    child = init_layer(arch, parent.layers[0], BlockConfig(AttentionConfig("gqa", 2), FFN96), 0)
    h = torch.randn(40, 64)
    assert (
        relative_error(run_layer(parent, child, h, [17, 23]), run_layer(parent, parent.layers[0], h, [17, 23]))
        < FP32_EXACT
    )


def test_windowed_variant_copies_the_parent_and_only_the_far_keys_change():
    """A window changes no weight: the child equals the parent on sequences no longer than the window and
    differs past it."""
    parent = Model(tiny_arch(1)).init_weights(std=0.3, seed=4).eval()
    child = init_layer(parent.arch, parent.layers[0], BlockConfig(AttentionConfig("gqa", 4, window=10), FFN96), 0)
    assert all(torch.equal(a, b) for a, b in zip(child.state_dict().values(), parent.layers[0].state_dict().values()))
    short, long = torch.randn(10, 64), torch.randn(30, 64)
    torch.testing.assert_close(run_layer(parent, child, short, [10]), run_layer(parent, parent.layers[0], short, [10]))
    assert relative_error(run_layer(parent, child, long, [30]), run_layer(parent, parent.layers[0], long, [30])) > 1e-3
