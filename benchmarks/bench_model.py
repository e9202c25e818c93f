"""Whole-model decode: the serving engine's decode step on a Llama-3.1-8B-shaped model (random bf16 weights),
with the Triton kernels vs with the plain-torch references, against the bandwidth floor.

One decode step = every sequence of the batch generates one token over `context` cached tokens, through the
engine's own decode path (`DecodeGraphs`: static buffers, the paged KV cache in 16-token pages, one metadata
per step). Floor = (weights read + KV cache read) / measured copy bandwidth (`ArchConfig.decode_step_bytes`);
a tuned decode reaches 75-85 % of it (REFERENCE.md). Modes: references eager (they read lengths on the host,
so they cannot be captured), then the served kernels (the automatic dispatch: Triton on CUDA, the FFN's GEMMs on
cuBLAS past kernels.TRITON_MAX_ROWS rows) eager and replayed from the engine's CUDA graph, which is how the engine
runs decode (a Python launch costs ~9 µs, and an 8B step is ~300 launches). The committed H200 rows
(benchmarks/results/nvidia-h200_model_decode.*) came from modes that forced Triton everywhere: their batch 64 ran
the FFN on the Triton GEMMs, where the engine runs cuBLAS. Goals (issue 14, H200):
>= 85 % of the floor at batch 1 (context 1k and 8k), >= 70 % at batch 64. On CPU: the demo parent's shape in
float32, references only (a sanity pass).

FP8 rows (issue 20): the same model quantized (`Model.cast(kernels.FP8)`: E4M3 projections and LM head copy,
bf16 embeddings and activations), with a bf16 KV cache and with an FP8 one (`kv_cache_dtype="fp8"`), each
against its own floor (`decode_step_bytes` in FP8) and as a speedup over the unquantized step (bf16 on the GPU,
fp32 on the CPU) of the same scenario in the same run.
Goals (H200): the FP8 step >= 80 % of its floor at batch 1 and >= 1.7x the bf16 step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch

from tessera import kernels
from tessera.config import FP8_NAME, ArchConfig
from tessera.demo.build import demo_arch
from tessera.devices import dtype_name, serving_dtype
from tessera.kernels import hardware
from tessera.runtime.engine import DecodeGraphs, Engine, EngineConfig
from tessera.runtime.model import Model

from . import step_profile
from .harness import InTurns, hf_generate, relative_error, time_in_turns, time_ms, wall_s

# meta-llama/Llama-3.1-8B config.json (the fields tessera reads); the shared copy is not on the GPU machine.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}
SCENARIOS = [(1, 1024), (64, 1024), (1, 8192)]  # (batch, context)


def _decode_steps(model: Model, batch: int, context: int, device: torch.device, graphs: bool, kv: str = "auto"):
    """The engine's decode step for `batch` sequences with `context` tokens of random K/V cached (never zeros),
    eager or replayed from the engine's CUDA graph, the cache in `kv` (EngineConfig.kv_cache_dtype); returns the
    step (-> logits)."""
    config = EngineConfig(max_batch=batch, max_model_len=context, page_size=16, cuda_graphs=graphs, kv_cache_dtype=kv)
    engine = Engine(model, None, config)
    cache = engine.cache
    gen = torch.Generator(device).manual_seed(0)
    for t in (*cache.k, *cache.v):
        if t is not None:  # FP8 pools take unit-normal values through a bf16 copy (no normal_ in FP8)
            t.copy_(torch.randn(t.shape, device=device, generator=gen, dtype=torch.bfloat16))
    # Each sequence's pages and block-table row, as the engine admits a request; its last token decodes.
    rows = [engine.tables.add(cache.allocate(context), context) for _ in range(batch)]
    tables = engine.tables.gather(rows, torch.tensor(rows, device=device))
    positions = torch.full((batch,), context - 1, device=device)
    step = engine.graphs or DecodeGraphs(model, cache, batch, engine.max_pages_per_request, capture=False)
    args = (
        torch.randint(0, model.arch.vocab_size, (batch,), device=device, generator=gen),
        positions,
        list(engine.tables.slots(tables, torch.arange(batch, device=device), positions)),
        torch.full((batch,), context, dtype=torch.int32, device=device),
        list(tables),
    )
    return lambda: step.run(*args)


def benchmarked(device: torch.device) -> tuple[Model, list[tuple[int, int]], str]:
    """The model timed on `device` (the 8B shape on a GPU, the demo parent's on the CPU; random weights, in the
    serving precision), its (batch, context) scenarios, and its description."""
    on_gpu = device.type == "cuda"
    arch = ArchConfig.from_hf_dict(LLAMA_3_1_8B, "Llama-3.1-8B") if on_gpu else demo_arch(eos_id=0)
    model = Model.empty(arch, device, serving_dtype(device)).init_weights(seed=0).eval()
    what = "Llama-3.1-8B shape, random weights" if on_gpu else "demo parent shape, random weights"
    return model, SCENARIOS if on_gpu else [(1, 64), (8, 64)], what


def _floor_ms(arch: ArchConfig, batch: int, context: int, copy_gbps: float, dtype: str, kv: str | None = None) -> float:
    """The step's bandwidth floor: the bytes it must read (ArchConfig.decode_step_bytes) at the copy bandwidth."""
    return 1e3 * arch.decode_step_bytes(batch, context, dtype, kv) / (copy_gbps * 1e9)


