"""Compile every Triton kernel variant tessera launches for an NVIDIA GPU, on a machine without one.

The CPU tests run the kernels under Triton's interpreter: that checks what they compute, not that they compile.
Triton's GPU compiler sees what the interpreter does not: the types an FP8 `tl.dot` takes, tensor descriptors,
the shared memory a tile schedule needs and the registers it spills, and the API of the Triton version installed
(the H200 image has 3.6, the dev machines a newer one). A GPU session has 15 minutes; a kernel that fails to
compile there costs a rerun. This runs, on CPU tensors, with Triton aimed at the target GPU and every launch turned
into a compile (nothing executes, so outputs are never read):

- the served path: engine steps (fresh prefill, chunked prefill, decode at batch 1 and 16) of a Llama-3.1-8B-
  and a Nemotron-51B-shaped heterogeneous model (G = 4 to 64, a windowed layer, linear and no-op sublayers), in
  bf16, and in FP8 with a bf16 and with an FP8 KV cache; then a forward without a cache (scoring, distillation);
- what the GPU suite's kernel benchmarks launch besides: both FFN GEMM schedules (portable and persistent TMA)
  at every row count of `bench_ffn`, bf16 and FP8, and paged attention over `bench_attention`'s head layouts,
  split and unsplit, bf16 and FP8 pages, decode and prefill.

Each distinct compiled kernel is listed with its shared memory (Triton's), warps, stages, registers and local
memory (from the cubin, read with the `cuobjdump` that ships in Triton's wheel), and the tensor-core instruction
its dots became and whether it loads through TMA (from its PTX). The run fails on a compile
error, or on shared memory past the target's per-block limit; local memory (spills: ptxas caps a thread's
registers by the block size and spills the rest, so registers never fail a launch) is reported, and the test
(tests/test_compile_check.py) refuses it on sm_90. The launchers size their work for the target as they would
on it (`kernels.hardware.GPU`: its SMs, its shared memory for the pipeline stages, tensor descriptors from sm_90).
Once per process: Triton keeps the first target per device.

    .venv/bin/python -m tessera.benchmarks.compile_check [--arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from tessera import kernels
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.kernels import ffn_tilings, gemm, hardware

if hardware.INTERPRETING:  # its kernels were decorated as interpreted functions, which do not compile
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter runs kernels instead of compiling them)")
from tessera.kernels.attention import attention_prefill_triton
from tessera.kernels.attention_paged import attention_paged_triton
from tessera.kernels.ffn import swiglu_ffn_triton

from .bench_attention import HEAD_DIM, HEADS, PAGE
from .bench_ffn import ROWS
from .harness import commit, compiling_only

ROOT = Path(__file__).resolve().parent.parent
# The targets: compute capability, SMs, and the shared memory a block may opt in to (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"). sm_89's figures are an L40S's; an L4 (58 SMs) and an
# RTX 4090 (128) have its 99 KB a block too.
TARGETS = {
    90: ("H100 / H200", hardware.H200),
    89: ("L40S / L4 / RTX 4090", hardware.GPU((8, 9), 142, 99 * 1024)),
    80: ("A100", hardware.GPU((8, 0), 108, 163 * 1024)),
}


class CompileOnly:
    """A Triton driver for a GPU that is not here: it names the target and hands out device 0 and a null stream;
    `JITFunction.run` is made to compile and return (its warmup mode) instead of launching."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class Compiled:
    """Every distinct kernel compiled while it is active, keyed by its hash, with the workload that first did; the
    launchers meanwhile take CPU tensors and size their work for `target`."""

    def __init__(self, target: hardware.GPU) -> None:
        self.kernels: dict[str, tuple[str, str, object]] = {}
        self.workload = ""
        self.target = target
        self._compiling = compiling_only(self._record)

    def _record(self, fn, kernel) -> None:
        self.kernels.setdefault(kernel.hash, (fn.__name__, self.workload, kernel))

    def __enter__(self) -> Compiled:
        self._compiling.__enter__()
        hardware.compile_only(self.target)
        self._backend = kernels.forced_backend()
        kernels.set_backend("triton")  # the ops' Triton launchers for CPU tensors too
        return self

    def __exit__(self, *exc) -> None:
        self._compiling.__exit__(*exc)
        hardware.compile_only(None)
        kernels.set_backend(self._backend)


