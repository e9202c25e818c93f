"""The cost model (search/cost.py): block memory, scenarios, calibration and validation, and what it times."""

from __future__ import annotations

import json

import pytest
import torch

from tessera import kernels
from tessera.config import EMPTY_BLOCK, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.engine import Engine
from tessera.search import cost
from tessera.search.cost import (
    CostTable,
    Scenario,
    Timing,
    block_memory_mib,
    calibrate,
    lockstep,
    random_architectures,
    timing_models,
)

from .conftest import SPACE, tiny_arch


def test_block_memory_is_weights_plus_kv():
    arch, sc = tiny_arch(), Scenario(batch=3, prompt_len=10, gen_len=6)
    block = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 48))
    params = (64 * 64 + 2 * 64 * 16 + 64 * 64 + 64) + (3 * 64 * 48 + 64)
    kv = 3 * 16 * 2 * 2 * 8 * 4  # batch · tokens · (k, v) · heads · head_dim · fp32 bytes
    assert block_memory_mib(arch, block, sc, torch.float32) == pytest.approx((params * 4 + kv) / 2**20)
    assert block_memory_mib(arch, BlockConfig(AttentionConfig("none"), FFNConfig("none")), sc, torch.float32) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, kernels.FP8])
def test_block_and_non_block_memory_add_up_to_the_models_weights(dtype):
    """What a memory budget prices (non-block memory plus each block's) is what `ArchConfig.weight_bytes` counts,
    in FP8 the LM head's FP8 copy included (1 GB on Llama-3.1-70B, left out before)."""
    from tessera.devices import dtype_name
    from tessera.hf_config import load
    from tessera.search.cost import non_block_memory_mib

    from .conftest import REPO

    arch = load(REPO / "configs" / "llama-3_1-nemotron-51b-instruct.json")
    one = Scenario(batch=1, prompt_len=1, gen_len=1)  # and the KV of one 2-token sequence
    priced = non_block_memory_mib(arch, dtype) + sum(block_memory_mib(arch, b, one, dtype) for b in arch.blocks)
    name = dtype_name(dtype)
    assert priced == pytest.approx((arch.weight_bytes(name) + arch.kv_bytes(2, name)) / 2**20, rel=1e-12)


def test_scenario_checks():
    with pytest.raises(ValueError, match="gen_len must be >= 1"):
        Scenario(gen_len=0)
    with pytest.raises(ValueError, match=r"exceeds the model's context \(128"):
        Scenario(prompt_len=100, gen_len=40).check_context(tiny_arch())