# The kernels a mode runs: the plain-torch references, or what the engine serves with (automatic dispatch:
# Triton on CUDA, the FFN's GEMMs on cuBLAS past kernels.TRITON_MAX_ROWS rows).
BACKENDS = {"torch": "torch", "served": None}


def run(device: torch.device, copy_gbps: float, written: Callable[[dict], object] | None = None) -> dict:
    """Every scenario's decode step in each mode (and the FP8 model's in the served one); `written(partial)` after
    each scenario, so a run cut short keeps what it measured."""
    on_gpu = device.type == "cuda"
    model, scenarios, what = benchmarked(device)
    arch, dtype = model.arch, model.embed_tokens.weight.dtype
    fp8_model = model.cast(kernels.FP8)
    modes = [("torch", False)] + ([("served", False), ("served", True)] if on_gpu else [])
    served = modes[-1]  # how the engine runs decode here: the FP8 rows time that mode only
    rows = []
    result = {
        "model": what,
        "dtype": dtype_name(dtype),
        "weight_bytes_per_step": arch.decode_step_bytes(1, 0, dtype_name(dtype)),
        "results": rows,
        "generate": [],
    }
    saved = kernels.forced_backend()
    try:
        for batch, context in scenarios:
            floor_ms = _floor_ms(arch, batch, context, copy_gbps, dtype_name(dtype))
            outputs = {}
            for backend, graph in modes:
                kernels.set_backend(BACKENDS[backend])
                with torch.inference_mode():
                    step = _decode_steps(model, batch, context, device, graph)
                    outputs[backend] = step().float()
                    ms, method = time_ms(step, device, graph=False)  # a graph mode replays the engine's own graph
                    if graph:
                        method = method.replace("eager", "replays of the engine's CUDA graph")
                if (backend, graph) == served:
                    served_step = step  # the FP8 steps are timed in turns with it
                del step
                if on_gpu:
                    torch.cuda.empty_cache()
                row = {
                    "batch": batch,
                    "context": context,
                    "kernels": backend,
                    "cuda_graph": graph,
                    "step_ms": ms,
                    "tokens_per_s": batch * 1e3 / ms,
                    "floor_ms": floor_ms,
                    "pct_of_bandwidth_floor": 100 * floor_ms / ms,
                    "timing": method,
                }
                rows.append(row)
                label = f"decode batch {batch} context {context} {backend}{' graph' if graph else ''}"
                print(
                    f"{label}: {ms:.3f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
                    f"{row['pct_of_bandwidth_floor']:.0f} % of floor"
                )
            if "served" in outputs:  # same logits up to bf16 rounding before any speed is compared
                diff = (outputs["served"] - outputs["torch"]).abs().max() / outputs["torch"].abs().max()
                for row in rows[-len(modes) :]:
                    row["logits_relative_error_vs_references"] = diff.item()
            try:  # a failure is recorded, and the bf16 rows stay
                rows += _fp8_rows(fp8_model, batch, context, device, served, copy_gbps, served_step, outputs[served[0]])
            except Exception as e:
                result.setdefault("fp8_errors", []).append(f"batch {batch} context {context}: {type(e).__name__}: {e}")
                print(f"decode batch {batch} context {context} FP8: failed ({type(e).__name__}: {e})")
            served_step = None
            if written is not None:
                written(result)
    finally:
        kernels.set_backend(saved)
    if on_gpu:
        result["generate"] = generate_speed(device)
    return result


