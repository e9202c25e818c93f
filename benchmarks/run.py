"""Run the kernel benchmark suites (`tessera bench kernels`), the whole-model decode benchmark (`tessera bench
model`), the FFN Fusion decode benchmark (`tessera bench fusion`), the serving benchmark (`tessera bench
serving`), the search's scaling run (`tessera bench search-scale`), the cost model's accuracy (`tessera bench
cost-model`) and prefix caching's effect (`tessera bench prefix`); write results JSON and a Markdown table
per suite to `out` (default: harness.results_dir(), runs/bench/ in the checkout)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import (
    bench_attention,
    bench_cost_model,
    bench_ffn,
    bench_fusion,
    bench_model,
    bench_norm,
    bench_parallel,
    bench_prefix,
    bench_search_scale,
    bench_serving,
)
from .harness import (
    copy_bandwidth_gbps,
    environment,
    kernel_table,
    measure_cases,
    results_dir,
    results_name,
    write_results,
)

__all__ = [
    "results_dir",
    "run_cost_model",
    "run_fusion",
    "run_kernels",
    "run_model",
    "run_model_pdl",
    "run_parallel",
    "run_prefix",
    "run_search_scale",
    "run_serving",
]

KERNEL_SUITES = {  # name -> (module, its function of the device giving the cases), looked up when a suite runs
    "norm": (bench_norm, "cases"),
    "ffn": (bench_ffn, "cases"),
    "attention": (bench_attention, "cases"),
    "ffn_served": (bench_ffn, "served_cases"),
}


def _header(env: dict, what: str, copy_gbps: float) -> str:
    return (
        f"{what} on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']}, "
        f"triton {env.get('triton', '-')}); measured copy bandwidth {copy_gbps:.0f} GB/s\n\n"
    )


def run_kernels(device: torch.device, suites: list[str] | None = None, out: Path | None = None) -> list[Path]:
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    paths = []
    for name in suites or list(KERNEL_SUITES):
        env = environment(device)
        note = "" if device.type == "cuda" else "CPU: the ops run their plain-torch references (sanity only).\n\n"

        def write(rows: list[dict], name: str = name, env: dict = env, note: str = note) -> Path:
            md = _header(env, f"Kernel benchmark `{name}`", copy_gbps) + note + kernel_table(rows)
            results = {**env, "suite": name, "copy_bandwidth_gbps": copy_gbps, "results": rows}
            return write_results(results_name(device, f"kernels_{name}"), results, md, out)

        # Written after every case too: a suite cut short by the GPU suite's time limit keeps what it measured.
        paths.append(write(measure_cases(getattr(*KERNEL_SUITES[name])(device), device, copy_gbps, written=write)))
    return paths


def run_model(device: torch.device, out: Path | None = None) -> Path:
    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device)

    def write(result: dict) -> Path:  # after every scenario too: a step cut short by its time limit keeps them
        md = _header(env, f"Decode, {result['model']}, {result['dtype']}", copy_gbps) + bench_model.table(result)
        results = {**env, "copy_bandwidth_gbps": copy_gbps, **result}
        return write_results(results_name(device, "model_decode"), results, md, out)

    return write(bench_model.run(device, copy_gbps, written=write))


def run_model_pdl(device: torch.device, out: Path | None = None) -> Path:
    """The decode step with and without programmatic dependent launch (bench_model.pdl_comparison)."""
    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device)
    result = bench_model.pdl_comparison(device, copy_gbps)
    title = f"Decode with and without programmatic dependent launch, {result['model']}, {result['dtype']}"
    md = _header(env, title, copy_gbps) + bench_model.pdl_table(result)
    results = {**env, "copy_bandwidth_gbps": copy_gbps, **result}
    return write_results(results_name(device, "model_decode_pdl"), results, md, out)


def run_model_profile(device: torch.device, out: Path | None = None) -> Path:
    """Where the decode step's time goes: its kernels by kind, and the idle time between them
    (bench_model.profile_steps)."""
    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device)

    def write(result: dict) -> Path:  # after every scenario too: a step cut short by its time limit keeps them
        md = _header(env, f"Decode step profile, {result['model']}, {result['dtype']}", copy_gbps)
        md += f"Timing: {result['timing']}.\n\n" + bench_model.profile_table(result)
        results = {**env, "copy_bandwidth_gbps": copy_gbps, **result}
        return write_results(results_name(device, "model_profile"), results, md, out)

    return write(bench_model.profile_steps(device, copy_gbps, written=write))


def run_fusion(device: torch.device, out: Path | None = None) -> Path:
    env = environment(device)
    result = bench_fusion.run(device)
    md = (
        f"FFN Fusion decode on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']}, "
        f"triton {env.get('triton', '-')})\n\n" + bench_fusion.table(result)
    )
    return write_results(results_name(device, "fusion_decode"), {**env, **result}, md, out)


def run_parallel(device: torch.device, out: Path | None = None) -> Path:
    """The decode step over 2 tensor-parallel ranks, with and without its all-reduces, vs one process
    (bench_parallel)."""
    env = environment(device)
    result = bench_parallel.run(device)
    md = f"Tensor-parallel decode on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']})\n\n"
    return write_results(results_name(device, "parallel"), {**env, **result}, md + bench_parallel.table(result), out)


def run_prefix(device: torch.device, out: Path | None = None) -> Path:
    """Prompts sharing their first tokens served with and without prefix caching (bench_prefix)."""
    env = environment(device)
    result = bench_prefix.run(device)
    md = f"Prefix caching on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']})\n\n"
    return write_results(results_name(device, "prefix"), {**env, **result}, md + bench_prefix.table(result), out)


def run_serving(device: torch.device, out: Path | None = None, **kwargs) -> Path:
    """CPU: `tessera serve` over HTTP under load vs transformers one at a time (kwargs: bench_serving.run_cpu's).
    CUDA: the engine at Llama-3.1-8B shape over batch sizes, against the bandwidth floor."""
    env = environment(device)
    head = f"Serving on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']})\n\n"
    if device.type == "cuda":
        result = bench_serving.gpu_sweep(device, copy_bandwidth_gbps(device))
        md = head + bench_serving.gpu_table(result)
    else:
        result = bench_serving.run_cpu(**kwargs)
        md = head + bench_serving.table(result)
    return write_results(results_name(device, "serving"), {**env, **result}, md, out)


def run_search_scale(
    device: torch.device,
    out: Path | None = None,
    depths: tuple[int, ...] = (4, 8, 16),
    shape: str = "llama-3.2-1b",
    scoring: str = "exact",
) -> Path:
    """`tessera optimize` on random parents of a Llama shape (bench_search_scale.SHAPES) at several depths: each
    stage's seconds and peak memory, the work it repeats, and a Llama-70B extrapolation (bench_search_scale);
    blocks scored by `scoring` ("exact" or "fisher")."""
    env = environment(device)
    suffix = "" if shape == "llama-3.2-1b" else f"_{shape}"  # the 1B shape's results keep their name
    suffix += "" if scoring == "exact" else f"_{scoring}"

    def write(result: dict) -> Path:
        md = (
            f"`tessera optimize` at the {shape} shape on {env['device']} (commit {env['commit']}, {env['date']}, "
            f"torch {env['torch']}); seconds and peak memory per stage, tiny token budgets, {scoring} scoring\n\n"
            + bench_search_scale.table(result)
        )
        return write_results(results_name(device, f"search_scale{suffix}"), {**env, **result}, md, out)

    shape_dims = bench_search_scale.SHAPES[shape]
    return write(bench_search_scale.run(device, depths, shape_dims, on_depth=write, scoring=scoring))


def run_cost_model(device: torch.device, out: Path | None = None) -> Path:
    """The cost model's predictions against the engine's measured latencies (bench_cost_model)."""
    env = environment(device)

    def write(result: dict) -> Path:
        md = f"Cost model on {env['device']} (commit {env['commit']}, {env['date']}, torch {env['torch']})\n\n"
        md += bench_cost_model.table(result)
        return write_results(results_name(device, "cost_model"), {**env, **result}, md, out)

    return write(bench_cost_model.run(device, on_parent=write))
