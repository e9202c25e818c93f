"""FFN Fusion at scale: decode latency of a run of attention-free FFN layers, sequential vs fused.

On a GPU: Llama-3.3-Nemotron-Super-49B's longest attention-free run (layers 53-70, hidden 8192, its own FFN
widths) with random bf16 weights. Fused as the default rule does it: layers 53-69 become one 91,392-wide FFN,
layer 70 stays. Each step is one token per sequence through the stack (norm + SwiGLU per layer, residual
adds), timed as CUDA-graph replays with `do_bench`; batch 1 is the single-user decode latency the FFN Fusion
paper reports. On CPU the same run at hidden 1024 (widths scaled by 1/8) in float32, as a sanity pass.
Every row first checks that the fused stack equals the parallel form of the unfused one.
"""

from __future__ import annotations

import torch

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.devices import dtype_name, serving_dtype
from tessera.runtime.model import Model
from tessera.search.fusion import FusionGroup, fuse

from .harness import relative_error, time_in_turns

# block_configs[53..70] of nvidia/Llama-3_3-Nemotron-Super-49B-v1 (attention no-op, ffn_mult -> width at 8192).
SUPER_49B_RUN_WIDTHS = [
    7168,
    5632,
    5632,
    7168,
    5632,
    5632,
    5632,
    7168,
    7168,
    2816,
    2816,
    5632,
    5632,
    2816,
    2816,
    5632,
    2816,
    2816,
]
SUPER_49B_FIRST_LAYER = 53


def stack(hidden: int, widths: list[int], device: torch.device, dtype: torch.dtype) -> Model:
    blocks = tuple(BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", w)) for w in widths)
    arch = ArchConfig(vocab_size=256, hidden_size=hidden, n_heads=hidden // 128, head_dim=128, blocks=blocks)
    return Model.empty(arch, device, dtype).init_weights(seed=0).eval()


def run(device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    hidden, scale = (8192, 1) if on_gpu else (1024, 8)
    widths = [w // scale for w in SUPER_49B_RUN_WIDTHS]
    dtype = serving_dtype(device)
    unfused = stack(hidden, widths, device, dtype)
    group = FusionGroup(tuple(range(len(widths) - 1)))  # all but the last FFN
    fused = fuse(unfused, [group])
    batch_sizes = (1, 8, 32, 128) if on_gpu else (1, 8)
    rows = []
    for b in batch_sizes:
        gen = torch.Generator(device).manual_seed(b)
        x = torch.randn(b, hidden, device=device, dtype=dtype, generator=gen)

        def through(model: Model, x=x) -> torch.Tensor:
            h = x
            for layer in model.layers:  # attention-free: each layer is its FFN half (empty ones return h)
                h = layer.feed_forward(h)
            return h

        with torch.no_grad():
            parallel = x.float() + sum(
                (unfused.layers[i].feed_forward(x) - x).float() for i in group.layers
            )  # the parallel form
            parallel = unfused.layers[-1].feed_forward(parallel.to(dtype))
            error = relative_error(through(fused), parallel)
            sides = {"unfused": lambda: through(unfused), "fused": lambda: through(fused)}
            turns, methods = time_in_turns(sides, device)
        speedup = turns.ratio("unfused", "fused")
        rows.append(
            {
                "batch": b,
                "unfused_ms": turns.spread("unfused").median,
                "fused_ms": turns.spread("fused").median,
                "speedup": speedup.median,
                "speedup_min": speedup.low,
                "speedup_max": speedup.high,
                "rounds": turns.rounds,
                "fused_vs_parallel_relative_error": error,
                "timing": methods["unfused"],
            }
        )
        r = rows[-1]
        print(
            f"batch {b}: unfused {r['unfused_ms']:.3f} ms, fused {r['fused_ms']:.3f} ms = {speedup.median:.2f}x "
            f"({speedup.low:.2f}-{speedup.high:.2f})"
        )
    return {
        "model": (
            f"Super-49B layers {SUPER_49B_FIRST_LAYER}-{SUPER_49B_FIRST_LAYER + len(widths) - 1} "
            f"(attention-free run), hidden {hidden}" + ("" if on_gpu else ", widths / 8")
        ),
        "dtype": dtype_name(dtype),
        "widths": widths,
        "fused_width": sum(widths[:-1]),
        "sequential_depth": {"unfused": len(widths), "fused": 2},
        "results": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['dtype']}: {result['sequential_depth']['unfused']} FFNs in a row → one "
        f"{result['fused_width']:,}-wide FFN + the last one.",
        "",
        "| batch | unfused ms | fused ms | speedup (range over rounds) | fused vs parallel form (rel. error) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['batch']} | {r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) "
            f"| {r['fused_vs_parallel_relative_error']:.1e} |"
        )
    return "\n".join(lines)