def _fp8_rows(
    model: Model,
    batch: int,
    context: int,
    device: torch.device,
    mode,
    copy_gbps: float,
    unquantized_step: Callable[[], torch.Tensor],
    unquantized: torch.Tensor,
):
    """The FP8 model's decode step in the served `mode`, with a bf16 and with an FP8 KV cache, timed in FP8_ROUNDS
    interleaved rounds with the `unquantized_step` (its speedup the median of the rounds' ratios, with their range).
    Its logits are checked before it is timed: against the plain-torch FP8 path's (dequantized weights and
    activations in fp32: what the FP8 GEMMs, cuBLAS's `_scaled_mm` past 16 rows, must compute), and against the
    unquantized step's (what quantizing costs), both recorded with whether every logit is finite."""
    backend, graph = mode
    rows = []
    for kv in ("auto", "fp8"):
        with torch.inference_mode():
            kernels.set_backend(BACKENDS["torch"])
            reference = _decode_steps(model, batch, context, device, False, kv)().float()
            kernels.set_backend(BACKENDS[backend])
            step = _decode_steps(model, batch, context, device, graph, kv)
            logits = step().float()
            sides = {"unquantized": unquantized_step, "fp8": step}
            turns, methods = time_in_turns(sides, device, FP8_ROUNDS, graph=False, round_ms=STEP_ROUND_MS)
            ms, speedup = turns.spread("fp8").median, turns.ratio("unquantized", "fp8")
            unquantized_ms = turns.spread("unquantized").median
            del sides, turns  # they hold the step
        method = f"median of {FP8_ROUNDS} rounds, each a {methods['fp8']}"
        if graph:
            method = method.replace("eager", "replays of the engine's CUDA graph")
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        kv_name = FP8_NAME if kv == "fp8" else "bfloat16"
        floor_ms = _floor_ms(model.arch, batch, context, copy_gbps, FP8_NAME, kv_name)
        row = {
            "batch": batch,
            "context": context,
            "kernels": backend,
            "cuda_graph": graph,
            "precision": f"fp8 weights, {'fp8' if kv == 'fp8' else 'bf16'} KV cache",
            "step_ms": ms,
            "tokens_per_s": batch * 1e3 / ms,
            "floor_ms": floor_ms,
            "pct_of_bandwidth_floor": 100 * floor_ms / ms,
            "unquantized_step_ms": unquantized_ms,  # the served bf16 step, its median over the same rounds
            "speedup_vs_unquantized_step": speedup.median,
            "speedup_vs_unquantized_step_min": speedup.low,
            "speedup_vs_unquantized_step_max": speedup.high,
            "rounds": FP8_ROUNDS,
            "logits_finite": bool(logits.isfinite().all()),
            "logits_relative_error_vs_fp8_reference": relative_error(logits, reference),
            "logits_relative_error_vs_unquantized": relative_error(logits, unquantized),
            "timing": method,
        }
        rows.append(row)
        print(
            f"decode batch {batch} context {context} {row['precision']}: {ms:.3f} ms/step, "
            f"{row['pct_of_bandwidth_floor']:.0f} % of floor, "
            f"{speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f}) the unquantized step; logits "
            f"{row['logits_relative_error_vs_fp8_reference']:.1e} from the FP8 reference, "
            f"{row['logits_relative_error_vs_unquantized']:.1e} from unquantized"
        )
    return rows


FP8_ROUNDS = 3  # interleaved rounds of an FP8 step and the unquantized one
STEP_ROUND_MS = 50  # how long a round repeats a decode step (time_in_turns: it replays its own CUDA graph, if any)


