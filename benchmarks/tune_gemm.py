"""Sweep the SwiGLU FFN's two GEMM tilings (output tile, K tile, warps, pipeline stages, GROUP_M) on a GPU, against
cuBLAS in the same run: the evidence behind `kernels.gemm.gemm_blocks` and `kernels.ffn.gate_up_blocks`.

Issue 20 asks for the FFN's Triton GEMMs at or past cuBLAS at every M (bf16: cuBLAS eager; FP8: `torch._scaled_mm`)
and at >= 90 % of copy bandwidth at M <= 16. On the H200 at 3e791a3 they reached 76-81 % at M <= 16 on the 8B shape
and lost from M = 128 up (0.74-0.86x) with one tiling per M range chosen without a sweep. Per shape this sweep
times the whole op (`swiglu_ffn_triton`, as served at M <= 16) with:
1. each gate/up tiling, the down GEMM at its default;
2. each down tiling, the gate/up GEMM at its default;
3. the best of each together, and past 16 rows the same on the persistent TMA schedule (Hopper).
Every candidate's output is checked against the baseline's before it is timed (a wrong or failing tiling is
recorded, never ranked). Times: `triton.testing.do_bench` medians of CUDA-graph replays, shorter than the kernel
suite's. Shapes run in order of importance and the sweep stops at its time budget, writing what it has after every
shape. A cold Triton cache compiles each tiling once per shape kind; `--compile-workers` processes compile them
in parallel into the shared on-disk cache, the kinds in the shapes' order, and a shape is timed once its kind is
compiled (the timing process then finds the kernels there) while the later kinds compile.

Beside its results it writes the winners as a tiling table, `<device>_ffn_tilings.json` (kernels/ffn_tilings.py):
copied as it is into `kernels/configs/`, it steers the served FFN on that GPU (tilings, and at which rows Triton or
cuBLAS runs it); `TESSERA_FFN_TILINGS=<that file>` tries it first (the GPU suite's `ffn_served` step).

    python3 -m tessera.benchmarks.tune_gemm --device cuda [--budget-s 60] [--compile-workers 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, replace
from functools import partial

import torch

from tessera import kernels
from tessera.files import atomic_write_text
from tessera.kernels import ffn_tilings
from tessera.kernels.ffn import gate_up_blocks, swiglu_ffn_fp8_scaled_mm, swiglu_ffn_triton
from tessera.kernels.gemm import DECODE_ROWS, GemmTiling, gemm_blocks, tma_ready

from .bench_ffn import EAGER, SCALED_MM, eager_swiglu, ffn_weights
from .harness import (
    compiling_only,
    copy_bandwidth_gbps,
    environment,
    relative_error,
    results_name,
    time_ms,
    write_results,
)

SHAPES = [  # (precision, model, hidden, intermediate, rows): decode (the served Triton path) and the largest
    # losses first
    ("bf16", "llama-3.1-8b", 4096, 14336, 1),
    ("bf16", "llama-3.1-8b", 4096, 14336, 2048),
    ("fp8", "llama-3.1-8b", 4096, 14336, 1),
    ("fp8", "llama-3.1-8b", 4096, 14336, 2048),
    ("bf16", "llama-3.1-8b", 4096, 14336, 128),
    ("fp8", "llama-3.1-8b", 4096, 14336, 128),
    ("bf16", "llama-3.1-8b", 4096, 14336, 16),
    ("bf16", "nemotron-51b quarter", 8192, 7168, 1),
    ("bf16", "llama-3.1-8b", 4096, 14336, 4096),
    ("fp8", "llama-3.1-8b", 4096, 14336, 16),
    ("fp8", "llama-3.1-8b", 4096, 14336, 4096),
]

# bf16 tilings (block_m, block_n, block_k, warps, stages[, group_m]); FP8 doubles block_k, as gemm_blocks does.
# The gate/up GEMM's block_n counts columns of gate and of up each: a program holds two such accumulators.
DECODE = [  # both GEMMs at decode: a 16-row tile streaming the weights (the gate/up's two accumulators are small)
    GemmTiling(16, 64, 128, 4, 4),
    GemmTiling(16, 32, 128, 4, 4),
    GemmTiling(16, 32, 256, 4, 4),
    GemmTiling(16, 64, 64, 4, 6),
    GemmTiling(16, 64, 128, 4, 6),
    GemmTiling(16, 64, 256, 4, 3),
    GemmTiling(16, 128, 128, 4, 3),
    GemmTiling(16, 64, 128, 8, 4),
]
PREFILL_GATE_UP = [
    GemmTiling(64, 64, 64, 4, 3),
    GemmTiling(128, 64, 64, 8, 3),
    GemmTiling(64, 64, 64, 4, 4),
    GemmTiling(128, 64, 64, 4, 4),
    GemmTiling(64, 128, 64, 4, 4),
    GemmTiling(128, 128, 64, 8, 3),  # 128 x 256 pre-activation columns: the Hopper tutorial's best bf16 tile
    GemmTiling(128, 128, 64, 8, 4),
    GemmTiling(128, 128, 32, 8, 5),
    GemmTiling(256, 64, 64, 8, 3),
    GemmTiling(128, 64, 128, 8, 3),
    GemmTiling(128, 128, 64, 8, 3, group_m=16),
]
PREFILL_DOWN = [
    GemmTiling(64, 128, 64, 4, 3),
    GemmTiling(128, 128, 64, 8, 3),
    GemmTiling(64, 128, 64, 4, 4),
    GemmTiling(128, 128, 64, 4, 4),
    GemmTiling(128, 128, 64, 8, 4),
    GemmTiling(128, 256, 64, 8, 3),
    GemmTiling(128, 256, 64, 8, 4),
    GemmTiling(256, 128, 64, 8, 3),
    GemmTiling(64, 256, 64, 4, 3),
    GemmTiling(128, 128, 128, 8, 3),
    GemmTiling(128, 256, 64, 8, 3, group_m=16),
]


def candidates(precision: str, rows: int) -> tuple[list[GemmTiling], list[GemmTiling]]:
    """The gate/up and down tilings swept at `rows` rows in `precision` ("bf16" or "fp8"), each list led by the
    served default."""
    decode = rows <= DECODE_ROWS
    gate_up, down = (DECODE, DECODE) if decode else (PREFILL_GATE_UP, PREFILL_DOWN)
    if precision == "fp8":
        gate_up, down = ([replace(t, block_k=2 * t.block_k) for t in tilings] for tilings in (gate_up, down))
    size = 1 if precision == "fp8" else 2
    defaults = gate_up_blocks(rows, size), gemm_blocks(rows, size)
    return tuple(
        [default] + [t for t in tilings if t != default] for default, tilings in zip(defaults, (gate_up, down))
    )


class _Case:
    """One shape's operands, its baseline and the op under any pair of tilings."""

    def __init__(
        self,
        precision: str,
        hidden: int,
        inter: int,
        rows: int,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        values: bool = True,
    ) -> None:
        """values: False leaves every operand unfilled (a compile worker's case, on which no kernel runs)."""
        gen = torch.Generator(device).manual_seed(inter)

        def operand(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            if not values:
                return torch.empty(*shape, device=device, dtype=dtype)
            return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

        if values:
            w_gate_up, w_down = ffn_weights(hidden, inter, device, dtype, gen)
        else:
            w_gate_up, w_down = operand(2 * inter, hidden), operand(hidden, inter)
        x, residual = operand(rows, hidden), operand(rows, hidden)
        if precision == "fp8":
            if values:
                gate_up_q, gate_up_scale = kernels.quantize_weight(w_gate_up)
                down_q, down_scale = kernels.quantize_weight(w_down)
            else:
                gate_up_q, down_q = (torch.empty_like(w, dtype=kernels.FP8) for w in (w_gate_up, w_down))
                gate_up_scale, down_scale = (operand(n, dtype=torch.float32) for n in (2 * inter, hidden))
            self.args = (x, gate_up_q, down_q, residual, gate_up_scale, down_scale)
            self.baseline = partial(swiglu_ffn_fp8_scaled_mm, *self.args)
            self.baseline_name = SCALED_MM
            weight_bytes = 3 * hidden * inter
        else:
            self.args = (x, w_gate_up, w_down, residual)
            self.baseline = partial(eager_swiglu, *self.args)
            self.baseline_name = EAGER
            weight_bytes = 3 * hidden * inter * 2
        self.bytes = weight_bytes + 3 * rows * hidden * 2
        self.flops = 6.0 * rows * hidden * inter
        # Checked on the FFN's own output (the residual subtracted: it would dilute the error). Both sides round
        # the SiLU product (FP8: quantize it per token, where a product rounded differently can land in another
        # E4M3 step), as bench_ffn's rows do, with its tolerance.
        self.tolerance = 3e-2

    def op(self, gate_up: GemmTiling, down: GemmTiling, persistent: bool = False):
        return partial(swiglu_ffn_triton, *self.args, persistent=persistent, gate_up_tiling=gate_up, down_tiling=down)

    def check(self, fn, expected: torch.Tensor) -> tuple[float, str | None]:
        """(relative error of the FFN's output, why `fn` cannot be ranked or None): a launch that fails (out of
        shared memory, a compile error) or a wrong output is recorded, never ranked."""
        residual = self.args[3]
        try:
            error = relative_error(fn() - residual, expected - residual)
        except Exception as exc:  # any failure of one candidate is a result, not the sweep's end
            return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return error, None if error <= self.tolerance else f"relative error {error:.1e} > {self.tolerance:.0e}"


def _pairs(precision: str, rows: int) -> list[tuple[GemmTiling, GemmTiling]]:
    """The (gate/up, down) tilings a shape times one by one: each gate/up tiling with the default down, then each
    down tiling with the default gate/up (their first pair is the default)."""
    gate_up, down = candidates(precision, rows)
    return [(t, down[0]) for t in gate_up] + [(gate_up[0], t) for t in down[1:]]


_compile_cases: dict[tuple, _Case] = {}


def _compile_pair(shape: tuple, pair: tuple[GemmTiling, GemmTiling], device_name: str, dtype: torch.dtype) -> bool:
    """A compile worker's job: compile `pair`'s kernels for `shape` on the portable schedule (the persistent one is
    timed for the best pair only: the timing process compiles it) without running them, on unfilled operands.
    Whether it compiled (the timing process records any failure)."""
    device = torch.device(device_name)
    precision, _, hidden, inter, rows = shape
    if shape not in _compile_cases:
        _compile_cases[shape] = _Case(precision, hidden, inter, rows, device, dtype, values=False)
    try:
        with compiling_only():
            _compile_cases[shape].op(*pair)()
    except Exception:  # the timing process records the failure
        return False
    return True


class Compiler:
    """The candidates compiled ahead of the timing, in `workers` spawned processes, shape by shape in SHAPES' order
    (every shape: which kernels a shape compiles depends on its rows and widths, split-K's choice included), so the
    first shape can be timed while later ones still compile; a kernel another shape compiled already is a cache
    hit. The default pairs go first: every other job of a shape compiles one of their two kernels too. Each job
    carries its shape and tilings (a child process imports this module afresh)."""

    def __init__(self, device: torch.device, workers: int, dtype: torch.dtype = torch.bfloat16) -> None:
        self.jobs: dict[tuple, list[Future]] = {shape: [] for shape in SHAPES}
        self.pool = None
        if workers <= 0:
            return
        context = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialized in a forked child
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        pairs = {shape: _pairs(shape[0], shape[4]) for shape in SHAPES}

        def submit(shape: tuple, pair: tuple[GemmTiling, GemmTiling]) -> Future:
            return self.pool.submit(_compile_pair, shape, pair, str(device), dtype)

        for shape, shape_pairs in pairs.items():  # the defaults first
            self.jobs[shape].append(submit(shape, shape_pairs[0]))
        for shape, shape_pairs in pairs.items():
            self.jobs[shape] += [submit(shape, pair) for pair in shape_pairs[1:]]

    def wait(self, shape: tuple, timeout_s: float | None = None) -> int:
        """Wait (at most timeout_s) until `shape`'s pairs are compiled; how many compiled. A job that failed or did
        not finish in time leaves its kernels to the timing process, which compiles what it does not find."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        compiled = 0
        for job in self.jobs.get(shape, []):
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                compiled += job.result(timeout=left)
            except Exception as exc:  # a broken pool (a worker killed), a timeout: the sweep goes on
                print(f"compile job for {shape}: {type(exc).__name__}: {exc}", flush=True)
        return compiled

    def close(self) -> None:
        """Drop the jobs not started (a budget spent before their shapes); the running ones end on their own."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def precompile(device: torch.device, workers: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Compile every shape's candidates (`Compiler`) and wait for all of them; how many pairs compiled."""
    compiler = Compiler(device, workers, dtype)
    try:
        return sum(compiler.wait(shape) for shape in SHAPES)
    finally:
        compiler.close()


def _graph_ms(fn, device: torch.device) -> float:
    fn()
    return time_ms(fn, device, rep_ms=40)[0]


def sweep(device: torch.device, budget_s: float, compile_workers: int = 0, out=None, dtype=torch.bfloat16) -> dict:
    """Every shape of SHAPES in order until `budget_s` is spent, the results written after each (to `out`, the
    committed results folder by default). dtype: the activations' (fp16 under the interpreter, whose bf16 dots are
    wrong)."""
    start = time.perf_counter()
    compiler = Compiler(device, compile_workers, dtype)
    try:
        copy_gbps = copy_bandwidth_gbps(device)
        result = {**environment(device), "copy_bandwidth_gbps": copy_gbps, "shapes": []}
        for shape in SHAPES:
            if time.perf_counter() - start > budget_s:
                print(f"budget of {budget_s:.0f} s spent: {shape} and later not swept")
                break
            if compiler.pool is not None:
                compiled = compiler.wait(shape, budget_s - (time.perf_counter() - start))
                print(f"{shape}: {compiled} pairs compiled ahead, at {time.perf_counter() - start:.0f} s", flush=True)
                if time.perf_counter() - start > budget_s:
                    print(f"budget of {budget_s:.0f} s spent: {shape} and later not swept")
                    break
            entry = sweep_shape(*shape, device, copy_gbps, dtype)
            result["shapes"].append(entry)
            print(_line(entry), flush=True)
            path = write_results(results_name(device, "tune_gemm"), result, table(result), out)
            tilings = path.with_name(ffn_tilings.table_name(device))  # as kernels/configs/ names it
            atomic_write_text(tilings, json.dumps(tiling_table(result), indent=2) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        compiler.close()
    return result


def sweep_shape(
    precision: str,
    model: str,
    hidden: int,
    inter: int,
    rows: int,
    device: torch.device,
    copy_gbps: float,
    dtype=torch.bfloat16,
) -> dict:
    """One shape's sweep: the default, every gate/up and down tiling, the best pair (module doc)."""
    case = _Case(precision, hidden, inter, rows, device, dtype)
    expected = case.baseline()
    baseline_ms = _graph_ms(case.baseline, device)

    def timed(pair: tuple[GemmTiling, GemmTiling], persistent: bool = False) -> dict:
        fn = case.op(*pair, persistent=persistent)
        error, failure = case.check(fn, expected)
        ms = float("nan") if failure else _graph_ms(fn, device)
        return {
            "gate_up": asdict(pair[0]),
            "down": asdict(pair[1]),
            "persistent": persistent,
            "ms": ms,
            "speedup": baseline_ms / ms,
            "tflops": case.flops / (ms * 1e-3) / 1e12,
            "pct_copy_bandwidth": 100 * case.bytes / (ms * 1e-3) / 1e9 / copy_gbps,
            "relative_error": error,
            "failure": failure,
        }

    n_gate_up = len(candidates(precision, rows)[0])
    swept = [timed(pair) for pair in _pairs(precision, rows)]
    gate_up_rows, down_rows = swept[:n_gate_up], swept[:1] + swept[n_gate_up:]  # the default pair timed once
    best_pair = GemmTiling(**_best(gate_up_rows)["gate_up"]), GemmTiling(**_best(down_rows)["down"])
    best = [timed(best_pair)]
    if rows > DECODE_ROWS and tma_ready(*case.args[1:3]):
        best.append(timed(best_pair, persistent=True))
    return {
        "precision": precision,
        "model": model,
        "hidden": hidden,
        "intermediate": inter,
        "rows": rows,
        "baseline": case.baseline_name,
        "baseline_ms": baseline_ms,
        "default": swept[0],
        "best": _best(best + swept),
        "gate_up_tilings": gate_up_rows,
        "down_tilings": down_rows,
        "best_pairs": best,
    }


def tiling_table(result: dict) -> dict:
    """The sweep's result as kernels/ffn_tilings.py's table: for each precision and rows swept, the fastest checked pair
    (on the 8B shape where several shapes share the rows: the shape every entry is measured on) with its speedup."""
    entries: dict[tuple[str, int], dict] = {}
    for shape in result["shapes"]:
        key = (shape["precision"], shape["rows"])
        if key in entries and shape["model"] != "llama-3.1-8b":
            continue
        best = shape["best"]
        entries[key] = {
            "precision": shape["precision"],
            "rows": shape["rows"],
            "shape": [shape["hidden"], shape["intermediate"]],
            "gate_up": best["gate_up"],
            "down": best["down"],
            "persistent": best["persistent"],
            "speedup": best["speedup"],
            "baseline": shape["baseline"],
        }
    return {
        "device": result["device"],
        "measured": f"benchmarks/tune_gemm.py at commit {result['commit']}, {result['date']}",
        "entries": [entries[key] for key in sorted(entries)],
    }


def _best(rows: list[dict]) -> dict:
    ranked = [r for r in rows if r["failure"] is None]
    if not ranked:
        raise RuntimeError(f"tune_gemm: no tiling matched the baseline: {[r['failure'] for r in rows]}")
    return min(ranked, key=lambda r: r["ms"])


def _tiling(t: dict) -> str:
    group = f", group {t['group_m']}" if t["group_m"] != 8 else ""
    return f"{t['block_m']}x{t['block_n']}x{t['block_k']} w{t['num_warps']} s{t['num_stages']}{group}"


def _line(entry: dict) -> str:
    best, default = entry["best"], entry["default"]
    return (
        f"{entry['precision']} {entry['model']} M={entry['rows']}: baseline {entry['baseline_ms']:.4f} ms; default "
        f"{default['ms']:.4f} ms = {default['speedup']:.2f}x; best {best['ms']:.4f} ms = {best['speedup']:.2f}x "
        f"({best['pct_copy_bandwidth']:.0f} % copy) with gate/up {_tiling(best['gate_up'])}, down "
        f"{_tiling(best['down'])}{' persistent' if best['persistent'] else ''}"
    )


def table(result: dict) -> str:
    lines = [
        f"FFN GEMM tilings on {result['device']} (commit {result['commit']}, {result['date']}); copy bandwidth "
        f"{result['copy_bandwidth_gbps']:.0f} GB/s. Baselines: cuBLAS eager (bf16), `torch._scaled_mm` (FP8). "
        "Tilings: block_m x block_n x block_k, warps, stages (gate/up's block_n per projection).\n",
        "| precision | model | rows | baseline ms | default ms | default | best ms | best | % copy | TFLOP/s "
        "| best gate/up | best down | schedule |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for s in result["shapes"]:
        b, d = s["best"], s["default"]
        lines.append(
            f"| {s['precision']} | {s['model']} | {s['rows']} | {s['baseline_ms']:.4f} | {d['ms']:.4f} | "
            f"{d['speedup']:.2f}x | {b['ms']:.4f} | {b['speedup']:.2f}x | {b['pct_copy_bandwidth']:.0f} | "
            f"{b['tflops']:.0f} | {_tiling(b['gate_up'])} | {_tiling(b['down'])} | "
            f"{'persistent' if b['persistent'] else 'portable'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--compile-workers", type=int, default=12, help="processes compiling the tilings ahead")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("tune_gemm: tilings are timed on a GPU only (--device cuda)")
    sweep(device, args.budget_s, args.compile_workers)


if __name__ == "__main__":
    main()
