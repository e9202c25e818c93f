"""The cost model: each block variant's runtime measured on this device, a model's latency predicted as a sum.

For a scenario (batch, prompt length, generated length), every distinct block runs as the runtime's own
`DecoderLayer` (the one serving executes) on random weights: one prefill of batch × prompt tokens, and single
decode steps with the KV cache at the first and the last decode length (attention cost is linear in the
context, so their mean is the mean over the whole generation). A block's runtime is then
prefill + (gen_len − 1) × mean decode step: the first generated token comes from the prefill's logits.

What is not a block (embedding, final norm, LM head, sampling, the generation loop itself, cache
allocation) is measured as whole generations of a model whose only layer is a no-op, through the same
`Generator` that serves. Predicted latency = non-block + Σ blocks (Puzzle's additivity assumption). The
model reports its own error: predicted vs measured end-to-end latency of random architectures.

Memory comes from the config formulas (weights + batch × sequence × KV bytes), never from a measurement.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from tessera.config import ArchConfig, BlockConfig, dtype_bytes
from tessera.runtime.cache import KVCache
from tessera.runtime.generate import Generator, SamplingParams
from tessera.runtime.model import Batch, Model

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MIB = 2**20
STACK_COPIES = 4


@dataclass(frozen=True)
class Scenario:
    batch: int = 8
    prompt_len: int = 128
    gen_len: int = 64

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"scenario {name} must be >= 1, got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def check_context(self, arch: ArchConfig) -> None:
        if self.seq_len > arch.max_position_embeddings:
            raise ValueError(
                f"scenario prompt {self.prompt_len} + generated {self.gen_len} tokens exceeds the model's context "
                f"({arch.max_position_embeddings}, max_position_embeddings)"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, budget_s: float = 0.3) -> float:
    """Median wall milliseconds of fn (after one warm-up call), repeated until min_reps and budget_s are met."""
    fn()
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times)


@torch.inference_mode()
def time_block(
    arch: ArchConfig,
    block: BlockConfig,
    scenario: Scenario,
    device: torch.device,
    dtype: torch.dtype,
    copies: int = STACK_COPIES,
) -> dict:
    """Prefill and decode milliseconds of one runtime block in the scenario, as the mean over a stack of
    `copies` such blocks with distinct random weights: timed alone in a loop, a block finds its weights and
    inputs still in cache and reads 13 % faster than inside a model (demo parent, 2-core Xeon, prefill)."""
    stack = arch.with_blocks([block] * copies)
    model = Model.empty(stack, device, dtype).init_weights(seed=0)
    b, p, g = scenario.batch, scenario.prompt_len, scenario.gen_len
    cache = KVCache(stack, b, scenario.seq_len, device, dtype)
    gen = torch.Generator(device).manual_seed(0)

    def run(x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in model.layers:
            x = layer(x, batch, cos, sin)
        return x

    h = torch.randn(b * p, arch.hidden_size, device=device, dtype=dtype, generator=gen)
    prefill = Batch.prefill([p] * b, device, cache)
    cos, sin = model.rope_tables(prefill.positions)
    prefill_ms = median_ms(lambda: run(h, prefill, cos, sin), device) / copies
    decode = []
    for position in sorted({p, p + g - 2}) if g > 1 else []:
        step = Batch.decode(torch.full((b,), position, device=device), cache)
        x = torch.randn(b, arch.hidden_size, device=device, dtype=dtype, generator=gen)
        c, s = model.rope_tables(step.positions)
        decode.append(median_ms(lambda step=step, x=x, c=c, s=s: run(x, step, c, s), device) / copies)
    decode_ms = statistics.mean(decode) if decode else 0.0
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "runtime_ms": prefill_ms + (g - 1) * decode_ms}


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


@torch.inference_mode()
def prefill_decode_ms(model: Model, scenario: Scenario) -> dict[str, float]:
    """Median milliseconds of one prefill of batch × prompt tokens and of one decode step (batch tokens, at
    the middle of the generation), through the model's own prefill/decode with its KV cache and LM head."""
    scenario.check_context(model.arch)
    param = model.embed_tokens.weight
    device, b, p = param.device, scenario.batch, scenario.prompt_len
    cache = KVCache(model.arch, b, scenario.seq_len, device, param.dtype)
    tokens = torch.tensor(_prompts(model.arch, scenario), device=device).reshape(-1)
    prefill = median_ms(lambda: model.prefill(tokens, [p] * b, cache), device)
    positions = torch.full((b,), p + scenario.gen_len // 2, device=device)
    decode = median_ms(lambda: model.decode(tokens[:b], positions, cache), device)
    return {"prefill_ms": prefill, "decode_ms": decode}


def non_block_ms(
    arch: ArchConfig, block: BlockConfig, block_ms: float, scenario: Scenario, device: torch.device, dtype: torch.dtype
) -> float:
    """A generation's cost outside the blocks: whole generations of a model of STACK_COPIES `block`s, minus
    those blocks' measured runtime. A model of no-op layers would time the LM head with its weights always in
    cache; among real layers it is not, and the prediction undershot by 11 % (demo parent, 2-core Xeon)."""
    model = Model.empty(arch.with_blocks([block] * STACK_COPIES), device, dtype).init_weights(seed=0)
    return measure_latency(model, scenario, repeats=5) - STACK_COPIES * block_ms


def block_memory_mib(arch: ArchConfig, block: BlockConfig, scenario: Scenario, dtype: torch.dtype) -> float:
    """Weights + the KV cache of `batch` sequences of prompt + generated tokens (config formulas)."""
    name = _DTYPE_NAMES[dtype]
    weights = arch.block_params(block) * dtype_bytes(name)
    kv = scenario.batch * scenario.seq_len * arch.kv_bytes_per_token_layer(block, name)
    return (weights + kv) / MIB


def non_block_memory_mib(arch: ArchConfig, dtype: torch.dtype) -> float:
    """Embedding, LM head and final norm."""
    non_block = arch.num_params() - sum(arch.block_params(b) for b in arch.blocks)
    return non_block * dtype_bytes(_DTYPE_NAMES[dtype]) / MIB


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
    """Time every distinct block in `blocks` and the non-block part on this device."""
    scenario.check_context(arch)
    distinct = list(dict.fromkeys(blocks))
    reference = distinct[0]
    timed = {
        b.name: time_block(arch, b, scenario, device, dtype)
        for b in tqdm(distinct, desc="timing blocks", disable=not progress, dynamic_ncols=True)
    }
    return CostTable(
        device=device_name(device),
        dtype=_DTYPE_NAMES[dtype],
        scenario=scenario,
        non_block_ms=non_block_ms(arch, reference, timed[reference.name]["runtime_ms"], scenario, device, dtype),
        non_block_memory_mib=non_block_memory_mib(arch, dtype),
        blocks=timed,
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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses: what a timing was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"