def pdl_comparison(device: torch.device, copy_gbps: float, rounds: int = 5) -> dict:
    """The served decode step (Triton kernels replayed from the engine's CUDA graph) with and without programmatic
    dependent launch (kernels.hardware.set_pdl), each graph captured in its own mode, timed in `rounds` alternating
    rounds: per scenario the median of each mode, the median ratio and its spread. PDL changes when a kernel starts,
    never what it computes, so the logits of the two must be the same bits; a row says whether they were. On the CPU
    (the demo parent's shape, the references: no kernel takes PDL there) a sanity pass of this code."""
    on_gpu = device.type == "cuda"
    model, scenarios, what = benchmarked(device)
    arch, dtype = model.arch, model.embed_tokens.weight.dtype
    available = hardware.pdl_possible(device)
    saved_backend, saved_pdl = kernels.forced_backend(), hardware.pdl_enabled()
    rows = []
    try:
        kernels.set_backend(BACKENDS["served" if on_gpu else "torch"])
        for batch, context in scenarios:
            steps, logits = {}, {}
            for pdl in (False, True):
                hardware.set_pdl(pdl)  # read as the engine captures its graph
                with torch.inference_mode():
                    steps[pdl] = _decode_steps(model, batch, context, device, graphs=on_gpu)
                    logits[pdl] = steps[pdl]().float()
            hardware.set_pdl(saved_pdl)
            with torch.inference_mode():
                sides = {"without": steps[False], "with": steps[True]}
                turns, _ = time_in_turns(sides, device, rounds, graph=False, round_ms=STEP_ROUND_MS)
            without, with_pdl = turns.spread("without").median, turns.spread("with").median
            speedup = turns.ratio("without", "with")
            del steps, sides, turns  # the two engines' KV pools and graphs: the next scenario's need the memory
            if on_gpu:
                torch.cuda.empty_cache()
            floor_ms = _floor_ms(arch, batch, context, copy_gbps, dtype_name(dtype))
            rows.append(
                {
                    "batch": batch,
                    "context": context,
                    "step_ms_without_pdl": without,
                    "step_ms_with_pdl": with_pdl,
                    "pct_of_bandwidth_floor_without_pdl": 100 * floor_ms / without,
                    "pct_of_bandwidth_floor_with_pdl": 100 * floor_ms / with_pdl,
                    "speedup": speedup.median,
                    "speedup_min": speedup.low,
                    "speedup_max": speedup.high,
                    "same_logits": torch.equal(logits[False], logits[True]),
                    "rounds": rounds,
                }
            )
            r = rows[-1]
            print(
                f"decode batch {batch} context {context}: {without:.3f} ms without PDL, {with_pdl:.3f} ms with "
                f"({r['speedup']:.3f}x, {r['speedup_min']:.3f}-{r['speedup_max']:.3f} over {rounds} rounds), "
                f"logits {'the same bits' if r['same_logits'] else 'DIFFERENT'}"
            )
    finally:
        kernels.set_backend(saved_backend)
        hardware.set_pdl(saved_pdl)
    return {
        "model": what,
        "dtype": dtype_name(dtype),
        "pdl_available": available,
        "timing": "do_bench medians of the engine's CUDA-graph replays, modes alternating" if on_gpu else "CPU",
        "results": rows,
    }


def pdl_table(result: dict) -> str:
    note = "" if result["pdl_available"] else "No kernel takes PDL on this device: a sanity pass of the code.\n\n"
    lines = [
        note + "| batch | context | ms/step without PDL | with PDL | % of floor without | with | speedup (min-max) | "
        "same logits |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['step_ms_without_pdl']:.3f} | {r['step_ms_with_pdl']:.3f} | "
            f"{r['pct_of_bandwidth_floor_without_pdl']:.0f} % | {r['pct_of_bandwidth_floor_with_pdl']:.0f} % | "
            f"{r['speedup']:.3f}x ({r['speedup_min']:.3f}-{r['speedup_max']:.3f}) | {r['same_logits']} |"
        )
    return "\n".join(lines)


PROFILED = [(1, 1024, "bfloat16"), (64, 1024, "bfloat16"), (1, 1024, FP8_NAME)]  # (batch, context, weights) on a GPU


