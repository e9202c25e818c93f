"""The cost model: each block variant's runtime measured on this device, a model's latency predicted as a sum.

Everything is timed through the serving engine (runtime/engine.py): whole generations of a scenario (batch
prompts of prompt_len tokens, gen_len tokens generated each, EOS ignored) as the engine serves them, its
chunked prefill steps and its decode steps over the paged KV cache, with the kernels it serves with and, on
CUDA, its decode CUDA graphs. So what is measured is what is served.

Timing is in lockstep (`lockstep`): every model under test has an engine of its own, and the engines take
their steps in turn, one step each, round after round. A shared machine changes speed within seconds (the
2-core dev VM: the same generation took 420 ms, then 650 ms for a stretch, with no steal time accounted);
models stepped alternately a few milliseconds apart meet every change alike, so their ratios hold where
separate timings do not (a child against its parent: 9 % coefficient of variation timed alternately a
generation at a time, 0.7 % in lockstep on a quiet stretch and about ±3 % on a busy one, 2-core Xeon). Each
step's time is the median over the rounds, which
drops a step that another process interrupted; a generation's latency is the sum of its steps.

Blocks are timed as stacks of STACK_COPIES copies with distinct random weights, next to a stack of as many
no-op blocks, in one lockstep: a block costs (its stack − the no-op stack) / STACK_COPIES. Every stack, the no-op
one too, ends in one more block, the same for all: the parent's most common block with GQA attention and a
SwiGLU FFN (`context_block`). A model's first layer of a kind
carries costs that its later layers share, once a step (measured, not broken down: the engine builds a step's KV
block tables and attention metadata once per KV group, all full-attention layers being one group and each
attention window another; on the AMD EPYC VM, with the demo's shapes, a model
of one GQA layer took 16-17 ms a generation more than one layer's share of a stack of eight, one of an FFN-only
layer 8 ms). A
stack timed against nothing but no-op blocks spread them over its copies, a quarter on each, so the prediction
came out 1.5-4.1 % high for the demo parent (eight GQA layers: the shared cost counted twice) and up to 5 % low
for architectures with few such layers. Beside the context block every timed model pays them once and they
cancel. What is not a block (embedding, LM head, sampling, scheduling, and those shared costs) is the no-op
stack's latency less the context block's own share. So an architecture with no layer of the context block's
kinds at all (no GQA layer, say) is predicted high by what it does not pay: the linear MIP cannot price a
cost paid once if any layer has it, and no child of the demo runs measured lacked them (docs/optimize.md).
Likewise a windowed block's stack pays its window group's once-a-step cost beside the context block's group, so
that cost is spread a quarter on each windowed copy; windows are off by default and this is not corrected.
Predicted latency = non-block + Σ blocks (Puzzle's additivity assumption). All the models in a lockstep share one
embedding and LM head (so memory holds one copy).

A timed step can start from a cold cache (`scrub`, off by default: `devices.cache_scrubber` streams twice the
last-level cache through it just before the clock starts). Without it a step's time depends on the model stepped
before it where the models are about the size of the cache: on the 2-core AMD EPYC VM (32 MiB L3) a one-layer
model of the demo's width took 97.7 ms a generation right after the 8-layer parent and 81.8 ms right after the
no-op stack (ad hoc, not committed). A model far larger than the cache (any real LLM, on any device) starts every
step cold either way. For the demo the scrub narrowed the scatter of the prediction's error from one calibration
to the next, but made each calibration about 20 % slower, and it times a small model as one that never finds
itself in cache, whereas served alone it does; `tessera bench cost-model` measures both on the CPU
(docs/optimize.md).

The model checks itself: whole architectures (the parent and random ones drawn from the library) run in the
same lockstep as the stacks, and their measured latencies are compared with the predictions. In the same
lockstep, because an absolute millisecond figure on a shared machine holds only for the minute it was
measured in: what the search relies on (a speedup is a ratio to the parent) carries over, and an absolute
latency budget holds for the machine as fast as it was during calibration.

Memory comes from the config formulas (weights + batch × sequence × KV bytes), never from a measurement.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from tessera.config import EMPTY_BLOCK, ArchConfig, BlockConfig, activation_dtype, dtype_bytes
from tessera.devices import available_memory, cache_scrubber, device_name, dtype_name, synchronize
from tessera.errors import UserError
from tessera.kernels import FP8
from tessera.runtime.cache import kept_tokens
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.model import Model
from tessera.runtime.sampling import SamplingParams
from tessera.search.library import SearchSpace

MIB = 2**20
STACK_COPIES = 4
CALIBRATION_ROUNDS = 3  # timed lockstep rounds (after one untimed warm-up round)


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

    KEY_PATTERN = r"b\d+_p\d+_g\d+"  # what `key` gives, for finding keyed files

    @property
    def key(self) -> str:
        """'b8_p128_g64': names this scenario's runtime in a block library (`stats.runtime_ms_b8_p128_g64`)."""
        return f"b{self.batch}_p{self.prompt_len}_g{self.gen_len}"

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """'BATCHxPROMPTxGEN' (e.g. '1x128x64') -> Scenario."""
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"scenario {text!r}: expected BATCHxPROMPTxGEN, e.g. 1x128x64")
        return cls(*(int(p) for p in parts))

    def check_context(self, arch: ArchConfig) -> None:
        if self.seq_len > arch.max_position_embeddings:
            raise UserError(
                f"scenario prompt {self.prompt_len} + generated {self.gen_len} tokens exceeds the model's context "
                f"({arch.max_position_embeddings}, max_position_embeddings)"
            )


