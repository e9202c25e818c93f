"""How `tessera optimize` scales (`tessera bench search-scale`): each stage's seconds and peak memory on random
parents of the Llama-3.2-1B shape (hidden 2048, 32 query heads of 64, 8 KV heads, SwiGLU 8192, tied
embeddings; the demo tokenizer's 8192-token vocabulary instead of 128,256, since the corpus is the demo's), or
with `--shape llama-3.1-8b` Llama-3.1-8B's block (hidden 4096, 32 heads of 128, 8 KV heads, SwiGLU 14336), at
several depths, with tiny token budgets: the point is the work per layer and per variant, not quality.

Each stage's work is a count the run's shape fixes (`work_units`): BLD trains every non-parent sublayer of every
layer; scoring runs, for every (layer, variant) pair, the layers after the swapped one and the LM head;
calibration times one stack per distinct variant and the check architectures; GKD, evaluation and the latency
phase run each child's layers. Seconds per unit at one depth predict another depth, or another model once
scaled by its block's size (`predict`): the table in docs/optimize.md ("How the search scales").
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.demo import CORPUS_DIR, PARENT_DIR
from tessera.runtime.loader import save_model
from tessera.runtime.model import Model
from tessera.search.bld import BLDConfig
from tessera.search.cost import Scenario
from tessera.search.gkd import GKDConfig
from tessera.search.library import SearchSpace
from tessera.search.pipeline import Budget, OptimizeConfig, optimize

LLAMA_3_2_1B = {"hidden_size": 2048, "n_heads": 32, "head_dim": 64, "n_kv_heads": 8, "intermediate_size": 8192}
LLAMA_3_1_8B = {"hidden_size": 4096, "n_heads": 32, "head_dim": 128, "n_kv_heads": 8, "intermediate_size": 14336}
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B}  # `bench search-scale --shape`
# Llama-3.1-70B's block, for the prediction: hidden 8192, 64 heads of 128, 8 KV heads, SwiGLU 28672, 80 layers.
LLAMA_70B = {"hidden_size": 8192, "n_heads": 64, "head_dim": 128, "n_kv_heads": 8, "intermediate_size": 28672}
LLAMA_70B_LAYERS = 80


def parent_arch(layers: int, shape: dict = LLAMA_3_2_1B) -> ArchConfig:
    block = BlockConfig(AttentionConfig("gqa", shape["n_kv_heads"]), FFNConfig("swiglu", shape["intermediate_size"]))
    return ArchConfig(
        vocab_size=8192,
        hidden_size=shape["hidden_size"],
        n_heads=shape["n_heads"],
        head_dim=shape["head_dim"],
        blocks=(block,) * layers,
        tie_embeddings=True,
        max_position_embeddings=1024,
        eos_token_ids=(0,),
        dtype="float32",
    )


def config(device: torch.device, scoring: str = "exact") -> OptimizeConfig:
    """Tiny token budgets: every stage runs its full loop over layers and variants, on a few short windows."""
    return OptimizeConfig(
        scoring=scoring,
        scenario=Scenario(batch=1, prompt_len=16, gen_len=8),
        bld=BLDConfig(steps=2, batch_windows=1, eval_windows=1),
        gkd=GKDConfig(steps=2, batch_size=1, seq_len=64),
        calibration_windows=3,  # BLD: 1 to train on, 1 to evaluate, and more than both
        score_windows=1,
        eval_windows=1,
        seq_len=64,
        pareto_speedups=(),
        validate_architectures=2,
        device=str(device),
    )


def work_units(
    arch: ArchConfig,
    space: SearchSpace,
    children: int,
    checks: int,
    solves: int,
    fisher_samples: int | None = None,
) -> dict[str, float]:
    """What each stage repeats, counted in blocks (a block run once over the stage's tokens), so counts compare
    across depths: the variants of layer 0 stand for every layer's (the parent's layers are alike). Scoring:
    exact, the swapped block and the layers after it for every pair; by the Fisher estimate (`fisher_samples`
    draws), every variant once, and the parent's forward and its samples + 1 backward passes, a backward counted
    as two blocks a layer."""
    n = arch.n_layers
    variants = [len(space.block_variants(arch, i)) for i in range(n)]
    trained = [len(space.attention_variants(arch, i)) + len(space.ffn_variants(arch, i)) - 2 for i in range(n)]
    if fisher_samples is None:
        scoring = sum(v * (n - i) for i, v in enumerate(variants))
    else:
        scoring = sum(variants) + n * (1 + 2 * (fisher_samples + 1))
    return {
        "cost model": variants[0] * 4 + checks * n,  # a 4-block stack per distinct variant, n blocks per check
        "blockwise local distillation": sum(trained),  # sublayers trained, each for its steps
        "replace-1-block scoring": scoring,
        "landing on the budget": solves * 2 * n,  # parent and child, per solve
        "assembly, GKD and evaluation": children * n,
        "end-to-end latency": children * 2 * n,  # each child with the parent, in a lockstep of the two
    }


def block_params(shape: dict) -> int:
    """One parent block's parameters (the config's own count)."""
    arch = parent_arch(1, shape)
    return arch.block_params(arch.blocks[0])


def run(
    device: torch.device,
    depths: tuple[int, ...] = (4, 8, 16),
    shape: dict = LLAMA_3_2_1B,
    on_depth: Callable[[dict], None] | None = None,
    scoring: str = "exact",
    target_speedup: float = 1.5,
) -> dict:
    """The search at each depth of `shape`; training in float32, timing in the serving precision (bf16 on
    CUDA: OptimizeConfig.timing_dtype). `on_depth` gets the result so far after each depth (a run cut short by
    a time limit keeps the depths it finished)."""
    rows = []
    space = SearchSpace()
    for layers in depths:
        arch = parent_arch(layers, shape)
        print(f"[search-scale] {layers} layers of hidden {shape['hidden_size']}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            model = Model.empty(arch, device, torch.float32).init_weights(seed=0)
            parent = save_model(model, Path(tmp) / "parent", tokenizer_from=PARENT_DIR)
            del model
            cfg = config(device, scoring)
            budget = Budget(target_speedup=target_speedup)
            results = optimize(parent, Path(tmp) / "run", budget, cfg, CORPUS_DIR, fresh=True)
        children = len({tuple(c["blocks"]) for c in results["children"][1:]})
        solves = len(results["landing_checks"])
        samples = cfg.fisher_samples if scoring == "fisher" else None
        units = work_units(arch, space, children, 1 + cfg.validate_architectures, solves, samples)
        rows.append(
            {
                "layers": layers,
                "variants_per_layer": len(space.block_variants(arch, 0)),
                "children": children,
                "solves": solves,
                "stage_seconds": results["stage_seconds"],
                "stage_peak_mib": results["stage_peak_mib"],
                "work_units": units,
                "seconds_per_unit": {k: results["stage_seconds"][k] / u for k, u in units.items()},
            }
        )
        if on_depth is not None:
            on_depth(_result(device, shape, space, rows, scoring))
    return _result(device, shape, space, rows, scoring)


def _result(device: torch.device, shape: dict, space: SearchSpace, rows: list[dict], scoring: str) -> dict:
    """The rows so far, with the Llama-70B extrapolation from the deepest."""
    deepest = rows[-1]
    big = parent_arch(LLAMA_70B_LAYERS, LLAMA_70B)
    cfg = config(device, scoring)
    samples = cfg.fisher_samples if scoring == "fisher" else None
    units_70b = work_units(big, space, deepest["children"], 1 + cfg.validate_architectures, deepest["solves"], samples)
    scale = block_params(LLAMA_70B) / block_params(shape)
    prediction = {k: deepest["seconds_per_unit"][k] * u * scale for k, u in units_70b.items()}
    return {
        "shape": shape,
        "config": "tiny token budgets (bench_search_scale.config)",
        "scoring": scoring,
        "rows": list(rows),
        "llama_70b": {"work_units": units_70b, "block_size_ratio": scale, "predicted_seconds": prediction},
    }


def table(result: dict) -> str:
    rows = result["rows"]
    stages = list(rows[0]["work_units"])
    head = "| stage | " + " | ".join(f"{r['layers']} layers: s (peak MiB)" for r in rows)
    head += " | units at " + " / ".join(str(r["layers"]) for r in rows) + " layers | s per unit "
    head += "| Llama-70B units | 70B s (extrapolated) |"
    lines = [head, "|---|" + "---:|" * (len(rows) + 4)]
    big = result["llama_70b"]
    for stage in stages:
        cells = [f"{r['stage_seconds'][stage]:.1f} ({r['stage_peak_mib'][stage]:.0f})" for r in rows]
        units = " / ".join(f"{r['work_units'][stage]:.0f}" for r in rows)
        per_unit = " / ".join(f"{r['seconds_per_unit'][stage]:.3f}" for r in rows)
        lines.append(
            f"| {stage} | " + " | ".join(cells) + f" | {units} | {per_unit} | {big['work_units'][stage]:.0f} "
            f"| {big['predicted_seconds'][stage]:.0f} |"
        )
    return "\n".join(lines) + "\n"
