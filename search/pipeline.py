"""`tessera optimize`: Puzzle end to end, from a parent checkpoint to a faster child under a budget.

parent ─> record activations ─> BLD every variant ─> replace-1-block scores ─┐
      └─> time every variant on this device (cost table, self-validated) ────┴─> block library JSON
      ─> MIP under the budget ─> assemble ─> GKD ─> child checkpoint (nemotron-nas) + report

Besides the child for the requested budget, the run solves a few more budgets (a Pareto curve of measured
speed against quality) and builds two baselines at the main budget from the same BLD blocks: every layer
shrunk the same way (the best uniform choice that fits), and a greedy layer-by-layer choice (cheapest KL
per millisecond saved first). All children are measured end to end on this device and evaluated on
held-out text before and after the same GKD.

The run directory is resumable for the expensive stage, BLD (`bld/`, a `SublayerStore` with a manifest of
what it was computed from); a rerun into it with another parent, calibration text, search space or BLD
settings is refused before the cost model starts, unless `fresh` deletes the store. Everything else is
recomputed, and every file is written under a temporary name and renamed (tessera/files.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tessera.config import ArchConfig, BlockConfig
from tessera.devices import peak_memory_bytes, reset_peak_memory, serving_dtype
from tessera.errors import UserError
from tessera.files import atomic_write_text
from tessera.runtime.loader import checkpoint_dir, save_model
from tessera.runtime.model import Model
from tessera.search import activations
from tessera.search.assemble import assemble_child
from tessera.search.bld import BLDConfig, SublayerStore, bld_manifest, run_bld
from tessera.search.cost import (
    CostTable,
    Scenario,
    block_memory_mib,
    blocks_to_time,
    calibrate,
    lockstep,
)
from tessera.search.data import load_parent
from tessera.search.fusion import FusionConfig, run_fusion
from tessera.search.gkd import GKDConfig, check_batch, distill
from tessera.search.library import (
    Library,
    SearchSpace,
    block_from_name,
    choices_to_blocks,
    shape_stats,
    write_library,
)
from tessera.search.mip import Bound, InfeasibleError, solve
from tessera.search.ranks import ONE, Ranks, every_core
from tessera.search.scoring import (
    FISHER_SAMPLES,
    SCORING_METHODS,
    model_quality,
    reference_logprobs,
    score_library,
)
from tessera.search.train import fixed_windows, random_windows

MEASURE_ROUNDS = 5  # lockstep rounds of the parent with each child (search/cost.py)
# Landing on the budget's speed terms (`land_on_budget`): the MIP's child is measured against the parent and what is
# asked of the cost model corrected, until the measured speedup is within TARGET_TOLERANCE of the target (a latency
# limit: at most the limit, within 2 × TARGET_TOLERANCE under it) or TARGET_CHECKS children are measured (each one
# MIP solve).
TARGET_TOLERANCE = 0.02
TARGET_CHECKS = 4
TARGET_ROUNDS = 5  # lockstep rounds of each check
# What a run writes under `out` (RUN_MARKS first, before any training: a folder holding one is an earlier run).
RUN_MARKS = ("cost.json", "bld", "results.json")
RUN_OUTPUTS = {*RUN_MARKS, "library.json", "child", "fused", "report.md", "pareto.png", "layers.png"}


FURTHER_COST = re.compile(rf"cost_{Scenario.KEY_PATTERN}\.json")  # a further scenario's table


def is_run_output(name: str) -> bool:
    """A name a run writes under `out`: RUN_OUTPUTS, and cost_<scenario key>.json for each further scenario (not
    another cost table a user keeps there, say `tessera calibrate`'s)."""
    return name in RUN_OUTPUTS or FURTHER_COST.fullmatch(name) is not None


@dataclass(frozen=True)
class Budget:
    """What the child must meet; latency and throughput are for the scenario on this device."""

    target_speedup: float | None = None  # × the parent's speed
    max_latency_ms: float | None = None
    max_memory_mib: float | None = None
    min_throughput: float | None = None  # generated tokens/s = batch · gen_len / latency
    max_kv_heads: int | None = None  # KV heads summed over layers (the KV cache, in one layer-head's units)

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v is not None and not 0 < v < math.inf:
                raise UserError(f"budget {name} must be a finite number > 0, got {v}")
        if self.target_speedup is not None and self.target_speedup < 1:
            raise UserError(
                f"target speedup must be >= 1 (a child no slower than its parent), got {self.target_speedup}"
            )

    def latency_limit_ms(self, scenario: Scenario) -> float | None:
        """The tightest end-to-end latency the budget allows in `scenario`: its max latency, or the latency its min
        throughput allows there (None: neither)."""
        limits = [] if self.max_latency_ms is None else [self.max_latency_ms]
        if self.min_throughput is not None:
            limits.append(1e3 * scenario.batch * scenario.gen_len / self.min_throughput)
        return min(limits, default=None)

    def describe(self) -> str:
        """The budget's terms as a reader writes them ("target speedup 1.5, max latency 250 ms"): report labels."""
        units = {"max_latency_ms": " ms", "max_memory_mib": " MiB", "min_throughput": " tokens/s"}
        parts = [
            f"{k.removesuffix('_ms').removesuffix('_mib').replace('_', ' ')} {v:g}{units.get(k, '')}"
            for k, v in asdict(self).items()
            if v is not None
        ]
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class OptimizeConfig:
    space: SearchSpace = field(default_factory=SearchSpace)
    scenario: Scenario = field(default_factory=Scenario)
    # Throughput scenarios besides `scenario` (Puzzle optimizes at several batch sizes): each is timed and has a
    # runtime of its own in the library; a target speedup holds in every one (a bound per scenario in the MIP),
    # while a latency or throughput budget (milliseconds, tokens/s of one scenario) bounds `scenario` alone.
    also_scenarios: tuple[Scenario, ...] = ()
    bld: BLDConfig = field(default_factory=BLDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    calibration_windows: int = 64  # training windows whose activations BLD learns from
    score_windows: int = 8  # held-out windows for replace-1-block scoring
    # "exact" replace-1-block KL (V · L(L+1)/2 block forwards), or "fisher": its second-order estimate from
    # V · L block forwards and fisher_samples backward passes of the parent (search/scoring.py)
    scoring: str = "exact"
    fisher_samples: int = FISHER_SAMPLES
    eval_windows: int = 32  # further held-out windows for the children's final quality
    seq_len: int = 256
    pareto_speedups: tuple[float, ...] = (1.25, 2.0)  # extra budgets solved for the curve
    baseline_gkd: bool = True  # the baselines get the same GKD as the main child
    validate_architectures: int = 10  # random architectures the cost model is checked on (with the parent)
    fusion: FusionConfig | None = None  # FFN Fusion of the main child after the search (None: none)
    device: str = "cpu"
    # The precision blocks and children are timed in, the one the child is served in (None: bfloat16 on CUDA,
    # float32 on CPU); training and scoring stay in float32 either way.
    timing_dtype: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_METHODS:
            raise UserError(f"scoring must be one of {', '.join(SCORING_METHODS)}, got {self.scoring!r}")
        if self.fisher_samples < 1:
            raise UserError(f"fisher_samples must be >= 1, got {self.fisher_samples}")
        if self.seq_len < 2:
            raise UserError(f"seq_len must be >= 2 tokens, got {self.seq_len}")
        if wide := [w for w in self.space.windows if 2 * w > self.seq_len]:
            # On text no longer than a window it cuts nothing (its KL reads 0), and on barely longer text it cuts a
            # few keys of the last queries, while the cost model prices what it saves in longer contexts: the MIP
            # would take it as (nearly) free. Text of twice the window cuts it for half the queries.
            raise UserError(
                f"attention windows {', '.join(map(str, wide))} need text at least twice as long to show what they "
                f"lose, but blocks are distilled and scored on {self.seq_len}-token windows of text; ask for windows "
                f"of at most {self.seq_len // 2} tokens or a --seq-len of at least {2 * max(wide)}"
            )


def held_out_windows(val_ids: np.ndarray, cfg: OptimizeConfig, corpus: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split's windows a run scores blocks on (the first `score_windows`) and evaluates children
    on (the `eval_windows` after them)."""
    held_out = fixed_windows(val_ids, cfg.seq_len, cfg.score_windows + cfg.eval_windows)
    if held_out.shape[0] < cfg.score_windows + cfg.eval_windows:
        raise UserError(
            f"{corpus}: the validation split has {held_out.shape[0]} windows of {cfg.seq_len} tokens; "
            f"scoring and evaluation need {cfg.score_windows + cfg.eval_windows}"
        )
    return held_out[: cfg.score_windows], held_out[cfg.score_windows :]


@dataclass
class Child:
    label: str
    method: str  # "mip", "uniform", "greedy", "parent"
    blocks: list[BlockConfig]
    predicted_ms: float
    measured_ms: float = math.nan
    measured_speedup: float = math.nan  # the parent's latency / this one's, timed together
    quality_bld: dict = field(default_factory=dict)  # assembled from BLD blocks, before GKD
    quality_gkd: dict = field(default_factory=dict)
    kl_sum: float = math.nan  # the MIP objective: Σ replace-1-block KL
    speedup_rounds: list[float] = field(default_factory=list)  # the parent's latency / the child's, each round
    also_speedups: dict[str, float] = field(default_factory=dict)  # measured in each of `also_scenarios`, by key

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "method": self.method,
            "blocks": [b.name for b in self.blocks],
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_speedup": self.measured_speedup,
            "speedup_rounds": self.speedup_rounds,
            "also_speedups": self.also_speedups,
            "kl_sum": self.kl_sum,
            "quality_bld": self.quality_bld,
            "quality_gkd": self.quality_gkd,
        }


def build_library(
    arch: ArchConfig,
    space: SearchSpace,
    table: CostTable,
    scores: dict | None,
    bld_losses: dict,
    dtype: torch.dtype,
    also: Sequence[CostTable] = (),
) -> Library:
    """The block library in NVIDIA's Puzzle-demo schema: layer -> variant -> {stats, metrics}; the runtime in
    each further scenario (`also`) as `stats.runtime_ms_<scenario key>`. Each entry says how its runtimes were
    measured (as Puzzle's library says "FP8, batch 256"): `runtime_dtype` (the timing precision, float8_e4m3fn
    for FP8 weights), `runtime_device` and `runtime_scenario` (the main scenario's key). Without scores (before
    BLD) every metric is 0: enough to check that a budget is feasible at all."""
    library: Library = {}
    for i in range(arch.n_layers):
        layer = f"layer_{i}"
        library[layer] = {}
        for block in space.block_variants(arch, i):
            timing = table.blocks[block.name]
            losses = bld_losses.get(layer, {})
            metrics = dict(scores[layer][block.name]) if scores is not None else {"kl_div": 0.0}
            for part, sub in (("attention", block.attention), ("ffn", block.ffn)):
                if sub.name in losses:
                    metrics[f"bld_nmse_{part}"] = losses[sub.name]["nmse_final"]
            library[layer][block.name] = {
                "stats": {
                    **shape_stats(arch, block),
                    "runtime_ms": timing["runtime_ms"],
                    "prefill_ms": timing["prefill_ms"],
                    "decode_ms": timing["decode_ms"],
                    "memory_mib": block_memory_mib(arch, block, table.scenario, dtype),
                    "runtime_dtype": table.dtype,
                    "runtime_device": table.device,
                    "runtime_scenario": table.scenario.key,
                    **{runtime_key(t.scenario): t.blocks[block.name]["runtime_ms"] for t in also},
                },
                "metrics": metrics,
            }
    return library


def _least(library: Library, key: str) -> float:
    """The smallest layer sum of one key any architecture reaches: each layer's least, since layers choose freely."""
    part, name = key.split(".")
    return sum(min(entry[part][name] for entry in variants.values()) for variants in library.values())


def _fastest_ms(table: CostTable, library: Library, main: bool = True) -> float:
    """What the space's fastest architecture is predicted at in `table`'s scenario: the main one's runtime stat, or
    (main False) the further scenario's own."""
    return table.non_block_ms + _least(library, "stats.runtime_ms" if main else f"stats.{runtime_key(table.scenario)}")


def _down(x: float) -> str:
    """x to 4 significant digits, rounded down: a speedup or throughput quoted as reachable must be."""
    step = 10.0 ** (math.floor(math.log10(x)) - 3)
    return f"{math.floor(x / step) * step:.4g}"


def runtime_key(scenario: Scenario) -> str:
    """The library stat holding a further scenario's runtime."""
    return f"runtime_ms_{scenario.key}"


def scenario_bound(speedup: float, table: CostTable, arch: ArchConfig, library: Library) -> Bound:
    """A target speedup in a further scenario (priced by its own `table`) as a bound on its runtime stat,
    refused like `block_bounds` refuses one the search space cannot reach."""
    s, key = table.scenario, runtime_key(table.scenario)
    parent_ms, fastest_ms = table.runtime_ms(arch.blocks), _fastest_ms(table, library, main=False)
    if fastest_ms <= 0 or parent_ms / speedup < fastest_ms:
        reach = f"{_down(parent_ms / fastest_ms)}×" if fastest_ms > 0 else "no measurable speedup"
        raise InfeasibleError(
            f"target speedup {speedup:g} cannot be met in scenario batch {s.batch}, prompt {s.prompt_len}, "
            f"{s.gen_len} generated tokens: the fastest architecture in the search space reaches {reach} there "
            f"(on {table.device})"
        )
    return Bound(f"stats.{key}", upper=parent_ms / speedup - table.non_block_ms)


def speedup_bounds(
    budget: Budget, tables: Sequence[CostTable], arch: ArchConfig, library: Library, speedups: Sequence[float] = ()
) -> list[Bound]:
    """`block_bounds` in the first table's scenario and, for a target speedup, `scenario_bound` in each further
    one; `speedups` (one per table) replace the budget's target speedup in each."""
    primary, *also = tables
    asked = list(speedups) or [budget.target_speedup] * len(tables)
    bounds = block_bounds(replace(budget, target_speedup=asked[0]), primary, primary.runtime_ms(arch.blocks), library)
    if budget.target_speedup is not None:
        bounds += [scenario_bound(x, table, arch, library) for x, table in zip(asked[1:], also)]
    return bounds


def joint_infeasibility(
    budget: Budget, tables: Sequence[CostTable], arch: ArchConfig, error: InfeasibleError
) -> InfeasibleError:
    """The MIP's `error` for a budget whose terms `block_bounds` and `scenario_bound` each passed alone, in the
    budget's own terms: for each bound, the best its total reaches under the others, with the parts outside the
    blocks added back (what the MIP sees are block sums)."""
    primary, *also = tables
    runtimes = {"stats.runtime_ms": (primary, "")}  # runtime stat -> its table, and where it is timed
    for t in also:
        s = t.scenario
        runtimes[f"stats.{runtime_key(s)}"] = (t, f" at batch {s.batch}, prompt {s.prompt_len}, {s.gen_len} generated")
    reasons = []
    for short in error.shortfalls:  # every budget term is an upper bound
        key = short.bound.key
        if key in runtimes:
            table, where = runtimes[key]
            reached, parent_ms = short.best + table.non_block_ms, table.runtime_ms(arch.blocks)
            reasons.append(
                f"the fastest architecture is predicted at {reached:.4g} ms{where}, "
                f"{_down(parent_ms / reached)}× the parent's {parent_ms:.4g} ms"
            )
        elif key == "stats.memory_mib":
            reasons.append(f"the smallest architecture needs {short.best + primary.non_block_memory_mib:.4g} MiB")
        else:  # stats.num_kv_heads
            reasons.append(f"the fewest KV heads (summed over layers) are {short.best:g}")
    why = "; ".join(f"under the other terms, {r}" for r in reasons) or "its terms conflict"
    return InfeasibleError(
        f"the budget ({budget.describe()}) cannot be met as a whole by the search space, though each term alone "
        f"can: {why} (on {primary.device})"
    )


def block_bounds(budget: Budget, table: CostTable, parent_predicted_ms: float, library: Library) -> list[Bound]:
    """The budget as bounds on the layers' summed stats: non-block costs come off first (Puzzle). A target
    speedup divides the parent's *predicted* latency, so the cost model's own bias cancels in the ratio.

    A budget term no architecture in `library` (the search space, priced by `table`) can meet is refused here,
    in the budget's own terms and with what the space can reach: subtracting the non-block cost would otherwise
    hand the MIP a bound below anything possible, negative for a large enough speedup."""
    fastest_ms = _fastest_ms(table, library)
    s = table.scenario
    tokens = s.batch * s.gen_len
    latency_terms = (budget.target_speedup, budget.max_latency_ms, budget.min_throughput)
    if fastest_ms <= 0 and any(v is not None for v in latency_terms):
        raise UserError(
            f"the cost model predicts {fastest_ms:.4g} ms for the fastest architecture in the search space (the "
            f"non-block part alone {table.non_block_ms:.4g} ms): its timings on {table.device} were too noisy to "
            "budget latency with (another process competing for the device?); time again on a quiet machine"
        )
    latency = []  # (end-to-end limit in ms, the budget term, what the fastest architecture reaches instead)
    if (speedup := budget.target_speedup) is not None:
        reach = f", {_down(parent_predicted_ms / fastest_ms)}× the parent's {parent_predicted_ms:.4g} ms"
        latency.append((parent_predicted_ms / speedup, f"target speedup {speedup:g}", reach))
    if budget.max_latency_ms is not None:
        latency.append((budget.max_latency_ms, f"max latency {budget.max_latency_ms:g} ms", ""))
    if (throughput := budget.min_throughput) is not None:
        reach = f": at most {_down(1e3 * tokens / fastest_ms)} tokens/s"
        latency.append((1e3 * tokens / throughput, f"min throughput {throughput:g} tokens/s", reach))
    for limit, term, reach in latency:
        if limit < fastest_ms:
            raise InfeasibleError(
                f"{term} cannot be met: the fastest architecture in the search space is predicted at "
                f"{fastest_ms:.4g} ms{reach} (batch {s.batch}, prompt {s.prompt_len}, {s.gen_len} generated tokens, "
                f"on {table.device})"
            )
    bounds = []
    if latency:
        bounds.append(Bound("stats.runtime_ms", upper=min(limit for limit, _, _ in latency) - table.non_block_ms))
    if budget.max_memory_mib is not None:
        smallest = table.non_block_memory_mib + _least(library, "stats.memory_mib")
        if budget.max_memory_mib < smallest:
            raise InfeasibleError(
                f"max memory {budget.max_memory_mib:g} MiB cannot be met: the smallest architecture in the search "
                f"space needs {smallest:.4g} MiB, {table.non_block_memory_mib:.4g} MiB of it outside the blocks"
            )
        bounds.append(Bound("stats.memory_mib", upper=budget.max_memory_mib - table.non_block_memory_mib))
    if budget.max_kv_heads is not None:
        fewest = _least(library, "stats.num_kv_heads")
        if budget.max_kv_heads < fewest:
            raise InfeasibleError(
                f"max kv heads {budget.max_kv_heads:g} cannot be met: the search space keeps at least {fewest:g} "
                "KV heads (summed over layers)"
            )
        bounds.append(Bound("stats.num_kv_heads", upper=budget.max_kv_heads))
    if not bounds:
        raise UserError(
            "the budget is empty: give a target speedup, a latency, a memory, a throughput or a KV-head bound"
        )
    return bounds


def _excess(library: Library, blocks: list[BlockConfig], b: Bound) -> float:
    """How far the blocks' total of b's key lies past its upper bound (> 0: the bound is not met; budgets are
    upper bounds on runtimes, memory and KV heads)."""
    if b.upper is None:
        return 0.0
    part, key = b.key.split(".")
    return sum(library[f"layer_{i}"][blk.name][part][key] for i, blk in enumerate(blocks)) - b.upper - 1e-9


def _within(library: Library, blocks: list[BlockConfig], bounds: list[Bound]) -> bool:
    return all(_excess(library, blocks, b) <= 0 for b in bounds)


def _kl_sum(library: Library, blocks: list[BlockConfig]) -> float:
    return sum(library[f"layer_{i}"][b.name]["metrics"]["kl_div"] for i, b in enumerate(blocks))


def uniform_baseline(library: Library, arch: ArchConfig, bounds: list[Bound]) -> list[BlockConfig] | None:
    """Every layer the same variant: of the uniform choices within the budget, the one with least Σ KL."""
    common = set.intersection(*(set(library[f"layer_{i}"]) for i in range(arch.n_layers)))
    fits = [[block_from_name(n)] * arch.n_layers for n in sorted(common)]
    fits = [blocks for blocks in fits if _within(library, blocks, bounds)]
    return min(fits, key=lambda blocks: _kl_sum(library, blocks), default=None)


def greedy_baseline(library: Library, arch: ArchConfig, bounds: list[Bound]) -> list[BlockConfig] | None:
    """Start from the parent and repeatedly make the single-layer change with the least added KL per unit saved
    of the first bound still unmet (milliseconds for a latency or speedup budget, MiB or KV heads for theirs),
    until the budget is met (the layer-wise greedy Puzzle compares its MIP against). A change that would push a
    bound already met back over it is not made: a step that saves KV heads could otherwise cost back the runtime
    the step before saved, and the next one undo it, forever. So a met bound stays met, the bound being worked on
    only falls, and the loop ends; None when no allowed change helps."""
    blocks = list(arch.blocks)
    layers = [library[f"layer_{i}"] for i in range(arch.n_layers)]
    while (unmet := next((b for b in bounds if _excess(library, blocks, b) > 0), None)) is not None:
        # Each met bound's slack, and the (part, key) it bounds.
        met = [(-excess, *b.key.split(".")) for b in bounds if (excess := _excess(library, blocks, b)) <= 0]
        part, key = unmet.key.split(".")
        best, best_rate = None, math.inf
        for i, variants in enumerate(layers):
            now = variants[blocks[i].name]
            for name, entry in variants.items():
                saved = now[part][key] - entry[part][key]
                if saved <= 0 or any(entry[p][k] - now[p][k] > slack for slack, p, k in met):
                    continue
                rate = (entry["metrics"]["kl_div"] - now["metrics"]["kl_div"]) / saved
                if rate < best_rate:
                    best, best_rate = (i, name), rate
        if best is None:
            return None
        blocks[best[0]] = block_from_name(best[1])
    return blocks


def land_on_budget(
    library: Library,
    tables: Sequence[CostTable],
    arch: ArchConfig,
    budget: Budget,
    bounds: list[Bound],
    measure: Callable[[list[BlockConfig], Sequence[CostTable]], list[tuple[float, float]]],
    progress: bool = False,
) -> tuple[list[BlockConfig], list[Bound], list[dict]]:
    """The MIP's child at the budget, the bounds it was solved under, and the checks made. The loop is closed on
    the budget's speed terms: the child is measured (`measure`: the parent's and the child's latency in ms in the
    scenario of each table given) and, while it misses, what is asked of the cost model is corrected by the child's
    miss (the cost model's error on this child, taken to hold for the next) and the MIP is solved again: at most
    TARGET_CHECKS children measured, the nearest kept. A corrected budget that leads back to a child already
    measured ends the loop (the correction is going round in a circle).

    - A target speedup holds in every scenario and is met within ±TARGET_TOLERANCE by the slowest of them; the
      speedup asked in each becomes the child's predicted one scaled by that scenario's miss, at most what the
      space's fastest architecture is predicted to reach there (which is then measured too).
    - A latency limit (`--max-latency-ms`, or `--min-throughput` as the latency it allows; the main scenario's
      alone, so only that one is timed for it) is a ceiling: it is met when the child measures at most the limit
      and no more than 2 × TARGET_TOLERANCE under it (a child well under it gave away quality it could have
      kept). The limit asked becomes the child's predicted latency scaled to land TARGET_TOLERANCE under the
      limit, kept inside the asks already measured (`_bracketed`) and no tighter than the fastest architecture in
      the space (which is then measured too).

    With both, a term the child is too slow for is corrected, and one it is too fast for only if it is the term
    that bound the MIP (in the main scenario, the tighter of the two): loosening the other would change nothing.
    Of the children that meet the latency limit, the nearest is kept; one over it only when none measured meets
    it. A budget of memory or KV heads alone is not a speed: nothing is measured."""
    (solution,) = solve(library, "metrics.kl_div", bounds=bounds)
    blocks = choices_to_blocks(library, solution.choices)
    target, limit = budget.target_speedup, budget.latency_limit_ms(tables[0].scenario)
    if target is None and limit is None:
        return blocks, bounds, []
    timed = tables if target is not None else tables[:1]
    # What the space's fastest architecture is predicted at in each scenario: no ask goes past it.
    fastest_ms = [_fastest_ms(t, library, main=k == 0) for k, t in enumerate(tables)]
    reach = [t.runtime_ms(arch.blocks) / f * (1 - 1e-9) for t, f in zip(tables, fastest_ms)]  # 1e-9: its rounding
    checks: list[dict] = []
    best: tuple[tuple[float, float], list[BlockConfig], list[Bound]] | None = None
    asked, asked_limit = [target] * len(tables), limit
    limit_asks: dict[str, list[float]] = {"fast": [], "slow": []}  # limits asked whose child was too fast, too slow
    for attempt in range(TARGET_CHECKS):
        predicted = [t.runtime_ms(arch.blocks) / t.runtime_ms(blocks) for t in timed]
        predicted_ms = tables[0].runtime_ms(blocks)
        timings = measure(blocks, timed)
        measured = [parent_ms / child_ms for parent_ms, child_ms in timings]
        measured_ms = timings[0][1]
        check = {"predicted_ms": predicted_ms, "measured_ms": measured_ms, "blocks": [b.name for b in blocks]}
        if target is not None:
            check.update(asked_speedup=asked[0], predicted_speedup=predicted[0], measured_speedup=measured[0])
            check["also"] = [
                {"scenario": t.scenario.key, "asked_speedup": a, "predicted_speedup": p, "measured_speedup": m}
                for t, a, p, m in list(zip(timed, asked, predicted, measured))[1:]
            ]
        if limit is not None:
            check["asked_latency_ms"] = asked_limit
        checks.append(check)
        if progress:
            said = []
            if target is not None:
                said += [
                    f"asked {a:.3f}, predicted {p:.3f}, measured {m:.3f}" for a, p, m in zip(asked, predicted, measured)
                ]
            if limit is not None:
                said.append(
                    f"latency asked {asked_limit:.4g} ms, predicted {predicted_ms:.4g}, measured {measured_ms:.4g}"
                )
            print(f"[optimize] {budget.describe()}: {'; '.join(said)}", flush=True)
        # Each term: "slow", "fast" or "on" its mark, and how far off it (0 on it, for the limit).
        state: dict[str, tuple[str, float]] = {}
        if target is not None:
            d = min(measured) / target - 1  # the slowest scenario is the one the target binds
            state["speedup"] = ("slow" if d < -TARGET_TOLERANCE else "fast" if d > TARGET_TOLERANCE else "on", abs(d))
        if limit is not None:
            r, floor = measured_ms / limit, 1 - 2 * TARGET_TOLERANCE
            state["latency"] = ("slow", r - 1) if r > 1 else ("fast", floor - r) if r < floor else ("on", 0.0)
        # The term that bound the MIP: the limit, when its ask was the tighter in the main scenario.
        limit_binds = limit is not None and (
            target is None or asked_limit <= tables[0].runtime_ms(arch.blocks) / asked[0]
        )
        binding = "latency" if limit_binds else "speedup"
        if limit is not None and (state["latency"][0] == "slow" or (state["latency"][0] == "fast" and limit_binds)):
            limit_asks[state["latency"][0]].append(asked_limit)
        slow = [term for term, (s, _) in state.items() if s == "slow"]
        over_limit = state["latency"][1] if "latency" in slow else 0.0
        miss = max(state[t][1] for t in slow) if slow else min(off for _, off in state.values())
        if best is None or (over_limit, miss) < best[0]:
            best = ((over_limit, miss), blocks, bounds)
        landed = not slow and any(s == "on" for s, _ in state.values())
        if landed or attempt == TARGET_CHECKS - 1:
            break
        # The terms too slow; else the binding one, too fast (landed otherwise).
        correct = slow or [binding]
        if "speedup" in correct:
            asked = [min(max(1.0, p * target / m), r) for p, m, r in zip(predicted, measured, reach)]
        if "latency" in correct:
            corrected = predicted_ms * limit * (1 - TARGET_TOLERANCE) / measured_ms
            asked_limit = max(_bracketed(corrected, limit_asks), fastest_ms[0])
        try:
            terms = replace(budget, max_latency_ms=asked_limit, min_throughput=None) if limit is not None else budget
            next_bounds = speedup_bounds(terms, tables, arch, library, asked if target is not None else ())
            (solution,) = solve(library, "metrics.kl_div", bounds=next_bounds)
        except InfeasibleError:
            break  # the space reaches no further: the nearest so far stands
        blocks, bounds = choices_to_blocks(library, solution.choices), next_bounds
        if any(check["blocks"] == [b.name for b in blocks] for check in checks):
            break  # measured already: the nearest so far stands
    return best[1], best[2], checks


def _bracketed(corrected: float, asks: dict[str, list[float]]) -> float:
    """The next latency limit to ask of the cost model: `corrected` (the last child's prediction scaled by its miss)
    if it lies between the asks known to give too fast a child (the next must be looser) and those known to give
    too slow a one (it must be tighter); else the middle of that bracket, or, with no too-slow ask yet, one
    window (2 × TARGET_TOLERANCE) looser than the loosest too-fast ask. A cost model whose error differs from child
    to child would otherwise swing the ask back and forth past asks already measured."""
    low, high = max(asks["fast"], default=0.0), min(asks["slow"], default=math.inf)
    if low < corrected < high or low >= high:  # low >= high: the device's own noise; the correction stands
        return corrected
    return (low + high) / 2 if high < math.inf else low * (1 + 2 * TARGET_TOLERANCE)


class Optimizer:
    """One `tessera optimize` run; each stage writes its output under `out` as it finishes. fresh: delete BLD
    results already under `out` instead of resuming from them (they must otherwise come from this run's inputs)."""

    def __init__(
        self,
        parent_dir: Path,
        corpus: Path,
        out: Path,
        cfg: OptimizeConfig,
        progress: bool = True,
        fresh: bool = False,
        ranks: Ranks = ONE,
    ) -> None:
        self.ranks = ranks  # a sharded search (search/ranks.py): rank 0 reports and writes all but BLD blocks
        self.parent_dir, self.out, self.cfg, self.progress = Path(parent_dir), Path(out), cfg, progress and ranks.main
        # Every rank knows the run is fresh (its checks pass over the old store's manifest); rank 0 alone deletes
        # the store, when it claims it (search/bld.run_bld), before any other rank reads it.
        self.store = SublayerStore(self.out / "bld", fresh=fresh)
        if cfg.gkd.steps:  # said now, not after BLD, scoring and the MIP
            check_batch(cfg.gkd, ranks.size)
        self.device = ranks.device(torch.device(cfg.device))
        self.dtype = torch.float32  # training and scoring
        self.timing_dtype = serving_dtype(self.device, cfg.timing_dtype)
        loaded = load_parent(checkpoint_dir(self.parent_dir), corpus, self.device, self.dtype)
        self.parent, self.train_ids = loaded.model, loaded.train_ids
        for scenario in (cfg.scenario, *cfg.also_scenarios):
            scenario.check_context(self.parent.arch)
        if cfg.seq_len > self.parent.arch.max_position_embeddings:
            raise UserError(
                f"seq_len {cfg.seq_len}: the parent's context is {self.parent.arch.max_position_embeddings} tokens "
                "(max_position_embeddings)"
            )
        self.also_tables: list[CostTable] = []
        self.score_windows, self.eval_windows = held_out_windows(loaded.val_ids, cfg, corpus)
        self.calibration = next(random_windows(self.train_ids, cfg.calibration_windows, cfg.seq_len, cfg.seed))
        self.out.mkdir(parents=True, exist_ok=True)  # once the inputs are checked: a refused run leaves no folder
        self.timed_parent = None  # the parent in timing_dtype, made when first timed
        self.pareto_left_out: list[float] = []  # --pareto speedups no architecture in the space reaches
        self.timings: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}  # per stage: resident (CPU) or allocated (GPU) peak

    def _start(self) -> float:
        """A stage begins: its clock, and a new peak of memory."""
        reset_peak_memory(self.device)
        return time.perf_counter()

    def _stage(self, name: str, start: float, accumulate: bool = False) -> None:
        """A stage ends: its time and peak memory recorded and printed. accumulate: one more part of a stage made
        in parts (added to its time, its peak the highest), printed by `_report` once all are done."""
        seconds, peak = time.perf_counter() - start, peak_memory_bytes(self.device) / 2**20
        if accumulate:
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), peak)
            return
        self.timings[name], self.peak_mib[name] = seconds, peak
        self._report(name)

    def _report(self, name: str) -> None:
        if self.progress:
            print(
                f"[optimize] {name}: {self.timings[name]:.1f} s, peak memory {self.peak_mib[name]:.0f} MiB", flush=True
            )

    def cost_model(self) -> tuple[CostTable, list[CostTable]]:
        """The main scenario's cost table and each further scenario's (written by `write_costs`, once the budget is
        accepted)."""
        cfg, arch = self.cfg, self.parent.arch
        t = self._start()
        blocks, check = blocks_to_time(arch, cfg.space, cfg.validate_architectures, seed=cfg.seed)
        table = calibrate(arch, blocks, cfg.scenario, self.device, self.timing_dtype, check, progress=self.progress)
        also_tables = []
        for scenario in cfg.also_scenarios:
            also = calibrate(arch, blocks, scenario, self.device, self.timing_dtype, check, progress=self.progress)
            also_tables.append(also)
        self._stage("cost model", t)
        return table, also_tables

    def write_costs(self, table: CostTable) -> None:
        """cost.json and each further scenario's cost_<key>.json under `out`, an earlier run's further scenarios that
        this run drops deleted: only once the budget is accepted, so a refused rerun leaves an earlier run's files
        as they agreed with each other."""
        atomic_write_text(self.out / "cost.json", json.dumps(table.to_json(), indent=1) + "\n")
        keys = {f"cost_{t.scenario.key}.json" for t in self.also_tables}
        for stale in self.out.iterdir():
            if FURTHER_COST.fullmatch(stale.name) and stale.name not in keys:
                stale.unlink()
        for also in self.also_tables:
            atomic_write_text(self.out / f"cost_{also.scenario.key}.json", json.dumps(also.to_json(), indent=1) + "\n")

    def distil_and_score(self, table: CostTable) -> Library:
        """BLD of every variant (resumed from the store), replace-1-block scores, and the library they make."""
        cfg, arch = self.cfg, self.parent.arch
        t = self._start()
        acts = activations.record(self.parent, self.calibration, progress=self.progress)
        bld_losses = run_bld(
            self.parent, acts, cfg.space, self.store, cfg.bld, self.progress, self.manifest, ranks=self.ranks
        )
        del acts
        self._stage("blockwise local distillation", t)

        t = self._start()
        score_acts = activations.record(self.parent, self.score_windows, progress=self.progress)
        scores = score_library(
            self.parent,
            self.store,
            cfg.space,
            score_acts,
            self.progress,
            ranks=self.ranks,
            method=cfg.scoring,
            samples=cfg.fisher_samples,
        )
        del score_acts
        self._stage("replace-1-block scoring", t)  # under --scoring fisher too: a stage's key in results

        library = build_library(arch, cfg.space, table, scores, bld_losses, self.timing_dtype, self.also_tables)
        if self.ranks.main:
            write_library(library, self.out / "library.json")
        return library

    def realise(self, child: Child, ref: torch.Tensor, gkd: bool) -> Model:
        """Assemble, evaluate, optionally distil and evaluate again."""
        model = assemble_child(self.parent, self.store, child.blocks)
        child.quality_bld = model_quality(model, self.eval_windows, ref)
        if gkd and self.cfg.gkd.steps > 0:
            distill(model, self.parent, self.train_ids, self.cfg.gkd, progress=self.progress, ranks=self.ranks)
            child.quality_gkd = model_quality(model, self.eval_windows, ref)
        return model

    def run(self, budget: Budget) -> dict | None:
        """The whole search; its results on rank 0, None on the other ranks of a sharded search, which leave once
        the children's GKD is done (search/ranks.py: rank 0 alone chooses, times, fuses and reports)."""
        start = time.perf_counter()
        table, bounds = self.check_budget(budget)
        library = self.distil_and_score(table)
        ref = reference_logprobs(self.parent, self.eval_windows)
        parent = Child(
            "parent", "parent", list(self.parent.arch.blocks), table.runtime_ms(self.parent.arch.blocks), kl_sum=0.0
        )
        parent.quality_bld = parent.quality_gkd = model_quality(self.parent, self.eval_windows, ref)
        children = self.ranks.on_main(lambda: self.choose(library, table, budget, bounds))  # landing times children
        main_model = self.build_children(parent, children, library, table, ref)
        if self.ranks.size > 1:
            self.ranks.leave()
            if not self.ranks.main:
                return None
            self.ranks = ONE
        child_dir = save_model(  # an earlier run's child/ holds nothing of this one's (its parent's tokenizer)
            main_model, self.out / "child", dtype=torch.bfloat16, tokenizer_from=self.parent_dir, carry_over=False
        )
        fusion = self.fuse(main_model)
        results = {
            "parent": str(self.parent_dir),
            "budget": asdict(budget),
            "config": asdict(self.cfg),
            "device": table.device,
            "timing_dtype": table.dtype,
            "scenario": asdict(self.cfg.scenario),
            "also_scenarios": [{**asdict(t.scenario), "key": t.scenario.key} for t in self.also_tables],
            "also_cost_models": [t.validation for t in self.also_tables],
            "non_block_ms": table.non_block_ms,
            "cost_model": table.validation,
            "landing_checks": self.landing_checks,
            "target_tolerance": TARGET_TOLERANCE,
            "measure_rounds": MEASURE_ROUNDS,
            "children": [c.to_json() for c in [parent, *children]],
            "pareto_left_out": self.pareto_left_out,
            "child_dir": str(child_dir),
            "stage_seconds": self.timings,
            "stage_peak_mib": self.peak_mib,
        }
        if fusion is not None:
            results["fusion"] = fusion
        results["stage_seconds"]["total"] = time.perf_counter() - start
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=1) + "\n")
        from tessera.search.report import write_report

        write_report(results, library, self.out)
        return results

    def check_budget(self, budget: Budget) -> tuple[CostTable, list[Bound]]:
        """Everything that can refuse the run, before any training: BLD results of another run under `out`,
        then the cost model (about half a minute) and a budget no architecture in the space can meet."""
        cfg, arch = self.cfg, self.parent.arch
        self.manifest = bld_manifest(self.parent, self.calibration, cfg.space, cfg.bld)
        self.store.check(self.manifest)  # writes nothing yet
        # Timed on rank 0 alone: blocks timed on other devices, or by processes sharing one CPU, would not compose.
        table, self.also_tables = self.ranks.on_main(self.cost_model)
        costs_only = build_library(arch, cfg.space, table, None, {}, self.timing_dtype, self.also_tables)
        bounds = speedup_bounds(budget, [table, *self.also_tables], arch, costs_only)
        try:  # the budget's terms jointly (each alone is met)
            solve(costs_only, "stats.runtime_ms", bounds=bounds)
        except InfeasibleError as e:
            raise joint_infeasibility(budget, [table, *self.also_tables], arch, e) from None
        self.ranks.on_main(lambda: self.write_costs(table))  # a failed write heard by every rank
        return table, bounds

    def choose(self, library: Library, table: CostTable, budget: Budget, bounds: list[Bound]) -> list[Child]:
        """The children to build: the MIP's at the budget (first), at each Pareto speedup, and the uniform and
        greedy baselines with, for each, the MIP at the baseline's own predicted runtime (never a worse Σ KL
        than the baseline's: the baseline is one of the architectures that MIP chose among)."""
        arch, tables = self.parent.arch, [table, *self.also_tables]
        main_blocks, bounds = self.land_on_budget(library, tables, budget, bounds)
        t = self._start()
        children = [Child(f"MIP ({budget.describe()})", "mip", main_blocks, 0.0)]
        for speedup in self.cfg.pareto_speedups:
            if budget.target_speedup is not None and math.isclose(speedup, budget.target_speedup):
                continue
            try:
                (sol,) = solve(
                    library,
                    "metrics.kl_div",
                    bounds=speedup_bounds(Budget(target_speedup=speedup), tables, arch, library),
                )
            except InfeasibleError:  # the report's Pareto front goes without it; said, not dropped silently
                self.pareto_left_out.append(speedup)
                if self.progress:
                    print(f"[optimize] --pareto {speedup:g}: no architecture in the space is that fast; left out")
                continue
            children.append(Child(f"MIP (speedup {speedup:g})", "mip", choices_to_blocks(library, sol.choices), 0.0))
        for method, pick in (("uniform", uniform_baseline), ("greedy", greedy_baseline)):
            blocks = pick(library, arch, bounds)
            if blocks is None:
                continue
            children.append(Child(f"{method} ({budget.describe()})", method, blocks, 0.0))
            # A baseline rarely lands where the MIP's child does (uniform choices are coarse, greedy steps
            # overshoot): for a comparison at equal speed, the MIP also solves for exactly the baseline's own
            # predicted runtime, in every scenario, under the budget's other bounds (KV heads, memory) still.
            same = [Bound("stats.runtime_ms", upper=table.runtime_ms(blocks) - table.non_block_ms)]
            same += [
                Bound(f"stats.{runtime_key(t.scenario)}", upper=t.runtime_ms(blocks) - t.non_block_ms)
                for t in self.also_tables
            ]
            timed = {b.key for b in same}
            same += [b for b in bounds if b.key not in timed]
            (sol,) = solve(library, "metrics.kl_div", bounds=same)
            children.append(Child(f"MIP (= {method}'s runtime)", "mip", choices_to_blocks(library, sol.choices), 0.0))
        self._stage("MIP and baselines", t)
        return children

    def land_on_budget(
        self, library: Library, tables: list[CostTable], budget: Budget, bounds: list[Bound]
    ) -> tuple[list[BlockConfig], list[Bound]]:
        """`land_on_budget` with each child, assembled from its distilled blocks, timed against the parent in a
        lockstep of the two in each scenario it asks for, as `measure` times the children at the end; the checks go
        to `self.landing_checks`."""
        arch, t = self.parent.arch, self._start()

        def measure(blocks: list[BlockConfig], timed: Sequence[CostTable]) -> list[tuple[float, float]]:
            pair = self.timed(assemble_child(self.parent, self.store, blocks))
            timings = []
            for table in timed:
                parent_t, child_t = lockstep(pair, table.scenario, TARGET_ROUNDS)
                timings.append((parent_t.latency_ms, child_t.latency_ms))
            return timings

        blocks, bounds, self.landing_checks = land_on_budget(
            library, tables, arch, budget, bounds, measure, self.progress
        )
        if self.landing_checks:
            self._stage("landing on the budget", t)
        return blocks, bounds

    def build_children(
        self, parent: Child, children: list[Child], library: Library, table: CostTable, ref: torch.Tensor
    ) -> Model:
        """Each distinct architecture in turn: assemble, evaluate, GKD (MIP children, or all with baseline_gkd),
        evaluate again, and time against the parent in one lockstep of the two (the measurement the landing loop
        makes, so the saved child's figure and its checks compare). One child at a time: at 70B a child is as
        large as the parent, and its GKD holds four times its weights. The budget's child (children[0]) comes
        last and is returned; the parent's latency is its median over the pairs."""
        main = tuple(children[0].blocks)
        keys = [k for k in dict.fromkeys(tuple(c.blocks) for c in children) if k != main] + [main]
        parent_ms: list[float] = []
        for key in keys:
            mine = [c for c in children if tuple(c.blocks) == key]
            for child in mine:
                child.predicted_ms = table.runtime_ms(child.blocks)
                child.kl_sum = _kl_sum(library, child.blocks)
            t = self._start()
            # Twins (the same architecture from two methods) share one model: same blocks, same GKD, same result.
            model = self.realise(mine[0], ref, any(c.method == "mip" for c in mine) or self.cfg.baseline_gkd)
            for child in mine[1:]:
                child.quality_bld, child.quality_gkd = mine[0].quality_bld, mine[0].quality_gkd
            self._stage("assembly, GKD and evaluation", t, accumulate=True)
            t = self._start()
            if self.ranks.main:  # timed by rank 0 alone, the other ranks waiting (not working beside it)
                with every_core():
                    parent_ms.append(self.measure(model, mine))
            self.ranks.barrier()
            self._stage("end-to-end latency", t, accumulate=True)
            if key != main:
                del model
        if not self.ranks.main:
            return model
        parent.measured_ms, parent.measured_speedup = statistics.median(parent_ms), 1.0
        parent.speedup_rounds = [1.0]
        parent.also_speedups = dict.fromkeys((s.key for s in self.cfg.also_scenarios), 1.0)
        for name in ("assembly, GKD and evaluation", "end-to-end latency"):
            self._report(name)
        return model

    def measure(self, model: Model, children: list[Child]) -> float:
        """`model` (the architecture of `children`) against the parent in a lockstep of the two, in every
        scenario; the parent's latency in the main one."""
        pair = self.timed(model)
        p, c = lockstep(pair, self.cfg.scenario, MEASURE_ROUNDS)
        for child in children:
            child.measured_ms, child.measured_speedup = c.latency_ms, p.latency_ms / c.latency_ms
            # The speedup in each round on its own: how much it moved while the machine's speed did.
            child.speedup_rounds = [a / b for a, b in zip(p.rounds_ms, c.rounds_ms)]
        for scenario in self.cfg.also_scenarios:
            also_p, also_c = lockstep(pair, scenario, MEASURE_ROUNDS)
            for child in children:
                child.also_speedups[scenario.key] = also_p.latency_ms / also_c.latency_ms
        return p.latency_ms

    def timed(self, child: Model) -> list[Model]:
        """The parent and `child` as they are timed: in `timing_dtype` (copies when training's differs)."""
        if self.timed_parent is None:
            self.timed_parent = self.parent.cast(self.timing_dtype)
        return [self.timed_parent, child.cast(self.timing_dtype)]

    def fuse(self, model: Model) -> dict | None:
        """FFN Fusion of the saved child into `out/fused` when asked (cfg.fusion); its summary. Not asked, an
        earlier run's `out/fused` (a fusion of another child) goes."""
        if self.cfg.fusion is None:
            if (self.out / "fused").is_dir():
                shutil.rmtree(self.out / "fused")
            return None
        t = self._start()
        fusion = run_fusion(
            model,
            self.train_ids,
            self.eval_windows,
            self.out / "fused",
            self.cfg.fusion,
            self.cfg.scenario,
            tokenizer_from=self.parent_dir,
            progress=self.progress,
            timing_dtype=self.cfg.timing_dtype,
        )
        fusion |= {k: f"fused/{v}" for k, v in fusion.items() if k.endswith("_png")}  # paths from report.md
        self._stage("FFN fusion", t)
        return fusion


def optimize(
    parent_dir: str | Path,
    out: str | Path,
    budget: Budget,
    cfg: OptimizeConfig,
    corpus: str | Path,
    progress: bool = True,
    fresh: bool = False,
) -> dict:
    """Run Puzzle end to end (see the module docstring). BLD results already in `out/bld` are reused when they
    were computed from the same parent weights, calibration text, search space and BLD settings, refused
    (StoreMismatchError) when not; fresh=True deletes them and trains again."""
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ranks = Ranks.from_environment(torch.device(cfg.device))  # under torchrun: this process's rank (search/ranks.py)
    return Optimizer(Path(parent_dir), Path(corpus), Path(out), cfg, progress, fresh, ranks).run(budget)
