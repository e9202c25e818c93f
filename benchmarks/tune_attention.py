"""Sweep the paged decode kernel's tilings (keys per tile, warps, pipeline stages, SM waves of the context split)
on a GPU, against SDPA's flash backend on a contiguous cache in the same run, at the decode shapes of
bench_attention: the evidence behind `kernels.attention_paged.default_tiling`.

Every tiling's output is checked against SDPA's before it is timed (a wrong tiling is recorded, never ranked).
Times: `triton.testing.do_bench` medians of CUDA-graph replays, shorter runs than the kernel suite's (the sweep
times ~40 tilings per shape inside one device call). Shapes run in order of importance and the sweep stops at
its time budget, writing what it has after every shape.

    python3 -m tessera.benchmarks.tune_attention --device cuda [--budget-s 90]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from tessera.kernels.attention_paged import Tiling, attention_paged_triton, block_shape, default_tiling

from . import bench_attention
from .bench_attention import HEAD_DIM
from .harness import copy_bandwidth_gbps, environment, relative_error, results_name, time_ms, write_results

SHAPES = [  # (model, query heads, KV heads, batch, context): the shapes below 1.0x SDPA on the H200 first
    # (3e791a3: G = 32 and 64 at batch 16 and 64, G = 4 at batch 16; G = 32 never swept before), then the rest
    ("nemotron-51b kv2", 64, 2, 16, 8192),
    ("nemotron-51b kv1", 64, 1, 16, 8192),
    ("nemotron-51b kv2", 64, 2, 64, 8192),
    ("nemotron-51b kv1", 64, 1, 64, 8192),
    ("llama-3.1-8b", 32, 8, 16, 8192),
    ("llama-3.1-8b", 32, 8, 64, 8192),
    ("llama-3.1-8b", 32, 8, 1, 8192),
    ("llama-3.1-70b", 64, 8, 64, 8192),
    ("nemotron-51b kv1", 64, 1, 1, 8192),
    ("llama-3.1-8b", 32, 8, 1, 1024),
]
TILINGS = [
    Tiling(block_n, warps, stages, waves)
    for block_n in (64, 128)
    for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3))
    for waves in (1, 2, 4, 8)
] + [Tiling(32, 4, 3, 4), Tiling(64, 4, 4, 4), Tiling(128, 4, 4, 4)]


def _graph_ms(fn, device: torch.device) -> float:
    fn()  # compiled before it is captured
    return time_ms(fn, device, rep_ms=40)[0]


def sweep(device: torch.device, budget_s: float, out=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    copy_gbps = copy_bandwidth_gbps(device)
    baseline = bench_attention._sdpa_backends(device, dtype)
    env = environment(device)
    result = {**env, "copy_bandwidth_gbps": copy_gbps, "baseline": baseline[1], "shapes": []}
    start = time.perf_counter()
    for model, n_heads, n_kv, batch, context in SHAPES:
        if time.perf_counter() - start > budget_s:
            print(f"budget of {budget_s:.0f} s spent: {model} batch {batch} context {context} and later not swept")
            break
        case = bench_attention._decode_case(model, n_heads, n_kv, batch, context, device, dtype, baseline)
        expected = case.baseline()
        sdpa_ms = _graph_ms(case.baseline, device)
        # the launcher's, for one query each
        default = default_tiling(*block_shape(1, n_heads // n_kv, HEAD_DIM), batch * n_kv, device)
        rows = []
        for tiling in TILINGS:
            fn = partial(attention_paged_triton, *case.candidate.args, tiling=tiling)
            error = relative_error(fn(), expected)
            ms = _graph_ms(fn, device) if error <= case.tolerance else float("nan")
            rows.append(
                {
                    **vars(tiling),
                    "ms": ms,
                    "speedup": sdpa_ms / ms,
                    "pct_copy_bandwidth": 100 * case.bytes / (ms * 1e-3) / 1e9 / copy_gbps,
                    "relative_error": error,
                    "default": tiling == default,
                }
            )
        correct = [r for r in rows if r["ms"] == r["ms"]]
        if not correct:
            raise RuntimeError(f"tune_attention: no tiling matched SDPA at {model} batch {batch} context {context}")
        best = min(correct, key=lambda r: r["ms"])
        shape = {"model": model, "q_heads": n_heads, "kv_heads": n_kv, "batch": batch, "context": context}
        result["shapes"].append({**shape, "sdpa_ms": sdpa_ms, "best": best, "tilings": rows})
        mine = next((r for r in rows if r["default"]), None)
        print(
            f"{model} b{batch} ctx{context}: SDPA {sdpa_ms:.4f} ms; best {best['ms']:.4f} ms = {best['speedup']:.2f}x "
            f"({best['pct_copy_bandwidth']:.0f} % copy) with {Tiling(**{k: best[k] for k in vars(TILINGS[0])})}; "
            + (f"default {mine['ms']:.4f} ms = {mine['speedup']:.2f}x" if mine else "default not in the sweep"),
            flush=True,
        )
        write_results(results_name(device, "tune_attention"), result, table(result), out)
        del case, expected
        torch.cuda.empty_cache()
    return result


def table(result: dict) -> str:
    lines = [
        f"Paged decode tilings on {result['device']} (commit {result['commit']}, {result['date']}); baseline "
        f"{result['baseline']}, contiguous cache; copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s.\n",
        "| model | batch | context | SDPA ms | best ms | speedup | % copy | best tiling | default ms | default |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in result["shapes"]:
        b = s["best"]
        mine = next((r for r in s["tilings"] if r["default"]), None)
        tiling = f"{b['block_n']} keys, {b['num_warps']} warps, {b['num_stages']} stages, {b['waves']} waves"
        lines.append(
            f"| {s['model']} | {s['batch']} | {s['context']} | {s['sdpa_ms']:.4f} | {b['ms']:.4f} | "
            f"{b['speedup']:.2f}x | {b['pct_copy_bandwidth']:.0f} | {tiling} | "
            + (f"{mine['ms']:.4f} | {mine['speedup']:.2f}x |" if mine else "- | - |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=90.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("tune_attention: tilings are timed on a GPU only (--device cuda)")
    sweep(device, args.budget_s)


if __name__ == "__main__":
    main()
