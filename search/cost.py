"""The cost model: each block variant's runtime measured on this device, a model's latency predicted as a sum.

Everything is timed through the serving engine (runtime/engine.py): its prefill chunks and its decode steps,
with the paged KV cache, the kernels it serves with and, on CUDA, its decode CUDA graphs, so what is measured is
what is served. For a scenario (batch, prompt length, generated length), `engine_step_ms` times a model's
prefill of batch prompts (every step until each has sampled its first token) and its decode step at the
first and the last decode length (attention cost is linear in the context, so their mean is the mean over the
whole generation). A block's runtime is prefill + (gen_len − 1) × mean decode step: the first generated token
comes from the prefill's logits.

Blocks are timed as stacks of STACK_COPIES copies with distinct random weights (timed alone, a block finds its
weights and inputs still in cache and reads 13 % faster than inside a model: demo parent, 2-core Xeon,
prefill), by difference with a stack of as many no-op blocks, so that what the engine does around the layers
(embedding, LM head, sampling, scheduling) cancels: a block costs (its stack − the no-op stack) / STACK_COPIES.
(Differences between stacks of 8 and 4 of the demo parent's blocks gave about the same decode cost per block,
1.0 ms against 0.92, 2-core Xeon, from noisier differences of larger times.) Every stack is timed once per
round, round-robin over CALIBRATION_ROUNDS rounds, and the medians kept: a machine that speeds up or slows down
during calibration then meets every block alike (on a shared 2-core VM, one pass in order gave the demo's cost
model a 24 % mean error, the rounds 4.6 %).

What is not a block is measured as whole generations (`Generator`, the engine) of a stack of the reference
block (the first that is not a no-op: the parent's) minus its blocks' runtime; among real layers the LM head's
weights fall out of cache, which a model of no-op layers would not show. Predicted latency = non-block + Σ
blocks (Puzzle's additivity assumption). The model reports its own error: predicted vs measured end-to-end
latency of random architectures.

Memory comes from the config formulas (weights + batch × sequence × KV bytes), never from a measurement.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from tessera.config import EMPTY_BLOCK, ArchConfig, BlockConfig, dtype_bytes
from tessera.devices import device_name, dtype_name, median_ms, synchronize
from tessera.errors import UserError
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.generate import Generator
from tessera.runtime.model import Model
from tessera.runtime.sampling import SamplingParams

MIB = 2**20
_BLOCK_KEYS = ("prefill_ms", "decode_ms", "runtime_ms")
STACK_COPIES = 4
CALIBRATION_ROUNDS = 3
DECODE_STEPS = 24  # decode steps timed at each context (their median); the context grows by one per step


@dataclass(frozen=True)
class Scenario:
    batch: int = 8
    prompt_len: int = 128
    gen_len: int = 64

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise UserError(f"scenario {name} must be >= 1, got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def check_context(self, arch: ArchConfig) -> None:
        if self.seq_len > arch.max_position_embeddings:
            raise UserError(
                f"scenario prompt {self.prompt_len} + generated {self.gen_len} tokens exceeds the model's context "
                f"({arch.max_position_embeddings}, max_position_embeddings)"
            )


@torch.inference_mode()
def engine_step_ms(model: Model, scenario: Scenario) -> dict[str, float]:
    """Milliseconds the serving engine spends on `model` in the scenario: prefill_ms, the median of whole
    prefills of batch prompts (chunked as served: every step until each prompt has sampled its first token),
    and decode_ms, the mean over the first and the last decode length of the median decode step (batch
    tokens, all requests decoding; CUDA graphs on CUDA)."""
    scenario.check_context(model.arch)
    device = model.embed_tokens.weight.device
    b, p, g = scenario.batch, scenario.prompt_len, scenario.gen_len
    config = EngineConfig(max_batch=b)
    # Prompts are prefilled in chunks of max_step_tokens, decodes first: the first prompts done decode up to
    # `ahead` tokens while the last are still prefilling. Their budget and the context leave room for that.
    ahead = -(-b * scenario.seq_len // max(config.max_step_tokens, b))
    length = min(model.arch.max_position_embeddings, scenario.seq_len + DECODE_STEPS + 4 + ahead)
    engine = Engine(model, None, replace(config, max_model_len=length))
    prompts = _prompts(model.arch, scenario)

    def prefill() -> None:
        for prompt in prompts:
            engine.add_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        while engine.has_work():
            engine.step()

    def decode_at(position: int) -> float:
        """Median decode step with all batch requests decoding, their contexts around `position` (centred on the
        timed steps)."""
        steps = min(DECODE_STEPS, length - ahead - 4)
        if steps < 1:
            raise UserError(f"the model's context ({length} tokens) is too short to time decode steps")
        start = max(1, min(position - steps // 2, length - steps - ahead - 3))
        for prompt in prompts:
            engine.add_request((prompt * -(-start // p))[:start], SamplingParams(steps + ahead + 2, ignore_eos=True))
        while engine.waiting or any(r.computed < r.prompt_len for r in engine.running):
            engine.step()  # prefill, untimed
        engine.step()  # one untimed decode step
        assert len(engine.running) == b, "a request finished before its decode steps were timed"
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            engine.step()
            synchronize(device)
            times.append((time.perf_counter() - begin) * 1e3)
        engine.abort_all()
        return statistics.median(times)

    prefill_ms = median_ms(prefill, device, min_reps=3, budget_s=0)
    decode = [decode_at(position) for position in sorted({p, p + g - 2})] if g > 1 else []
    return {"prefill_ms": prefill_ms, "decode_ms": statistics.mean(decode) if decode else 0.0}


def stack_ms(
    arch: ArchConfig, block: BlockConfig, copies: int, scenario: Scenario, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """engine_step_ms of a model of `copies` `block`s with random weights."""
    model = Model.empty(arch.with_blocks([block] * copies), device, dtype).init_weights(seed=0)
    return engine_step_ms(model, scenario)


def _prompts(arch: ArchConfig, scenario: Scenario) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(arch.vocab_size) for _ in range(scenario.prompt_len)] for _ in range(scenario.batch)]


def measure_latency(model: Model, scenario: Scenario, repeats: int = 3) -> float:
    """Median milliseconds of a whole generation (prefill + gen_len tokens, EOS ignored) through `Generator`."""
    scenario.check_context(model.arch)
    device = model.embed_tokens.weight.device
    generator, prompts = Generator(model), _prompts(model.arch, scenario)
    params = SamplingParams(max_new_tokens=scenario.gen_len, ignore_eos=True)
    return median_ms(lambda: generator.generate(prompts, params), device, min_reps=repeats, budget_s=0)


def block_memory_mib(arch: ArchConfig, block: BlockConfig, scenario: Scenario, dtype: torch.dtype) -> float:
    """Weights + the KV cache of `batch` sequences of prompt + generated tokens (config formulas)."""
    name = dtype_name(dtype)
    weights = arch.block_params(block) * dtype_bytes(name)
    kv = scenario.batch * scenario.seq_len * arch.kv_bytes_per_token_layer(block, name)
    return (weights + kv) / MIB


def non_block_memory_mib(arch: ArchConfig, dtype: torch.dtype) -> float:
    """Embedding, LM head and final norm."""
    non_block = arch.num_params() - sum(arch.block_params(b) for b in arch.blocks)
    return non_block * dtype_bytes(dtype_name(dtype)) / MIB


@dataclass
class CostTable:
    """Measured costs for one device, dtype and scenario: what `tessera calibrate` writes."""

    device: str
    dtype: str
    scenario: Scenario
    non_block_ms: float
    non_block_memory_mib: float
    blocks: dict[str, dict[str, float]]  # block name -> prefill_ms, decode_ms, runtime_ms
    validation: dict | None = None

    def runtime_ms(self, blocks: list[BlockConfig] | tuple[BlockConfig, ...]) -> float:
        return self.non_block_ms + sum(self.blocks[b.name]["runtime_ms"] for b in blocks)

    def to_json(self) -> dict:
        return {**asdict(self), "scenario": asdict(self.scenario)}

    @classmethod
    def from_json(cls, data: dict) -> CostTable:
        return cls(**{**data, "scenario": Scenario(**data["scenario"])})


def calibrate(
    arch: ArchConfig,
    blocks: list[BlockConfig],
    scenario: Scenario,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> CostTable:
    """Time every distinct block in `blocks` (the first that is not a no-op is the reference) and the non-block
    part on this device, round-robin (module docstring)."""
    scenario.check_context(arch)
    distinct = list(dict.fromkeys(blocks))
    timed = [b for b in distinct if not b.is_empty]  # a no-op block costs nothing, by definition
    if not timed:
        raise UserError("every block is a no-op: there is nothing to time")
    reference = timed[0]
    stack = STACK_COPIES
    runs: dict[str, Callable[[], dict[str, float]]] = {
        b.name: functools.partial(stack_ms, arch, b, stack, scenario, device, dtype) for b in [EMPTY_BLOCK, *timed]
    }
    reference_model = Model.empty(arch.with_blocks([reference] * stack), device, dtype).init_weights(seed=0)
    runs["generation"] = lambda: {"latency_ms": measure_latency(reference_model, scenario, repeats=1)}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    with tqdm(
        total=CALIBRATION_ROUNDS * len(runs), desc="timing blocks", disable=not progress, dynamic_ncols=True
    ) as bar:
        for _ in range(CALIBRATION_ROUNDS):
            for name, run in runs.items():
                samples[name].append(run())
                bar.update()
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in samples.items()}
    around = med[EMPTY_BLOCK.name]

    def block_ms(name: str) -> dict[str, float]:
        # A block cheaper than the timer's noise can come out below zero: it costs nothing measurable.
        ms = {k: max(0.0, med[name][k] - around[k]) / stack for k in ("prefill_ms", "decode_ms")}
        return {**ms, "runtime_ms": ms["prefill_ms"] + (scenario.gen_len - 1) * ms["decode_ms"]}

    table = {b.name: block_ms(b.name) if not b.is_empty else dict.fromkeys(_BLOCK_KEYS, 0.0) for b in distinct}
    return CostTable(
        device=device_name(device),
        dtype=dtype_name(dtype),
        scenario=scenario,
        non_block_ms=med["generation"]["latency_ms"] - stack * table[reference.name]["runtime_ms"],
        non_block_memory_mib=non_block_memory_mib(arch, dtype),
        blocks=table,
    )


def validate(
    table: CostTable,
    arch: ArchConfig,
    choices: list[list[BlockConfig]],
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> dict:
    """Predicted vs measured end-to-end latency of each architecture (random weights); stored in the table."""
    rows = []
    for blocks in tqdm(choices, desc="validating cost model", disable=not progress, dynamic_ncols=True):
        model = Model.empty(arch.with_blocks(blocks), device, dtype).init_weights(seed=0)
        measured = measure_latency(model, table.scenario)
        predicted = table.runtime_ms(blocks)
        rows.append(
            {
                "blocks": [b.name for b in blocks],
                "predicted_ms": predicted,
                "measured_ms": measured,
                "error": (predicted - measured) / measured,
            }
        )
    errors = [abs(r["error"]) for r in rows]
    table.validation = {
        "architectures": rows,
        "mean_abs_error": statistics.mean(errors),
        "max_abs_error": max(errors),
        "mean_signed_error": statistics.mean(r["error"] for r in rows),
    }
    return table.validation


def random_architectures(variants: list[list[BlockConfig]], n: int, seed: int = 0) -> list[list[BlockConfig]]:
    """n architectures drawn uniformly per layer from each layer's variants."""
    rng = random.Random(seed)
    return [[rng.choice(layer) for layer in variants] for _ in range(n)]