def test_calibrate_and_validate_on_a_tiny_model():
    # A scenario with enough work that the full block stands out of the timer's noise: at batch 2, 8 + 4 tokens every
    # block's difference came out at 0 once on CI (a loaded 2-core VM).
    arch, sc = tiny_arch(), Scenario(batch=4, prompt_len=32, gen_len=8)
    variants = [SPACE.block_variants(arch, i) for i in range(arch.n_layers)]
    choice = random_architectures(variants, 2, seed=0)
    table = calibrate(
        arch, [b for v in variants for b in v], sc, torch.device("cpu"), torch.float32, choice, rounds=2, progress=False
    )
    assert set(table.blocks) == {b.name for b in variants[0]}
    for name, t in table.blocks.items():
        # Differences of timings: a block of this tiny model can be below the timer's noise, never below 0.
        assert min(t.values()) >= 0, name
    assert sum(t["runtime_ms"] for t in table.blocks.values()) > 0
    assert table.blocks["attn_none+ffn_none"] == {"prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}
    result = table.validation
    assert result["rounds"] == 2 and len(result["architectures"]) == 2
    for row, blocks in zip(result["architectures"], choice):
        assert row["predicted_ms"] == pytest.approx(
            table.non_block_ms + sum(table.blocks[b.name]["runtime_ms"] for b in blocks)
        )
        assert row["measured_ms"] > 0 and row["round_spread"] >= 0
        assert row["error"] == pytest.approx((row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"])
    again = CostTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.runtime_ms(choice[0]) == table.runtime_ms(choice[0])


def test_the_table_is_composed_from_stack_differences(monkeypatch):
    """Hand-computed: with the lockstep's timings given, every stack ends in the parent's block (the context), a
    block costs (its stack − the no-op stack) / 4, the non-block part is the no-op stack less the context block's
    share, and an architecture is predicted as non-block + Σ blocks."""
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    context = arch.blocks[0]
    full = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 96))
    small = BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", 32))
    given = {  # the models calibrate builds, in order: no-op stack, one stack per timed block, then the checks
        0: Timing(latency_ms=50.0, prefill_ms=10.0, decode_ms=2.0, rounds_ms=(50.0, 55.0)),
        1: Timing(latency_ms=90.0, prefill_ms=18.0, decode_ms=3.0, rounds_ms=(90.0, 99.0)),
        2: Timing(latency_ms=46.0, prefill_ms=12.0, decode_ms=1.0, rounds_ms=(46.0, 46.0)),  # below the no-op: 0
        3: Timing(latency_ms=70.0, prefill_ms=14.0, decode_ms=2.5, rounds_ms=(70.0, 70.0)),  # the context's own
        4: Timing(latency_ms=64.0, prefill_ms=0.0, decode_ms=0.0, rounds_ms=(60.0, 64.0, 72.0)),
    }
    built, scrubbed = [], []

    def fake_lockstep(models, scenario, rounds, desc=None, scrub=False):
        built.extend(tuple(b.name for b in m.arch.blocks) for m in models)
        scrubbed.append(scrub)
        return [given[k] for k in range(len(models))]

    monkeypatch.setattr(cost, "lockstep", fake_lockstep)
    check = [[full, small]]
    table = calibrate(arch, [full, small, full, EMPTY_BLOCK], sc, torch.device("cpu"), torch.float32, check)
    stack = [(b.name,) * 4 + (context.name,) for b in (EMPTY_BLOCK, full, small, context)]
    assert built == [*stack, (full.name, small.name)] and scrubbed == [False]
    assert table.non_block_ms == 50.0 - (70.0 - 50.0) / 4 and table.context_block == context.name
    assert table.blocks[full.name] == {"prefill_ms": 2.0, "decode_ms": 0.25, "runtime_ms": 10.0}
    assert table.blocks[small.name] == {"prefill_ms": 0.5, "decode_ms": 0.0, "runtime_ms": 0.0}
    assert table.blocks[EMPTY_BLOCK.name] == {"prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}
    assert context.name not in table.blocks  # timed for the non-block part, not asked for
    (row,) = table.validation["architectures"]
    assert row["predicted_ms"] == 55.0 and row["measured_ms"] == 64.0
    assert row["error"] == pytest.approx(-9 / 64) and row["round_spread"] == pytest.approx(12 / 64)

    # Asked for, the context block is priced like any block, and its share still comes off the non-block part;
    # the scrub, asked for, reaches the lockstep.
    built.clear()
    table = calibrate(arch, [context, full], sc, torch.device("cpu"), torch.float32, scrub=True)
    assert built == [(b.name,) * 4 + (context.name,) for b in (EMPTY_BLOCK, context, full)] and scrubbed[-1]
    assert table.blocks[context.name]["runtime_ms"] == (90.0 - 50.0) / 4
    assert table.non_block_ms == 50.0 - (90.0 - 50.0) / 4 and table.blocks[full.name]["runtime_ms"] == 0.0


def test_the_context_block_has_the_kinds_that_cost_once_a_step_then_is_the_most_common():
    arch = tiny_arch()
    full = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 96))
    narrow = BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 32))
    attention_only = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("none"))
    ffn_only = BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", 96))
    linear = BlockConfig(AttentionConfig("linear"), FFNConfig("none"))
    assert cost.context_block(arch.with_blocks([linear, full, full, EMPTY_BLOCK, EMPTY_BLOCK, EMPTY_BLOCK])) == full
    assert cost.context_block(arch.with_blocks([ffn_only, ffn_only, ffn_only, full])) == full  # GQA first
    assert cost.context_block(arch.with_blocks([ffn_only, attention_only])) == attention_only
    assert cost.context_block(arch.with_blocks([linear, ffn_only, ffn_only])) == ffn_only
    assert cost.context_block(arch.with_blocks([narrow, full, full])) == full  # the most common
    assert cost.context_block(arch.with_blocks([narrow, full])) == narrow  # the first of equals
    assert cost.context_block(arch.with_blocks([EMPTY_BLOCK] * 2)) is None