@dataclass(frozen=True)
class Timing:
    """One model's generation in a lockstep, from the median of each engine step over the rounds."""

    latency_ms: float  # the whole generation: every step's median, summed
    prefill_ms: float  # the steps until every prompt has been read (its first token sampled)
    decode_ms: float  # the mean decode-only step after them (all requests decoding)
    rounds_ms: tuple[float, ...]  # each round's whole generation (the spread between rounds)

    def scaled(self, factor: float) -> Timing:
        return Timing(
            self.latency_ms * factor,
            self.prefill_ms * factor,
            self.decode_ms * factor,
            tuple(r * factor for r in self.rounds_ms),
        )


def _prompts(arch: ArchConfig, scenario: Scenario) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(arch.vocab_size) for _ in range(scenario.prompt_len)] for _ in range(scenario.batch)]


@torch.inference_mode()
def lockstep(
    models: Sequence[Model],
    scenario: Scenario,
    rounds: int = CALIBRATION_ROUNDS,
    desc: str | None = None,
    scrub: bool = False,
) -> list[Timing]:
    """Time one generation of `scenario` by each model, the engines stepping in turn (module docstring): one
    untimed round (allocation, first calls), then `rounds` timed ones, each step after a cache scrub when
    `scrub` (module docstring). A tqdm bar over the rounds when `desc`."""
    if not models or rounds < 1:
        raise ValueError("lockstep needs at least one model and one round")
    arch = models[0].arch
    for model in models:
        scenario.check_context(model.arch)
    device = models[0].embed_tokens.weight.device
    # Every round serves the same prompts: from the prefix cache, the timed rounds would skip their prefill. Each
    # step is timed alone, so none runs ahead (async scheduling on CUDA): a step planned ahead would run inside the
    # call before it, beside another engine's. The host's work a step hides that way is the same for every block.
    config = EngineConfig(
        max_batch=scenario.batch, max_model_len=scenario.seq_len, prefix_caching=False, async_scheduling=False
    )
    engines = [Engine(model, None, config) for model in models]
    prompts = _prompts(arch, scenario)
    params = SamplingParams(max_new_tokens=scenario.gen_len, ignore_eos=True)
    scrub_cache = cache_scrubber(device) if scrub else None
    samples: list[list[list[float]]] = [[] for _ in engines]  # engine -> round -> step ms
    prefill_steps = [0] * len(engines)
    for r in tqdm(range(rounds + 1), desc=desc, disable=desc is None, dynamic_ncols=True, leave=False):
        for engine in engines:
            for prompt in prompts:
                engine.add_request(prompt, params)
        steps: list[list[float]] = [[] for _ in engines]
        active = list(range(len(engines)))
        while active:
            for i in active:
                engine = engines[i]
                if r == 0 and (engine.waiting or any(q.computed < q.prompt_len for q in engine.running)):
                    prefill_steps[i] += 1  # the schedule is the same every round: counted once
                if r > 0 and scrub_cache is not None:  # the warm-up round is not timed: no scrub
                    scrub_cache()
                    synchronize(device)
                begin = time.perf_counter()
                engine.step()
                synchronize(device)
                steps[i].append((time.perf_counter() - begin) * 1e3)
            active = [i for i in active if engines[i].has_work()]
        if r > 0:
            for i, times in enumerate(steps):
                samples[i].append(times)
    timings = []
    for runs, n_prefill in zip(samples, prefill_steps):
        if len({len(times) for times in runs}) != 1:
            raise RuntimeError("the engine took a different number of steps in different rounds")
        per_step = [statistics.median(step) for step in zip(*runs)]
        decode = per_step[n_prefill:]
        timings.append(
            Timing(
                latency_ms=sum(per_step),
                prefill_ms=sum(per_step[:n_prefill]),
                decode_ms=statistics.mean(decode) if decode else 0.0,
                rounds_ms=tuple(sum(times) for times in runs),
            )
        )
    return timings