def profile_steps(
    device: torch.device, copy_gbps: float, steps: int = 10, written: Callable[[dict], object] | None = None
) -> dict:
    """Where the served decode step's time goes (step_profile): for each of PROFILED's scenarios its step (the
    engine's CUDA graph replayed on a GPU; the demo shape's references eagerly on the CPU, a sanity pass of this
    code) timed as `run` times it, then profiled over `steps` steps: busy and idle time per step, and each kind of
    kernel's and each kernel's launches and microseconds. A scenario that fails is recorded and the next runs;
    `written(partial)` after each, so a run cut short keeps what it measured.

    CUPTI, which records the kernels, is started once before any graph is captured (profiling a graph captured
    before the profiler's first use crashed: pytorch#75504; `torch.profiler._utils._init_for_cuda_graphs`). Where it
    records no kernel of the replays, the same step is profiled eagerly instead (its kernels and their times, not its
    gaps, are the graph's), and the row says so."""
    on_gpu = device.type == "cuda"
    model, scenarios, what = benchmarked(device)
    dtype = dtype_name(model.embed_tokens.weight.dtype)
    cases = PROFILED if on_gpu else [(batch, context, dtype) for batch, context in scenarios]
    fp8_model = model.cast(kernels.FP8) if any(w == FP8_NAME for *_, w in cases) else None
    if on_gpu:
        from torch.profiler import _utils as profiler_utils

        if hasattr(profiler_utils, "_init_for_cuda_graphs"):
            profiler_utils._init_for_cuda_graphs()
    timing = "the engine's CUDA graph replayed" if on_gpu else "the references, eagerly (CPU operators)"
    result = {"model": what, "dtype": dtype, "timing": timing, "results": []}
    saved = kernels.forced_backend()
    try:
        kernels.set_backend(BACKENDS["served" if on_gpu else "torch"])
        for batch, context, weights in cases:
            timed = fp8_model if weights == FP8_NAME else model
            row = {"batch": batch, "context": context, "weights": weights, "profiled": timing}
            try:
                with torch.inference_mode():
                    step = _decode_steps(timed, batch, context, device, graphs=on_gpu)
                    step()
                    row["step_ms"] = time_ms(step, device, graph=False)[0]
                    profile = step_profile.profile(step, device, steps)
                    if on_gpu and not profile["events"]:
                        row["profiled"] = "eagerly: the profiler recorded no kernel of the graph's replays"
                        step = _decode_steps(timed, batch, context, device, graphs=False)
                        profile = step_profile.profile(step, device, steps)
                    row.update(profile)
                kv = dtype if weights == FP8_NAME else None  # the FP8 model keeps an unquantized KV cache here
                row["floor_ms"] = _floor_ms(model.arch, batch, context, copy_gbps, weights, kv)
                row["pct_of_bandwidth_floor"] = 100 * row["floor_ms"] / row["step_ms"]
                print(
                    f"decode batch {batch} context {context} {weights}: {row['step_ms']:.3f} ms/step; per step "
                    f"{row.get('launches', 0):.0f} launches, busy {row.get('busy_us', 0):.0f} µs, "
                    f"idle {row.get('idle_us', 0):.0f} µs ({row['profiled']})"
                )
            except Exception as e:  # new, never run on a GPU: a failure is recorded, the other scenarios run
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"decode batch {batch} context {context} {weights}: profile failed ({row['error']})")
            step = None
            result["results"].append(row)
            if written is not None:
                written(result)
            if on_gpu:
                with contextlib.suppress(RuntimeError):  # after a CUDA error the next scenario says what failed
                    torch.cuda.empty_cache()
    finally:
        kernels.set_backend(saved)
    return result