def test_lockstep_alternates_engines_and_takes_each_steps_median(monkeypatch):
    """The engines step in turn, one step each; a step slowed in one round (another process) is dropped by the
    median over rounds, and the latency is the sum of the per-step medians."""
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    models = timing_models(arch, [arch.blocks, [EMPTY_BLOCK] * 2], torch.device("cpu"), torch.float32)
    order, clock, spike_at = [], [0.0], [-1]
    real_step = Engine.step

    def step(self):
        order.append(next(i for i, m in enumerate(models) if m is self.model))
        # Model 0's steps take 3 ms, model 1's 1 ms, but for one step of 100 ms.
        clock[0] += 100.0 if len(order) == spike_at[0] else (3.0 if order[-1] == 0 else 1.0)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0] / 1e3)
    lockstep(models, sc, rounds=2)
    steps = len(order) // 6  # one generation's steps: 3 rounds (1 untimed) of 2 engines
    assert order == [0, 1] * (3 * steps)
    order.clear()
    spike_at[0] = 2 * steps + 5  # in the first timed round
    slow, fast = lockstep(models, sc, rounds=3)
    assert slow.latency_ms == pytest.approx(3.0 * steps) and fast.latency_ms == pytest.approx(1.0 * steps)
    assert max(slow.rounds_ms) == pytest.approx(3.0 * steps + 97.0)  # the spike is in its round's total
    # A scrub takes time too, but before the clock starts: the timings do not change.
    monkeypatch.setattr(cost, "cache_scrubber", lambda device: lambda: clock.__setitem__(0, clock[0] + 50.0))
    order.clear()
    slow, fast = lockstep(models, sc, rounds=3, scrub=True)
    assert slow.latency_ms == pytest.approx(3.0 * steps) and fast.latency_ms == pytest.approx(1.0 * steps)


def test_every_timed_step_starts_after_a_cache_scrub(monkeypatch):
    """With `scrub`, each engine step of the timed rounds comes right after a scrub of the cache (whatever the
    model before it left there is gone); the untimed warm-up round has none. By default there is none at all."""
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    models = timing_models(arch, [arch.blocks, [EMPTY_BLOCK] * 2], torch.device("cpu"), torch.float32)
    events = []
    real_step = Engine.step
    monkeypatch.setattr(cost, "cache_scrubber", lambda device: lambda: events.append("scrub"))
    monkeypatch.setattr(Engine, "step", lambda self: events.append("step") or real_step(self))
    lockstep(models, sc, rounds=2, scrub=True)
    per_round = len(events) // 5  # the warm-up's steps, then 2 rounds of (scrub, step) pairs
    assert events[:per_round] == ["step"] * per_round
    assert events[per_round:] == ["scrub", "step"] * (2 * per_round)
    events.clear()
    lockstep(models, sc, rounds=2)
    assert events == ["step"] * (3 * per_round)