def timing_models(
    arch: ArchConfig, architectures: Sequence[Sequence[BlockConfig]], device: torch.device, dtype: torch.dtype
) -> list[Model]:
    """Models of `arch`'s shape with these blocks and random weights (seeded), all sharing one embedding, final
    norm and LM head (in FP8, its one FP8 copy): timing needs the work, not a copy of the vocabulary matrices per
    model."""
    fp8 = dtype == FP8  # drawn in bf16, then quantized (Model.to_fp8)
    compute = torch.bfloat16 if fp8 else dtype
    shared = Model.empty(arch.with_blocks([EMPTY_BLOCK]), device, compute).init_weights(seed=0)
    if fp8:
        shared.to_fp8()
    models = []
    for k, blocks in enumerate(architectures):
        model = Model.empty(arch.with_blocks(list(blocks)), "meta", compute)
        model.embed_tokens, model.norm, model.lm_head = shared.embed_tokens, shared.norm, shared.lm_head
        model.lm_head_fp8, model.lm_head_fp8_scale = shared.lm_head_fp8, shared.lm_head_fp8_scale
        model.layers.to_empty(device=device)
        model.init_weights(seed=1 + k, layers_only=True)
        models.append(model.to_fp8() if fp8 else model)
    return models


def block_memory_mib(arch: ArchConfig, block: BlockConfig, scenario: Scenario, dtype: torch.dtype) -> float:
    """Weights + the KV cache of `batch` sequences of prompt + generated tokens (config formulas; a windowed
    layer what the serving cache keeps: its window_pages of 16-token pages at the default step budget,
    runtime/cache.py)."""
    name = dtype_name(dtype)
    weights = arch.block_params(block) * dtype_bytes(name)
    kept = kept_tokens(block.attention.window, scenario.seq_len) if block.attention.kind == "gqa" else 0
    kv = scenario.batch * kept * arch.kv_bytes_per_token_layer(block, name)
    return (weights + kv) / MIB


def non_block_memory_mib(arch: ArchConfig, dtype: torch.dtype) -> float:
    """Embedding, LM head and final norm (in FP8 too, bf16: tessera.config.activation_dtype), and in FP8 the LM
    head's FP8 copy beside them: what `ArchConfig.weight_bytes` counts outside the blocks."""
    name = dtype_name(dtype)
    non_block = arch.num_params() - sum(arch.block_params(b) for b in arch.blocks)
    return (non_block * dtype_bytes(activation_dtype(name)) + arch.head_copy_bytes(arch.vocab_size, name)) / MIB


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
    context_block: str | None = None  # the block every stack was timed beside (None: a table from before it)

    def runtime_ms(self, blocks: Sequence[BlockConfig]) -> float:
        return self.non_block_ms + sum(self.blocks[b.name]["runtime_ms"] for b in blocks)

    def to_json(self) -> dict:
        return {**asdict(self), "scenario": asdict(self.scenario)}

    @classmethod
    def from_json(cls, data: dict) -> CostTable:
        return cls(**{**data, "scenario": Scenario(**data["scenario"])})


