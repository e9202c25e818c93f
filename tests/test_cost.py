"""The cost model (search/cost.py): block memory, scenarios, calibration and validation, and what it times."""

from __future__ import annotations

import json

import pytest
import torch

from tessera import kernels
from tessera.config import AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.engine import Engine
from tessera.search.cost import (
    CostTable,
    Scenario,
    block_memory_mib,
    calibrate,
    random_architectures,
    stack_ms,
    validate,
)

from .conftest import SPACE, tiny_arch


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
    timed = stack_ms(
        arch, arch.blocks[0], 4, Scenario(batch=2, prompt_len=8, gen_len=4), torch.device("cpu"), torch.float32
    )
    assert timed["prefill_ms"] > 0 and timed["decode_ms"] > 0
    assert [8, 8] in steps and [1, 1] in steps  # the batch's prompts prefilled together; decode steps of both
    assert len(paged) == 4 * len(steps)  # each step's 4 GQA blocks


def test_decode_steps_are_timed_with_the_whole_batch_decoding(monkeypatch):
    """20 prompts of 60 tokens take 3 chunked prefill steps of 512 tokens, the first ones decoding meanwhile:
    every decode-only step the cost model times still has all 20 requests in it (none has run out of tokens)."""
    arch, plans = tiny_arch(), []
    real_batch = Engine._step_batch
    monkeypatch.setattr(
        Engine, "_step_batch", lambda self, plan: plans.append([n for _, n in plan]) or real_batch(self, plan)
    )
    stack_ms(arch, arch.blocks[0], 1, Scenario(batch=20, prompt_len=60, gen_len=4), torch.device("cpu"), torch.float32)
    decode_only = [len(plan) for plan in plans if set(plan) == {1}]
    assert decode_only and set(decode_only) == {20}
