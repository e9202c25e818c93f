"""The Fisher estimate of replace-1-block scores against the exact scores, on a finished `tessera optimize` run.

    python -m tessera.benchmarks.compare_scoring runs/demo [--samples 4,16,64]

Takes the run's parent (from results.json), distilled blocks (bld/), cost table and library.json (its exact
scores, from the same held-out windows: the first `score_windows` of the validation split), scores every
(layer, variant) pair again by the Fisher estimate for each sample count, and reports: the seconds it took (the
exact scores' seconds are the run's own stage), the rank agreement with the exact scores (Spearman over all
pairs and within each layer), the estimate / exact ratio, and what the MIP chooses from each library at the
run's speedups (1.25, 1.5, 2 of the parent's predicted latency): each child assembled from its BLD blocks and its
KL from the parent measured on the held-out evaluation windows, before any GKD. Writes
`<device>_compare_scoring.{json,md}` under --results (default runs/bench).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from tessera.search import activations
from tessera.search.assemble import assemble_child
from tessera.search.bld import SublayerStore
from tessera.search.cost import CostTable
from tessera.search.data import load_parent
from tessera.search.library import SearchSpace, choices_to_blocks, read_library
from tessera.search.mip import solve
from tessera.search.pipeline import Budget, OptimizeConfig, held_out_windows, speedup_bounds
from tessera.search.scoring import model_quality, reference_logprobs, score_library

from .harness import environment, results_dir, results_name, write_results

SPEEDUPS = (1.25, 1.5, 2.0)


def compare(run: Path, samples: list[int], corpus: Path | None = None, speedups: tuple[float, ...] = SPEEDUPS) -> dict:
    """Exact and Fisher scores of a finished exact-scoring run, and the MIP's children at `speedups` under each
    (each speedup must be within what the run's cost table says its search space reaches)."""
    results = json.loads((run / "results.json").read_text())
    config = results["config"]
    if config.get("scoring", "exact") != "exact":
        raise SystemExit(f"{run}: its library holds {config['scoring']} scores; compare against an exact run")
    from tessera.demo import CORPUS_DIR

    loaded = load_parent(results["parent"], corpus or CORPUS_DIR, torch.device("cpu"))
    parent = loaded.model
    windows = OptimizeConfig(
        score_windows=config["score_windows"], eval_windows=config["eval_windows"], seq_len=config["seq_len"]
    )
    score_windows, eval_windows = held_out_windows(loaded.val_ids, windows, corpus or CORPUS_DIR)
    space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["space"].items()})
    store, library = SublayerStore(run / "bld"), read_library(run / "library.json")
    table = CostTable.from_json(json.loads((run / "cost.json").read_text()))
    acts = activations.record(parent, score_windows, progress=False)
    ref = reference_logprobs(parent, eval_windows)

    def children(kl: dict[tuple[str, str], float]) -> list[dict]:
        lib = copy.deepcopy(library)
        for (layer, name), value in kl.items():
            lib[layer][name]["metrics"]["kl_div"] = value
        out = []
        for speedup in speedups:
            bounds = speedup_bounds(Budget(target_speedup=speedup), [table], parent.arch, lib)  # the run's own
            (solution,) = solve(lib, "metrics.kl_div", bounds=bounds)
            blocks = choices_to_blocks(lib, solution.choices)
            quality = model_quality(assemble_child(parent, store, blocks), eval_windows, ref)
            out.append({"speedup": speedup, "blocks": [b.name for b in blocks], "kl_div": quality["kl_div"]})
        return out

    exact = {(layer, name): e["metrics"]["kl_div"] for layer, v in library.items() for name, e in v.items()}
    rows = [
        {
            "scoring": "exact",
            "seconds": results["stage_seconds"]["replace-1-block scoring"],
            "children": children(exact),
        }
    ]
    for s in samples:
        start = time.perf_counter()
        scores = score_library(parent, store, space, acts, progress=False, method="fisher", samples=s)
        seconds = time.perf_counter() - start
        fisher = {(layer, name): e["kl_div"] for layer, v in scores.items() for name, e in v.items()}
        swapped = [k for k, v in exact.items() if v > 0]  # the parent's own blocks score 0 in both
        x, y = np.array([exact[k] for k in swapped]), np.array([fisher[k] for k in swapped])
        per_layer = [
            spearmanr([exact[k] for k in swapped if k[0] == layer], [fisher[k] for k in swapped if k[0] == layer])[0]
            for layer in library
        ]
        rows.append(
            {
                "scoring": f"fisher, {s} samples",
                "samples": s,
                "seconds": seconds,
                "spearman": float(spearmanr(x, y)[0]),
                "spearman_per_layer_mean": float(np.mean(per_layer)),
                "spearman_per_layer_min": float(np.min(per_layer)),
                "ratio_median": float(np.median(y / x)),
                "ratio_q10": float(np.quantile(y / x, 0.1)),
                "ratio_q90": float(np.quantile(y / x, 0.9)),
                "largest_exact": float(x.max()),
                "fisher_at_largest_exact": float(y[x.argmax()]),
                "children": children(fisher),
            }
        )
    return {"run": str(run), "pairs": len(exact), "speedups": list(speedups), "rows": rows}


def table(result: dict) -> str:
    head = "| scoring | seconds | Spearman, all pairs | per layer: mean, min | estimate / exact: median (10-90 %) | "
    head += " | ".join(f"MIP child at {s:g}x: KL" for s in result["speedups"]) + " |"
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(result["speedups"])]
    for r in result["rows"]:
        kl = " | ".join(f"{c['kl_div']:.4f}" for c in r["children"])
        if r["scoring"] == "exact":
            lines.append(f"| exact | {r['seconds']:.1f} (the run's stage) | – | – | – | {kl} |")
        else:
            lines.append(
                f"| {r['scoring']} | {r['seconds']:.1f} | {r['spearman']:.3f} | {r['spearman_per_layer_mean']:.3f}, "
                f"{r['spearman_per_layer_min']:.3f} | {r['ratio_median']:.2f} ({r['ratio_q10']:.2f}-"
                f"{r['ratio_q90']:.2f}) | {kl} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `tessera optimize --out` folder scored exactly")
    parser.add_argument("--samples", default="4,16,64", help="Fisher sample counts, comma-separated")
    parser.add_argument("--corpus", type=Path, default=None, help="the run's corpus (default: the demo's)")
    parser.add_argument("--results", type=Path, default=None, help="folder for the JSON and Markdown")
    args = parser.parse_args()
    result = compare(args.run, [int(s) for s in args.samples.split(",")], args.corpus)
    env = environment("cpu")
    md = (
        f"Fisher vs exact replace-1-block scores of `{args.run}` ({result['pairs']} pairs) on {env['device']} "
        f"(commit {env['commit']}, {env['date']}); children: BLD blocks, KL on held-out windows before GKD\n\n"
        + table(result)
    )
    name = results_name(torch.device("cpu"), "compare_scoring")
    path = write_results(name, {**env, **result}, md, args.results or results_dir())
    print(md + f"\n{path}")


if __name__ == "__main__":
    main()