def context_block(arch: ArchConfig) -> BlockConfig | None:
    """The block every timed stack runs beside (module docstring): of the parent's blocks that are not no-ops,
    one with GQA attention and a SwiGLU FFN if it has such (they carry the once-a-step costs: a GQA block's
    stack must not pay them alone), else one with GQA, then the most common, the first of equals; None for a
    parent of no-op blocks only."""
    counts = Counter(b for b in arch.blocks if not b.is_empty)
    if not counts:
        return None
    return max(counts, key=lambda b: (b.attention.kind == "gqa", b.ffn.kind == "swiglu", counts[b]))


def _spread(rounds: Sequence[float]) -> float:
    """(max − min) / median of a model's per-round latencies."""
    return (max(rounds) - min(rounds)) / statistics.median(rounds)


def calibrate(
    arch: ArchConfig,
    blocks: Sequence[BlockConfig],
    scenario: Scenario,
    device: torch.device,
    dtype: torch.dtype,
    validate: Sequence[Sequence[BlockConfig]] = (),
    rounds: int = CALIBRATION_ROUNDS,
    progress: bool = True,
    scrub: bool = False,
) -> CostTable:
    """Time every distinct block in `blocks` as a stack beside `arch`'s context block, and the no-op stack
    beside it, in one lockstep (module docstring); the architectures in `validate` run in the same lockstep and
    are compared with the prediction (`CostTable.validation`). `scrub`: as `lockstep`'s."""
    scenario.check_context(arch)
    distinct = list(dict.fromkeys(blocks))
    timed = [b for b in distinct if not b.is_empty]  # a no-op block costs nothing, by definition
    if not timed:
        raise UserError("every block is a no-op: there is nothing to time")
    context = context_block(arch)
    if context is not None and context not in timed:
        timed.append(context)  # its share comes off the no-op stack's time
    beside = [] if context is None else [context]
    stacks = [[block] * STACK_COPIES + beside for block in [EMPTY_BLOCK, *timed]]
    timings = _lockstep_in_groups(arch, [*stacks, *validate], scenario, device, dtype, rounds, progress, scrub)
    around, by_block = timings[0], dict(zip(timed, timings[1 : len(stacks)]))
    shares = {b: _block_entry(by_block.get(b), around) for b in [*distinct, *beside]}

    table = CostTable(
        device=device_name(device),
        dtype=dtype_name(dtype),
        scenario=scenario,
        non_block_ms=around.latency_ms - (shares[context]["runtime_ms"] if context is not None else 0.0),
        non_block_memory_mib=non_block_memory_mib(arch, dtype),
        blocks={b.name: shares[b] for b in distinct},
        context_block=None if context is None else context.name,
    )
    if validate:
        table.validation = _validation(table, validate, timings[len(stacks) :], rounds)
    return table


def _lockstep_in_groups(
    arch: ArchConfig,
    architectures: Sequence[Sequence[BlockConfig]],
    scenario: Scenario,
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    progress: bool,
    scrub: bool,
) -> list[Timing]:
    """`lockstep` of a model per architecture, as many at a time as half the free memory holds (all of them,
    for the demo; a 16-layer parent of hidden 2048 needs several groups). The first architecture (the no-op
    stack: the shared embedding and head, and the context block) runs in every group as its clock: groups run
    minutes apart, so each group's timings are scaled by its clock against the first group's."""
    groups = _memory_groups(arch, architectures, scenario, dtype, int(0.5 * available_memory(device)))
    timings: list[Timing | None] = [None] * len(architectures)
    for k, group in enumerate(groups):
        desc = (
            None
            if not progress
            else "timing blocks" + (f" (group {k + 1} of {len(groups)})" if len(groups) > 1 else "")
        )
        models = timing_models(arch, [architectures[i] for i in group], device, dtype)
        measured = lockstep(models, scenario, rounds, desc=desc, scrub=scrub)
        del models
        factor = 1.0 if timings[0] is None else timings[0].latency_ms / measured[0].latency_ms
        for i, t in zip(group, measured):
            if timings[i] is None:
                timings[i] = t.scaled(factor)
    return timings