def test_the_cost_model_times_the_engine_step(monkeypatch):
    """What the cost model times is what serving runs: whole `Engine.step`s, prefill and decode-only steps, with
    the attention kernel each step serves with: the varlen kernel for a step of fresh prompts (all its keys in
    the step), the paged op over the paged KV cache for decode steps. Each step is planned with the tokens before
    it known (no async scheduling, which would run a step inside the call timing the one before)."""
    arch, steps, kernel_calls = tiny_arch(), [], []
    real_batch = Engine._step_batch

    def step_batch(self, plan, ahead=None):
        assert ahead is None and not self.async_scheduling  # each step timed alone: none planned ahead
        steps.append([n for _, n in plan])
        kernel_calls.append([])
        return real_batch(self, plan)

    monkeypatch.setattr(Engine, "_step_batch", step_batch)
    for name in ("attention_paged", "attention_prefill"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name, **k: kernel_calls[-1].append(_n) or _r(*a, **k))
    (model,) = timing_models(arch, [[arch.blocks[0]] * 4], torch.device("cpu"), torch.float32)
    (timed,) = lockstep([model], Scenario(batch=2, prompt_len=8, gen_len=4), rounds=1)
    assert timed.prefill_ms > 0 and timed.decode_ms > 0
    assert steps == [[8, 8], [1, 1], [1, 1], [1, 1]] * 2  # prompts prefilled together, then decodes; 2 rounds
    prefill, decode = ["attention_prefill"] * 4, ["attention_paged"] * 4  # each step's 4 GQA blocks
    assert kernel_calls == [prefill, decode, decode, decode] * 2


def test_models_that_do_not_fit_together_are_timed_in_groups_scaled_by_their_clock(monkeypatch):
    """With room for about two stacks at a time, calibration runs in groups, each led by the no-op stack; a
    group timed while the machine ran at half speed is scaled back by its no-op stack's time (hand-computed)."""
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    context = arch.blocks[0]
    full = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 96))
    small = BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", 32))
    linear = BlockConfig(AttentionConfig("linear"), FFNConfig("none"))

    def size(blocks):  # bytes, as calibration's memory check counts them (weights and KV cache)
        return sum(block_memory_mib(arch, b, sc, torch.float32) for b in blocks) * 2**20

    stacks = [size([b] * 4 + [context]) for b in (full, small, linear, context)]
    room = size([EMPTY_BLOCK] * 4 + [context]) + max(stacks) + min(stacks) + 1  # the clock, largest and smallest
    monkeypatch.setattr(cost, "available_memory", lambda device: 2 * room)
    groups, slow = [], [1.0]

    def fake_lockstep(models, scenario, rounds, desc=None, scrub=False):
        names = [m.arch.blocks[0].name for m in models]
        groups.append(names)
        base = {EMPTY_BLOCK.name: 10.0, full.name: 30.0, small.name: 14.0, linear.name: 18.0, context.name: 22.0}
        factor = slow[0]
        slow[0] = 2.0  # every group after the first runs at half speed
        return [Timing(base[n] * factor, 0.0, 0.0, (base[n] * factor,)) for n in names]

    monkeypatch.setattr(cost, "lockstep", fake_lockstep)
    table = calibrate(arch, [full, small, linear], sc, torch.device("cpu"), torch.float32, rounds=1, progress=False)
    assert len(groups) > 1 and all(g[0] == EMPTY_BLOCK.name for g in groups)
    assert sorted(n for g in groups for n in g[1:]) == sorted([full.name, small.name, linear.name, context.name])
    assert table.non_block_ms == pytest.approx(10.0 - (22 - 10) / 4)
    assert table.blocks[full.name]["runtime_ms"] == pytest.approx((30 - 10) / 4)
    assert table.blocks[small.name]["runtime_ms"] == pytest.approx((14 - 10) / 4)
    assert table.blocks[linear.name]["runtime_ms"] == pytest.approx((18 - 10) / 4)


def test_a_model_larger_than_half_the_free_memory_is_refused(monkeypatch):
    arch, sc = tiny_arch(), Scenario(batch=2, prompt_len=8, gen_len=4)
    monkeypatch.setattr(cost, "available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"timing needs .* GiB for one model of 5 blocks"):
        calibrate(arch, [arch.blocks[0]], sc, torch.device("cpu"), torch.float32, progress=False)