def profile_table(result: dict, top: int = 12) -> str:
    """Per scenario: the step against its floor, busy and idle time, each kind's share, the `top` kernels."""
    parts = []
    for r in result["results"]:
        title = f"### batch {r['batch']}, context {r['context']}, {r['weights']} weights"
        if "error" in r or not r.get("events"):
            parts.append(f"{title}\n\nnot profiled: {r.get('error', 'the profiler recorded no device work')}")
            continue
        span, between = r["span_us"], r.get("between_steps_us")
        lines = [
            title,
            "",
            f"{r['step_ms']:.3f} ms a step timed alone ({r['pct_of_bandwidth_floor']:.0f} % of its "
            f"{r['floor_ms']:.3f} ms floor); profiled ({r['profiled']}) over {r['steps']} steps: {span:.0f} µs a "
            f"step, {r['launches']:.0f} launches, busy {r['busy_us']:.0f} µs, idle {r['idle_us']:.0f} µs "
            f"({100 * r['idle_us'] / span:.1f} %)"
            + ("" if between is None else f", of which {between:.0f} µs between one step's last kernel and the next's"),
            "",
            "| kind | launches / step | µs / step | % of step |",
            "|---|---:|---:|---:|",
        ]
        for k in r["kinds"]:
            lines.append(f"| {k['kind']} | {k['launches']:.0f} | {k['us']:.1f} | {100 * k['us'] / span:.1f} % |")
        lines.append(f"| idle (between kernels) | | {r['idle_us']:.1f} | {100 * r['idle_us'] / span:.1f} % |")
        lines += ["", f"The {top} longest kernels:", "", "| kernel | launches / step | µs / step |", "|---|---:|---:|"]
        for k in r["kernels"][:top]:
            lines.append(f"| `{step_profile.short(k['kernel'])}` | {k['launches']:.0f} | {k['us']:.1f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def generate_speed(
    device: torch.device, new_tokens: int = 128, rounds: int = 5, dtype: torch.dtype = torch.bfloat16
) -> list[dict]:
    """`Generator` (the engine: paged KV cache, decode steps replayed from CUDA graphs) on the demo parent in
    `dtype` vs transformers' `generate` on the same checkpoint, in the same run: output tokens/s at batch 1 and 8,
    16-token prompts, exactly `new_tokens` greedy tokens each, each side's median over `rounds` interleaved rounds
    (harness.InTurns) after a warm-up call, and the median (min-max) of the rounds' ratios. A model this small is
    bound by launches, which the graphs remove (72 tokens/s at batch 1 without them, gpu/2026-11-28)."""
    from transformers import LlamaForCausalLM

    from tessera.demo import PARENT_DIR
    from tessera.runtime.generate import Generator
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import SamplingParams

    generator = Generator(load_model(PARENT_DIR, device=device, dtype=dtype))
    hf = LlamaForCausalLM.from_pretrained(PARENT_DIR, dtype=dtype).to(device).eval()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(100, 8000, (batch, 16), generator=torch.Generator().manual_seed(batch))

        def ours(prompts=prompts) -> list[list[int]]:
            return [c.tokens for c in generator.generate(prompts.tolist(), params)]

        def theirs(prompts=prompts) -> list[list[int]]:
            ids = prompts.to(device)
            with torch.inference_mode():
                out = hf_generate(hf, ids, new_tokens)
            return out[:, 16:].tolist()

        # The warm-up calls (the engine built and its graphs captured here) give the tokens compared.
        outputs = {"tessera": ours(), "transformers": theirs()}
        turns = InTurns({"tessera": partial(wall_s, ours, device), "transformers": partial(wall_s, theirs, device)})
        speedup = turns.run(rounds).ratio("transformers", "tessera")
        speed = {name: batch * new_tokens / turns.spread(name).median for name in outputs}
        pairs = [(a, b) for x, y in zip(outputs["tessera"], outputs["transformers"]) for a, b in zip(x, y)]
        same = sum(a == b for a, b in pairs) / len(pairs)
        rows.append(
            {
                "batch": batch,
                "tessera_tokens_per_s": speed["tessera"],
                "transformers_tokens_per_s": speed["transformers"],
                "speedup": speedup.median,
                "speedup_min": speedup.low,
                "speedup_max": speedup.high,
                "rounds": rounds,
                "same_tokens": same,
                "dtype": str(dtype).removeprefix("torch."),
                "cuda_graphs": generator.engine.graphs is not None,
            }
        )
        print(
            f"generate, demo parent, batch {batch}: tessera {speed['tessera']:.0f} tokens/s, transformers "
            f"{speed['transformers']:.0f} tokens/s, {speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f} "
            f"over {rounds} rounds; {100 * same:.0f} % of tokens the same)"
        )
    return rows


def table(result: dict) -> str:
    lines = [
        "| batch | context | precision | kernels | CUDA graph | ms/step | tokens/s | % of bandwidth floor | "
        "vs unquantized step | logits vs reference |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        speedup = ""
        if "speedup_vs_unquantized_step" in r:  # the median of the rounds' ratios (range)
            low, high = r["speedup_vs_unquantized_step_min"], r["speedup_vs_unquantized_step_max"]
            speedup = f"{r['speedup_vs_unquantized_step']:.2f}x ({low:.2f}-{high:.2f})"
        # The served step's logits against the plain-torch path's in the same precision (FP8 rows: its FP8 path).
        error = r.get("logits_relative_error_vs_fp8_reference", r.get("logits_relative_error_vs_references"))
        lines.append(
            f"| {r['batch']} | {r['context']} | {r.get('precision', result['dtype'])} | {r['kernels']} | "
            f"{'yes' if r['cuda_graph'] else 'no'} | {r['step_ms']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['pct_of_bandwidth_floor']:.0f} % | {speedup} | {'' if error is None else f'{error:.1e}'} |"
        )
    if result.get("generate"):
        lines += [
            "",
            "`Generator` on the demo parent (bf16, 16-token prompts, 128 greedy tokens) vs transformers, medians "
            "of interleaved rounds; the speedup is the median (min-max) of the rounds' ratios:",
            "",
            "| batch | tessera tokens/s | transformers tokens/s | speedup (range) | same tokens | CUDA graphs |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for r in result["generate"]:
            lines.append(
                f"| {r['batch']} | {r['tessera_tokens_per_s']:.0f} | {r['transformers_tokens_per_s']:.0f} | "
                f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
                f"{100 * r['same_tokens']:.0f} % | {r['cuda_graphs']} |"
            )
    return "\n".join(lines)