def _memory_groups(
    arch: ArchConfig,
    architectures: Sequence[Sequence[BlockConfig]],
    scenario: Scenario,
    dtype: torch.dtype,
    budget: int,
) -> list[list[int]]:
    """Indices of `architectures` in groups whose weights and KV pools (config formulas) fit in `budget` bytes,
    in order, each led by index 0; one architecture larger than the budget is refused."""

    def size(blocks: Sequence[BlockConfig]) -> float:
        return sum(block_memory_mib(arch, b, scenario, dtype) for b in blocks) * MIB

    clock = size(architectures[0])
    groups: list[list[int]] = [[0]]
    used = clock
    for i in range(1, len(architectures)):
        need = size(architectures[i])
        if clock + need > budget:
            raise UserError(
                f"timing needs {(clock + need) / 2**30:.1f} GiB for one model of {len(architectures[i])} blocks and "
                f"has {budget / 2**30:.1f} GiB (half the free memory): free memory, or time a smaller scenario"
            )
        if used + need > budget and len(groups[-1]) > 1:
            groups.append([0])
            used = clock
        groups[-1].append(i)
        used += need
    return groups


def _block_entry(stack: Timing | None, around: Timing) -> dict[str, float]:
    """A block's share of its stack's timing over the no-op stack's; a no-op block (None) costs nothing."""
    if stack is None:
        return {"prefill_ms": 0.0, "decode_ms": 0.0, "runtime_ms": 0.0}
    # A block cheaper than the timer's noise can come out below zero: it costs nothing measurable.
    share = {k: max(0.0, getattr(stack, k) - getattr(around, k)) / STACK_COPIES for k in ("prefill_ms", "decode_ms")}
    return {**share, "runtime_ms": max(0.0, stack.latency_ms - around.latency_ms) / STACK_COPIES}


def _validation(
    table: CostTable, architectures: Sequence[Sequence[BlockConfig]], timings: Sequence[Timing], rounds: int
) -> dict:
    rows = []
    for blocks, timing in zip(architectures, timings):
        predicted = table.runtime_ms(blocks)
        rows.append(
            {
                "blocks": [b.name for b in blocks],
                "predicted_ms": predicted,
                "measured_ms": timing.latency_ms,
                "error": (predicted - timing.latency_ms) / timing.latency_ms,
                "round_spread": _spread(timing.rounds_ms),
            }
        )
    errors = [abs(r["error"]) for r in rows]
    return {
        "architectures": rows,
        "rounds": rounds,
        "mean_abs_error": statistics.mean(errors),
        "max_abs_error": max(errors),
        "mean_signed_error": statistics.mean(r["error"] for r in rows),
    }


def random_architectures(variants: list[list[BlockConfig]], n: int, seed: int = 0) -> list[list[BlockConfig]]:
    """n architectures drawn uniformly per layer from each layer's variants."""
    rng = random.Random(seed)
    return [[rng.choice(layer) for layer in variants] for _ in range(n)]


def blocks_to_time(
    arch: ArchConfig, space: SearchSpace, checks: int, seed: int = 0
) -> tuple[list[BlockConfig], list[list[BlockConfig]]]:
    """What `calibrate` times for a search space: every variant of every layer, and the architectures its
    prediction is checked on: the parent (every speedup budget is a ratio to it) and `checks` random ones."""
    variants = [space.block_variants(arch, i) for i in range(arch.n_layers)]
    return [b for v in variants for b in v], [list(arch.blocks), *random_architectures(variants, checks, seed)]
