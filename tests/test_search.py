"""Puzzle's stages on a tiny random parent: initialisation, BLD, scoring, cost model, GKD, assembly/export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera import kernels
from tessera.cli import main
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.engine import Engine
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.search import activations
from tessera.search.assemble import assemble_child, build_layer
from tessera.search.bld import BLDConfig, SublayerStore, run_bld, trainings
from tessera.search.cost import (
    CostTable,
    Scenario,
    block_memory_mib,
    calibrate,
    random_architectures,
    stack_ms,
    validate,
)
from tessera.search.gkd import GKDConfig, distill, gkd_loss
from tessera.search.init import ffn_channel_scores, init_layer
from tessera.search.library import SearchSpace, block_from_name
from tessera.search.pipeline import greedy_baseline, uniform_baseline
from tessera.search.scoring import model_quality, parent_logprobs, replace_one_block, score_library

from .conftest import relative_error

FP32_EXACT = 1e-5  # same math in a different order (fp32 GEMMs of width ≤ 96): ~1e-7 seen, 1e-5 bound
GQA4, FFN96 = AttentionConfig("gqa", 4), FFNConfig("swiglu", 96)


def tiny_arch(layers: int = 3) -> ArchConfig:
    return ArchConfig(
        vocab_size=97,
        hidden_size=64,
        n_heads=8,
        head_dim=8,
        blocks=(BlockConfig(GQA4, FFN96),) * layers,
        max_position_embeddings=128,
        eos_token_ids=(0,),
        dtype="float32",
    )


@pytest.fixture(scope="module")
def parent() -> Model:
    torch.manual_seed(0)
    model = Model(tiny_arch()).init_weights(std=0.1, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def windows(n: int, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def run_layer(model: Model, layer, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    from tessera.runtime.model import Batch

    batch = Batch.sequences(lengths, h.device)
    cos, sin = model.rope_tables(batch.positions)
    return layer(h, batch, cos, sin)


BLD_CONFIG = BLDConfig(steps=80, batch_windows=8, lr=3e-3, eval_windows=8)
SPACE = SearchSpace(kv_heads=(4, 2), ffn_ratios=(1.0, 0.5), ffn_multiple=16)


# Initialisation from the parent


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


# BLD, scoring, assembly


@pytest.fixture(scope="module")
def trained(parent, tmp_path_factory):
    acts = activations.record(parent, windows(40, t=32), progress=False)
    store = SublayerStore(tmp_path_factory.mktemp("bld"))
    losses = run_bld(parent, acts, SPACE, store, BLD_CONFIG, False)
    return store, losses


def test_bld_trains_every_variant_and_improves_it(trained, parent):
    _, losses = trained
    expected = {(i, v.name) for i, _, v in trainings(parent.arch, SPACE)}
    assert {(int(layer.split("_")[1]), name) for layer, d in losses.items() for name in d} == expected
    for layer, d in losses.items():
        for name, r in d.items():
            assert r["nmse_final"] < r["nmse_init"], f"{layer} {name}: {r['nmse_init']:.3f} -> {r['nmse_final']:.3f}"


def test_bld_resumes_without_retraining(trained, parent, monkeypatch):
    store, losses = trained
    import tessera.search.bld as bld

    monkeypatch.setattr(bld, "train", lambda *a, **k: pytest.fail("retrained a variant already in the store"))
    acts = activations.record(parent, windows(40, t=32), progress=False)
    again = run_bld(parent, acts, SPACE, SublayerStore(store.root), BLD_CONFIG, False)
    assert again == losses


def test_replace_one_block_with_the_parent_layer_scores_zero(parent):
    acts = activations.record(parent, windows(4, seed=1), progress=False)
    ref = parent_logprobs(parent, acts)
    got = replace_one_block(parent, parent.layers[1], 1, acts, ref)
    assert abs(got["kl_div"]) < 1e-6
    assert got["lm_loss"] == pytest.approx(model_quality(parent, acts.tokens, None)["lm_loss"], rel=1e-5)


def test_replace_one_block_equals_the_assembled_model(trained, parent):
    """Scoring from cached activations must give what the whole swapped model gives from the tokens."""
    store, _ = trained
    acts = activations.record(parent, windows(4, seed=2), progress=False)
    ref = parent_logprobs(parent, acts)
    for i, name in [(0, "gqa_kv2+ffn_48"), (2, "attn_linear+ffn_none"), (1, "attn_none+ffn_linear")]:
        block = block_from_name(name)
        scored = replace_one_block(parent, build_layer(parent, store, i, block), i, acts, ref)
        blocks = list(parent.arch.blocks)
        blocks[i] = block
        whole = model_quality(assemble_child(parent, store, blocks), acts.tokens, ref)
        assert scored["kl_div"] == pytest.approx(whole["kl_div"], rel=1e-4, abs=1e-7)
        assert scored["lm_loss"] == pytest.approx(whole["lm_loss"], rel=1e-5)
        assert scored["kl_div"] > 0


def test_score_library_covers_every_variant(trained, parent):
    store, _ = trained
    acts = activations.record(parent, windows(2, seed=3), progress=False)
    scores = score_library(parent, store, SPACE, acts, progress=False)
    for i in range(parent.arch.n_layers):
        names = {b.name for b in SPACE.block_variants(parent.arch, i)}
        assert set(scores[f"layer_{i}"]) == names
        assert scores[f"layer_{i}"][parent.arch.blocks[i].name]["kl_div"] == 0.0
        assert scores[f"layer_{i}"]["attn_none+ffn_none"]["kl_div"] > 0


def test_child_exports_as_nemotron_nas_and_loads_back(trained, parent, tmp_path, capsys):
    store, _ = trained
    blocks = [block_from_name(n) for n in ("gqa_kv2+ffn_48", "attn_linear+ffn_linear", "attn_none+ffn_96")]
    child = assemble_child(parent, store, blocks)
    path = save_model(child, tmp_path / "child")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 3
    loaded = load_model(path)
    assert loaded.arch.blocks == tuple(blocks)
    tokens = windows(2, seed=4)[:, :-1]
    assert relative_error(loaded(tokens), child(tokens)) < FP32_EXACT
    assert main(["info", "--model", str(path)]) == 0
    assert "gqa kv=2" in capsys.readouterr().out


# Cost model


def test_block_memory_is_weights_plus_kv():
    arch, sc = tiny_arch(), Scenario(batch=3, prompt_len=10, gen_len=6)
    block = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 48))
    params = (64 * 64 + 2 * 64 * 16 + 64 * 64 + 64) + (3 * 64 * 48 + 64)
    kv = 3 * 16 * 2 * 2 * 8 * 4  # batch · tokens · (k, v) · heads · head_dim · fp32 bytes
    assert block_memory_mib(arch, block, sc, torch.float32) == pytest.approx((params * 4 + kv) / 2**20)
    assert block_memory_mib(arch, BlockConfig(AttentionConfig("none"), FFNConfig("none")), sc, torch.float32) == 0


def test_scenario_checks():
    with pytest.raises(ValueError, match="gen_len must be >= 1"):
        Scenario(gen_len=0)
    with pytest.raises(ValueError, match=r"exceeds the model's context \(128"):
        Scenario(prompt_len=100, gen_len=40).check_context(tiny_arch())


def test_calibrate_and_validate_on_a_tiny_model():
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    variants = [SPACE.block_variants(arch, i) for i in range(arch.n_layers)]
    table = calibrate(arch, [b for v in variants for b in v], sc, torch.device("cpu"), torch.float32, progress=False)
    assert set(table.blocks) == {b.name for b in variants[0]}
    for name, t in table.blocks.items():
        assert t["runtime_ms"] == pytest.approx(t["prefill_ms"] + 3 * t["decode_ms"])
        # Differences of timings: a block of this tiny model can be below the timer's noise, never below 0.
        assert t["prefill_ms"] >= 0 and t["decode_ms"] >= 0, name
    assert sum(t["runtime_ms"] for t in table.blocks.values()) > 0
    assert table.blocks["attn_none+ffn_none"] == {"prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}
    choice = random_architectures(variants, 2, seed=0)
    result = validate(table, arch, choice, torch.device("cpu"), torch.float32, progress=False)
    for row, blocks in zip(result["architectures"], choice):
        assert row["predicted_ms"] == pytest.approx(
            table.non_block_ms + sum(table.blocks[b.name]["runtime_ms"] for b in blocks)
        )
        assert row["measured_ms"] > 0
    again = CostTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.runtime_ms(choice[0]) == table.runtime_ms(choice[0])


def test_the_cost_model_times_the_engine_step(monkeypatch):
    """What the cost model times is what serving runs: whole `Engine.step`s, prefill chunks and decode-only
    steps, whose attention is the paged op over the paged KV cache; the uncached attention that training uses
    is never called."""
    arch, steps, paged = tiny_arch(), [], []
    real_batch, real_paged = Engine._step_batch, kernels.attention_paged

    def step_batch(self, plan):
        steps.append([n for _, n in plan])
        return real_batch(self, plan)

    monkeypatch.setattr(Engine, "_step_batch", step_batch)
    monkeypatch.setattr(kernels, "attention_paged", lambda *a: paged.append(a[-1]) or real_paged(*a))
    monkeypatch.setattr(kernels, "attention_prefill", lambda *a, **k: pytest.fail("uncached attention was timed"))
    timed = stack_ms(arch, arch.blocks[0], 4, Scenario(batch=2, prompt_len=8, gen_len=4), torch.device("cpu"),
                     torch.float32)  # fmt: skip
    assert timed["prefill_ms"] > 0 and timed["decode_ms"] > 0
    assert [8, 8] in steps and [1, 1] in steps  # the batch's prompts prefilled together; decode steps of both
    assert len(paged) == 4 * len(steps)  # each step's 4 GQA blocks


def test_decode_steps_are_timed_with_the_whole_batch_decoding(monkeypatch):
    """20 prompts of 60 tokens take 3 chunked prefill steps of 512 tokens, the first ones decoding meanwhile:
    every decode-only step the cost model times still has all 20 requests in it (none has run out of tokens)."""
    arch, plans = tiny_arch(), []
    real_batch = Engine._step_batch
    monkeypatch.setattr(Engine, "_step_batch", lambda self, plan: plans.append([n for _, n in plan]) or
                        real_batch(self, plan))  # fmt: skip
    stack_ms(arch, arch.blocks[0], 1, Scenario(batch=20, prompt_len=60, gen_len=4), torch.device("cpu"),
             torch.float32)  # fmt: skip
    decode_only = [len(plan) for plan in plans if set(plan) == {1}]
    assert decode_only and set(decode_only) == {20}


# Baselines and GKD


def _toy_library() -> dict:
    # Layer 1 is sensitive; uniform must shrink it anyway, greedy and the MIP need not.
    kl = {"big": (0.0, 0.0), "small": (0.01, 1.0)}
    return {
        f"layer_{i}": {
            name: {"stats": {"runtime_ms": rt}, "metrics": {"kl_div": kl[tag][i == 1]}}
            for name, tag, rt in (("gqa_kv4+ffn_96", "big", 1.0), ("gqa_kv2+ffn_48", "small", 0.5))
        }
        for i in range(3)
    }


def test_uniform_and_greedy_baselines():
    from tessera.search.mip import Bound

    lib, arch = _toy_library(), tiny_arch()
    bounds = [Bound("stats.runtime_ms", upper=2.5)]
    assert [b.name for b in uniform_baseline(lib, arch, bounds)] == ["gqa_kv2+ffn_48"] * 3
    assert [b.name for b in greedy_baseline(lib, arch, bounds)] == [
        "gqa_kv2+ffn_48",
        "gqa_kv4+ffn_96",
        "gqa_kv4+ffn_96",
    ]
    assert greedy_baseline(lib, arch, [Bound("stats.runtime_ms", upper=1.0)]) is None


def test_gkd_loss_is_zero_for_the_parent_and_training_lowers_it(trained, parent):
    store, _ = trained
    tokens = windows(2, seed=5)[:, :-1]
    assert gkd_loss(parent, parent, tokens).item() == pytest.approx(0, abs=1e-5)
    blocks = [block_from_name(n) for n in ("gqa_kv2+ffn_48", "gqa_kv4+ffn_48", "attn_none+ffn_96")]
    child = assemble_child(parent, store, blocks)
    stream = np.random.default_rng(0).integers(0, 97, 4000).astype(np.uint16)
    probe = torch.from_numpy(stream[:33].astype(np.int64))[None, :-1]
    before = gkd_loss(child, parent, probe).item()
    distill(child, parent, stream, GKDConfig(steps=30, batch_size=4, seq_len=32, lr=3e-3), progress=False)
    with torch.no_grad():
        assert gkd_loss(child, parent, probe).item() < 0.9 * before  # 0.99 -> 0.81 seen