def _constexprs(kernel) -> str:
    """The kernel's compile-time arguments, `NAME=value` (what distinguishes its variants)."""
    names = kernel.src.fn.arg_names
    values = {names[path[0]]: value for path, value in kernel.src.constants.items() if len(path) == 1}
    return " ".join(f"{k}={v}" for k, v in values.items() if k.isupper())


def _resources(kernel, tools: Path) -> dict[str, int]:
    """Registers a thread, local memory a thread (spills), and the static shared memory the cubin's kernel
    function declares beside Triton's dynamic shared memory (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tools / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True, check=True)
    found = {k: int(v) for k, v in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", out.stdout)}
    return {"registers": found["REG"], "local_bytes": found["LOCAL"], "static_shared_bytes": found["SHARED"]}


def _instructions(kernel) -> str:
    """Which tensor-core instruction the kernel's dots became ("wgmma": Hopper's warpgroup MMA, which needs 64-row
    tiles; "mma": the warp-level one; "-": no dot), whether it loads tiles through TMA ("+tma") and waits on the
    kernel before it under programmatic dependent launch ("+gdc"), from its PTX."""
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    return mma + ("+tma" if "cp.async.bulk.tensor" in ptx else "") + ("+gdc" if "griddepcontrol.wait" in ptx else "")


# The workloads. Tensors come from torch.empty: no kernel runs, so no value is ever read.


def _heterogeneous(config: str, blocks: list[BlockConfig]) -> ArchConfig:
    return ArchConfig.from_json(ROOT / "configs" / config).with_blocks(blocks)


def _gqa(n_kv: int, width: int | None, window: int | None = None) -> BlockConfig:
    ffn = FFNConfig("swiglu", width) if width else FFNConfig("linear")
    return BlockConfig(AttentionConfig("gqa", n_kv, window), ffn)


MODELS = {
    # 32 query heads: G = 4 (Llama's 8 KV heads), 8, 16 in a windowed layer, 32; the sublayers Puzzle puts in
    # place of attention and FFNs, and a fused FFN-Fusion width.
    "llama-3.1-8b shape": lambda: _heterogeneous(
        "llama-3.1-8b.json",
        [
            _gqa(8, 14336),
            _gqa(4, 4096),
            _gqa(2, 14336, window=512),
            _gqa(1, None),
            BlockConfig(AttentionConfig("linear"), FFNConfig("swiglu", 3 * 14336)),
            BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", 7168)),
        ],
    ),
    # 64 query heads: G = 8 and G = 64 (Nemotron-51B's 1-KV-head layers).
    "nemotron-51b shape": lambda: _heterogeneous(
        "llama-3_1-nemotron-51b-instruct.json", [_gqa(8, 14336), _gqa(1, 7168)]
    ),
}


def served_path(name: str, fp8: bool, fp8_cache: bool) -> None:
    """Engine steps of the model (a fresh prefill, chunked prefill beside decode tokens, decode at 16 and 1),
    then a forward over whole sequences without a cache."""
    from tessera.runtime.engine import Engine, EngineConfig
    from tessera.runtime.model import Model
    from tessera.runtime.sampling import SamplingParams

    model = Model.empty(MODELS[name](), "cpu", torch.bfloat16)
    if fp8:
        model.to_fp8()
    config = EngineConfig(
        max_batch=16,
        max_model_len=1024,
        page_size=PAGE,
        max_step_tokens=64,
        kv_cache_dtype="fp8" if fp8_cache else "auto",
    )
    engine = Engine(model.eval(), None, config)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with torch.no_grad():
        engine.generate([[1] * 150] + [[1] * 5] * 15, params)
        engine.generate([[1] * 5], params)
        model(torch.ones(2, 64, dtype=torch.int64))  # a forward without a cache: scoring, the search's teacher


def graph_decode(name: str, fp8: bool, fp8_cache: bool, shapes: tuple[tuple[int, int], ...]) -> None:
    """The decode step the engine captures as CUDA graphs, at every padded batch size of an engine of (max_batch,
    max_model_len) in `shapes`, run as DecodeGraphs runs it without capture: its block tables are as wide as the
    context, so its split plans (how many splits, hence the merge kernel's variant) are the served ones, which the
    engine's eager steps over short sequences do not reach."""
    from tessera.runtime.cache import PagedKVCache
    from tessera.runtime.engine import DecodeGraphs, Engine, EngineConfig
    from tessera.runtime.model import Model

    model = Model.empty(MODELS[name](), "cpu", torch.bfloat16)
    if fp8:
        model.to_fp8()
    kv_dtype = kernels.FP8 if fp8_cache else torch.bfloat16
    page_bytes = PagedKVCache.page_bytes(model.arch, PAGE, kv_dtype)
    for max_batch, context in shapes:
        config = EngineConfig(
            max_batch=max_batch,
            max_model_len=context,
            page_size=PAGE,
            kv_cache_bytes=page_bytes,  # a page and the scratch page: the padded rows read the scratch page only
            kv_cache_dtype="fp8" if fp8_cache else "auto",
        )
        engine = Engine(model.eval(), None, config)
        graphs = DecodeGraphs(model, engine.cache, max_batch, engine.max_pages_per_request, capture=False)
        groups = len(engine.cache.groups)
        with torch.no_grad():
            for size in graphs.sizes:
                ids, tables = torch.zeros(size, dtype=torch.int64), torch.zeros(size, 1, dtype=torch.int32)
                graphs.run(ids, ids, [ids] * groups, torch.ones(size, dtype=torch.int32), [tables] * groups)


# The engines the GPU suite replays graphs of: bench_model's (batch, context) scenarios (64 stands for 1 as well,
# its graphs include size 1) and bench_serving's sweep (batches up to 256, 512 + 128 tokens).
MODEL_GRAPHS = ((64, 1024), (1, 8192))
SWEEP_GRAPHS = ((256, 640),)


def with_pdl(run: Callable[[], None]) -> None:
    """`run` with programmatic dependent launch on (kernels.hardware.set_pdl): every kernel's PDL variant."""
    saved = hardware.pdl_enabled()
    hardware.set_pdl(True)
    try:
        run()
    finally:
        hardware.set_pdl(saved)


def gemm_schedules(fp8: bool) -> None:
    """The FFN (gate/up and down GEMMs, with the residual) at every row count bench_ffn times, both schedules
    (below Hopper, without tensor descriptors, the persistent one falls back to the portable one). Llama-8B's
    widths: the other shapes differ only in sizes that are multiples of 16, which compile to the same variants."""
    hidden, inter = 4096, 14336
    dtype = kernels.FP8 if fp8 else torch.bfloat16
    w_gate_up, w_down = torch.empty(2 * inter, hidden, dtype=dtype), torch.empty(hidden, inter, dtype=dtype)
    scales = (torch.ones(2 * inter), torch.ones(hidden)) if fp8 else (None, None)
    for persistent in (False, True):
        for m in ROWS:
            x, residual = torch.empty(m, hidden, dtype=torch.bfloat16), torch.empty(m, hidden, dtype=torch.bfloat16)
            swiglu_ffn_triton(x, w_gate_up, w_down, residual, *scales, persistent=persistent)


def gemm_sweep_tilings(precision: str) -> None:
    """Every tiling pair benchmarks/tune_gemm.py times on each of its shapes in `precision` (the rows and widths
    decide split-K, a constexpr), both schedules past 16 rows (it times the persistent one for its best pair). Only
    with --sweeps: ~250 variants more, which the sweep compiles on the device itself. Every candidate is tried, the
    failures listed together."""
    from .tune_gemm import SHAPES, _pairs

    failures = []
    for _, model, hidden, inter, rows in [s for s in SHAPES if s[0] == precision]:
        dtype = kernels.FP8 if precision == "fp8" else torch.bfloat16
        w_gate_up, w_down = torch.empty(2 * inter, hidden, dtype=dtype), torch.empty(hidden, inter, dtype=dtype)
        scales = (torch.ones(2 * inter), torch.ones(hidden)) if precision == "fp8" else (None, None)
        x, residual = torch.empty(rows, hidden, dtype=torch.bfloat16), torch.empty(rows, hidden, dtype=torch.bfloat16)
        for gate_up, down in _pairs(precision, rows):
            for persistent in (False, True) if rows > gemm.DECODE_ROWS else (False,):
                tilings = {"gate_up_tiling": gate_up, "down_tiling": down}
                try:
                    swiglu_ffn_triton(x, w_gate_up, w_down, residual, *scales, persistent=persistent, **tilings)
                except Exception as e:
                    failures.append(f"{model} M={rows} {gate_up} {down} persistent={persistent}: {e}")
    if failures:
        raise RuntimeError("\n".join(failures))


def paged_attention(fp8: bool) -> None:
    """bench_attention's head layouts: decode at batch 1 (the context split) and 64 (unsplit), prefill of 2,048
    tokens through the paged kernel and the varlen one."""
    scale = {"k_scale": torch.ones(1), "v_scale": torch.ones(1)} if fp8 else {}
    pages_dtype = kernels.FP8 if fp8 else torch.bfloat16
    for _, n_heads, n_kv in HEADS:
        for batch, context, queries in ((1, 8192, 1), (64, 8192, 1), (1, 2048, 2048)):
            if queries > 1 and fp8:
                continue  # prefill reads the cache only past its first chunk: the decode rows cover FP8 pages
            per_seq = context // PAGE
            k_pages = torch.empty(1 + batch * per_seq, PAGE, n_kv, HEAD_DIM, dtype=pages_dtype)
            tables = torch.arange(1, 1 + batch * per_seq, dtype=torch.int32).view(batch, per_seq)
            cu = torch.arange(0, (batch + 1) * queries, queries, dtype=torch.int32)
            meta = kernels.PagedAttentionMetadata(tables, cu, torch.full((batch,), context, dtype=torch.int32), queries)
            q = torch.empty(batch * queries, n_heads, HEAD_DIM, dtype=torch.bfloat16)
            attention_paged_triton(q, k_pages, torch.empty_like(k_pages), meta, **scale)
            if queries > 1:
                kv = torch.empty(batch * queries, n_kv, HEAD_DIM, dtype=torch.bfloat16)
                attention_prefill_triton(q, kv, kv, cu, True, queries)


def fp8_pages_in_f16() -> None:
    """bench_attention's FP8 decode rows read in fp16 (attention_paged.fp8_in_f16): their FP8_F16 variants."""
    with kernels.fp8_in_f16():
        paged_attention(True)


WORKLOADS: dict[str, Callable[[], None]] = {
    **{f"engine, {name}, bf16": partial(served_path, name, False, False) for name in MODELS},
    **{f"engine, {name}, fp8 weights, bf16 KV cache": partial(served_path, name, True, False) for name in MODELS},
    **{f"engine, {name}, fp8 weights and KV cache": partial(served_path, name, True, True) for name in MODELS},
    # Programmatic dependent launch (Hopper on; off by default until measured): the 8B shape's steps in bf16.
    "engine, llama-3.1-8b shape, bf16, programmatic dependent launch": partial(
        with_pdl, partial(served_path, "llama-3.1-8b shape", False, False)
    ),
    "CUDA-graph decode, llama-3.1-8b shape, bf16": partial(
        graph_decode, "llama-3.1-8b shape", False, False, MODEL_GRAPHS + SWEEP_GRAPHS
    ),
    "CUDA-graph decode, llama-3.1-8b shape, fp8 weights, bf16 KV cache": partial(
        graph_decode, "llama-3.1-8b shape", True, False, MODEL_GRAPHS
    ),
    "CUDA-graph decode, llama-3.1-8b shape, fp8 weights and KV cache": partial(
        graph_decode, "llama-3.1-8b shape", True, True, MODEL_GRAPHS
    ),
    "CUDA-graph decode, llama-3.1-8b shape, bf16, programmatic dependent launch": partial(
        with_pdl, partial(graph_decode, "llama-3.1-8b shape", False, False, MODEL_GRAPHS)
    ),
    "bench_ffn schedules, bf16": partial(gemm_schedules, False),
    "bench_ffn schedules, fp8": partial(gemm_schedules, True),
    "bench_attention layouts, bf16 pages": partial(paged_attention, False),
    "bench_attention layouts, fp8 pages": partial(paged_attention, True),
    "bench_attention layouts, fp8 pages read in fp16": fp8_pages_in_f16,
}


def under_table(table: Path, fp8: bool) -> None:
    """The 8B shape's engine steps and decode graphs with the FFN steered by a committed tiling table
    (kernels/ffn_tilings.py): the variants its plans launch, which the built-in tilings do not (Triton is forced
    here, so the rows the table gives cuBLAS compile too: a superset)."""
    saved = os.environ.get(ffn_tilings.TABLE_ENV)
    os.environ[ffn_tilings.TABLE_ENV] = str(table)
    try:
        served_path("llama-3.1-8b shape", fp8, False)
        graph_decode("llama-3.1-8b shape", fp8, False, MODEL_GRAPHS + SWEEP_GRAPHS)
    finally:
        if saved is None:
            del os.environ[ffn_tilings.TABLE_ENV]
        else:
            os.environ[ffn_tilings.TABLE_ENV] = saved


def table_workloads() -> dict[str, Callable[[], None]]:
    """One workload per committed FFN tiling table (kernels/configs/) and precision."""
    workloads = {}
    for table in sorted(ffn_tilings.CONFIG_DIR.glob("*_ffn_tilings.json")):
        for fp8 in (False, True):
            name = (
                f"engine and CUDA-graph decode, llama-3.1-8b shape, {'fp8' if fp8 else 'bf16'}, FFN table {table.name}"
            )
            workloads[name] = partial(under_table, table, fp8)
    return workloads


SWEEP_WORKLOADS: dict[str, Callable[[], None]] = {
    "tune_gemm tilings, bf16": partial(gemm_sweep_tilings, "bf16"),
    "tune_gemm tilings, fp8": partial(gemm_sweep_tilings, "fp8"),
}


def check(arch: int, sweeps: bool = False) -> dict:
    """Run every workload compiling for sm_<arch> (and the tiling sweeps' with `sweeps`); the kernels found and the
    failures."""
    name, target = TARGETS[arch]
    shared_limit = target.shared_per_block
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    driver.set_active(CompileOnly(arch))  # for the rest of the process: there is no GPU driver to go back to
    failures, started = [], time.perf_counter()
    with Compiled(target) as compiled:
        for workload, run in {**WORKLOADS, **table_workloads(), **(SWEEP_WORKLOADS if sweeps else {})}.items():
            if "fp8" in workload and arch < 89:
                continue  # FP8 needs compute capability 8.9 (the runtime refuses it below, devices.check_fp8)
            if "programmatic" in workload and arch < 90:
                continue  # Hopper's: below it the launchers leave PDL off (kernels.hardware.launch_flags)
            compiled.workload = workload
            print(f"{workload} ...", flush=True)
            try:
                run()
            except Exception as e:  # a compile error: report it, go on with the next workload
                failures.append(f"{workload}: {type(e).__name__}: {str(e)[:2000]}")
                print(f"  FAILED: {failures[-1]}", flush=True)
    rows: dict[tuple, dict] = {}  # variants that differ only in integer specialisations (divisibility) merged
    for kernel_name, workload, kernel in compiled.kernels.values():
        meta = kernel.metadata
        row = {
            "kernel": kernel_name,
            "constexprs": _constexprs(kernel),
            "shared_bytes": meta.shared,
            "num_warps": meta.num_warps,
            "num_stages": meta.num_stages,
            **_resources(kernel, tools),
            "instructions": _instructions(kernel),
        }
        key = tuple(row.values())
        rows.setdefault(key, {**row, "variants": 0, "first_seen_in": workload})["variants"] += 1
        where = f"{kernel_name} [{row['constexprs']}]"
        shared = meta.shared + row["static_shared_bytes"]
        if shared > shared_limit:
            failures.append(
                f"{where}: {shared} bytes of shared memory, the most a block gets on {name} is {shared_limit}"
            )
    return {
        "target": f"sm_{arch} ({name})",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "seconds": round(time.perf_counter() - started, 1),
        "compiled": len(compiled.kernels),
        "kernels": sorted(rows.values(), key=lambda r: (r["kernel"], r["constexprs"], r["shared_bytes"])),
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(TARGETS), help="compute capability x 10")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--sweeps", action="store_true", help="also the tilings benchmarks/tune_gemm.py times")
    args = parser.parse_args(argv)
    report = check(args.arch, args.sweeps)
    print(
        f"\n{report['compiled']} kernel variants compiled for {report['target']} with triton {report['triton']} in "
        f"{report['seconds']} s (rows: those alike in everything below merged, `n` of them)"
    )
    print(
        f"{'kernel':<28} {'n':>2} {'smem':>7} {'warps':>5} {'stages':>6} {'regs':>4} {'local':>5} {'insns':<9}  "
        "constexprs"
    )
    for r in report["kernels"]:
        print(
            f"{r['kernel']:<28} {r['variants']:>2} {r['shared_bytes']:>7} {r['num_warps']:>5} {r['num_stages']:>6} "
            f"{r['registers']:>4} {r['local_bytes']:>5} {r['instructions']:<9}  {r['constexprs']}"
        )
    spills = [r for r in report["kernels"] if r["local_bytes"]]
    if spills:
        print(f"\n{len(spills)} rows use local memory (register spills): see 'local' above")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    for failure in report["failures"]:
        print(f"FAILED {failure}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
