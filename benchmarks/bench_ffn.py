"""SwiGLU FFN with the residual add: tessera's two fused Triton GEMMs vs torch eager (F.linear = cuBLAS,
F.silu·mul), at every M (the served op, `kernels.swiglu_ffn`, hands M > ffn.TRITON_MAX_ROWS to cuBLAS while the
kernels lose there: this suite measures the kernels themselves).

Shapes from real configs (hidden, intermediate): Llama-3.1-8B (4096, 14336), Llama-3.1-70B (8192, 28672),
Nemotron-51B's pruned widths at hidden 8192 (28672 / 14336 / 7168), and an FFN-Fusion group of four
28672-wide FFNs (8192, 114688). Rows M from batch-1 decode (1) to a prefill (4096). Work: 6·M·H·I FLOPs;
bytes = the three weight matrices plus x, residual and out (memory-bound below ~200 rows on an H200).
Goals (issue 3, H200): >= 1.15x torch eager for M <= 128, >= 0.9x for M >= 2048.

FP8 rows (issue 20), on the 8B and 70B shapes: the same FFN with E4M3 weights and per-channel scales, activations
quantized per token, tessera's Triton GEMMs against `torch._scaled_mm` (cuBLASLt, row-wise scales, no fast
accumulation) doing the same; bytes count the weights at one byte. Goal (H200): >= 1.0x `_scaled_mm` at every M.

Persistent rows (issue 20, Hopper only): both GEMMs on the persistent TMA schedule (kernels/gemm.py), bf16 against
cuBLAS eager on the 8B shape and the fused group (the widest), FP8 against `_scaled_mm` on the 8B shape. Goal
(H200): >= 1.0x cuBLAS at every M up to 4096, >= 1.1x at M <= 16. The served dispatch keeps the portable schedule
until these rows say which wins.

Unsplit rows (bf16, one row, where the portable gate/up GEMM splits K because its tiles cover the SMs less than
twice: three rows on an H200, kept few for the suite's step limit): the same op with the gate/up GEMM unsplit,
against the same baseline, so the two rows say whether the split pays (it is on in the served path, unmeasured on a
GPU when it was added).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F

from tessera import kernels
from tessera.kernels.ffn import gate_up_split_plan, swiglu_ffn_fp8_scaled_mm, swiglu_ffn_triton
from tessera.kernels.gemm import tma_ready
from tessera.kernels.hardware import hopper

from .harness import KernelCase

SHAPES = [  # (model, hidden, intermediate)
    ("llama-3.1-8b", 4096, 14336),
    ("llama-3.1-70b / nemotron-51b full", 8192, 28672),
    ("nemotron-51b half", 8192, 14336),
    ("nemotron-51b quarter", 8192, 7168),
    ("nemotron-51b narrow", 8192, 2816),  # a pruned child's width: 44 gate/up tiles at M <= 16, split over K
    ("ffn-fusion 4x28672", 8192, 4 * 28672),
]
ROWS = (1, 16, 128, 2048, 4096)
# The FP8 rows and the persistent rows take fewer shapes, so the GPU suite's step stays in its limit; persistent FP8
# rows come from the 8B shape, in both.
FP8_SHAPES = SHAPES[:2]
PERSISTENT_SHAPES = (SHAPES[0], SHAPES[-1])


EAGER = "torch eager: F.linear (cuBLAS), F.silu(gate) * up, F.linear, + residual"  # the bf16 FFNs' baseline
SCALED_MM = "torch._scaled_mm (cuBLASLt FP8, row-wise scales), F.silu(gate) * up, + residual"  # the FP8 FFNs'


def ffn_weights(hidden: int, inter: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator):
    """Random w_gate_up [2I, H] and w_down [H, I], scaled so the pre-activations are O(1) (silu on both sides of
    0): the FFN benchmarks' and the tiling sweep's weights."""
    w_gate_up = torch.randn(2 * inter, hidden, device=device, dtype=dtype, generator=gen) * hidden**-0.5
    w_down = torch.randn(hidden, inter, device=device, dtype=dtype, generator=gen) * inter**-0.5
    return w_gate_up, w_down


def eager_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, residual: torch.Tensor):
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return residual + F.linear(F.silu(gate) * up, w_down)


# The sweep's rows and rows between them no sweep measures: a decode batch of 8, a batch of 32 past the decode
# regime (kernels/ffn_tilings.py), 64 and 512.
SERVED_ROWS = (1, 8, 16, 32, 64, 128, 512, 2048, 4096)


def served_cases(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Iterator[KernelCase]:
    """The `ffn_served` suite: the FFN as served (`kernels.swiglu_ffn`: Triton or cuBLAS, and the tilings, as the
    GPU's measured table says, kernels/ffn_tilings.py, or the built-in rule without one) against cuBLAS eager (bf16)
    and `_scaled_mm` (FP8) on the 8B shape, at rows from decode to prefill. Issue 20's goal, >= 1.0x at every M, is
    this op's; each row names what served it. Run after `tune_gemm` with TESSERA_FFN_TILINGS set to its table, it
    measures that table's plans in the same call."""
    shrink = 1 if device.type == "cuda" else 32
    model, hidden, inter = SHAPES[0]
    h_run, i_run = hidden // shrink, inter // shrink
    gen = torch.Generator(device).manual_seed(inter)
    w_gate_up, w_down = ffn_weights(h_run, i_run, device, dtype, gen)
    gate_up_q, gate_up_scale = kernels.quantize_weight(w_gate_up)
    down_q, down_scale = kernels.quantize_weight(w_down)
    for fp8 in (False, True):
        for m_run in sorted({max(1, m // shrink) for m in SERVED_ROWS}):
            x = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            residual = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            if fp8:
                args = (x, gate_up_q, down_q, residual, gate_up_scale, down_scale)
                baseline = partial(swiglu_ffn_fp8_scaled_mm, *args)
                baseline_name = SCALED_MM
            else:
                args = (x, w_gate_up, w_down, residual)
                baseline = partial(eager_swiglu, *args)
                baseline_name = EAGER
            route, plan = kernels.ffn_route(x, args[1], args[2], fp8=fp8)
            served_by = route if plan is None else f"{route}, the table's {plan.rows}-row plan"
            yield KernelCase(
                op=f"swiglu_ffn+residual served{' (FP8 weights)' if fp8 else ''}",
                shape={"model": model, "rows": m_run, "hidden": h_run, "intermediate": i_run, "served_by": served_by},
                candidate=partial(kernels.swiglu_ffn, *args),
                baseline=baseline,
                flops=6.0 * m_run * h_run * i_run,
                bytes=(3 * h_run * i_run) * (1 if fp8 else x.element_size()) + 3 * m_run * h_run * x.element_size(),
                tolerance=3e-2,  # as the ffn suite's rows (bf16 roundings; FP8 steps of 2^-4 for a few elements)
                baseline_name=baseline_name,
            )


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Iterator[KernelCase]:
    on_gpu = device.type == "cuda"
    yield from _cases(device, dtype, False)
    if on_gpu and hopper(device):  # tensor descriptors: NVIDIA Hopper and newer
        yield from _cases(device, dtype, True)


def _cases(device: torch.device, dtype: torch.dtype, persistent: bool) -> Iterator[KernelCase]:
    shrink = 1 if device.type == "cuda" else 32  # CPU: references on shrunken shapes, a sanity pass
    op = partial(swiglu_ffn_triton, persistent=persistent) if device.type == "cuda" else kernels.swiglu_ffn
    schedule = " (persistent TMA)" if persistent else ""
    for model, hidden, inter in PERSISTENT_SHAPES if persistent else SHAPES:
        h_run, i_run = hidden // shrink, inter // shrink
        gen = torch.Generator(device).manual_seed(inter)
        w_gate_up, w_down = ffn_weights(h_run, i_run, device, dtype, gen)
        if persistent:  # a row so labelled must not fall back to the portable kernels
            assert tma_ready(w_gate_up, w_down), f"{model}: weights tensor descriptors cannot describe"
        for m_run in sorted({max(1, m // shrink) for m in ROWS}):
            x = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            residual = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            size = x.element_size()
            yield KernelCase(
                op="swiglu_ffn+residual" + schedule,
                shape={"model": model, "rows": m_run, "hidden": h_run, "intermediate": i_run},
                candidate=partial(op, x, w_gate_up, w_down, residual),
                baseline=partial(eager_swiglu, x, w_gate_up, w_down, residual),
                flops=6.0 * m_run * h_run * i_run,
                bytes=(3 * h_run * i_run + 3 * m_run * h_run) * size,
                # bf16: the baseline rounds gate, up, silu(gate) and their product; tessera only the product.
                tolerance=3e-2,
                baseline_name=EAGER,
            )
            on_gpu_portable = device.type == "cuda" and not persistent
            if on_gpu_portable and m_run == 1 and gate_up_split_plan(m_run, h_run, i_run, device)[0] > 1:
                yield KernelCase(  # the same op with its gate/up GEMM unsplit: whether splitting K pays
                    op="swiglu_ffn+residual (gate/up unsplit)",
                    shape={"model": model, "rows": m_run, "hidden": h_run, "intermediate": i_run},
                    candidate=partial(op, x, w_gate_up, w_down, residual, split_k=False),
                    baseline=partial(eager_swiglu, x, w_gate_up, w_down, residual),
                    flops=6.0 * m_run * h_run * i_run,
                    bytes=(3 * h_run * i_run + 3 * m_run * h_run) * size,
                    tolerance=3e-2,
                    baseline_name=EAGER,
                )
        if (model, hidden, inter) not in FP8_SHAPES:
            continue
        fp8 = (*kernels.quantize_weight(w_gate_up), *kernels.quantize_weight(w_down))
        gate_up_q, gate_up_scale, down_q, down_scale = fp8
        for m_run in sorted({max(1, m // shrink) for m in ROWS}):
            x = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            residual = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            args = (x, gate_up_q, down_q, residual, gate_up_scale, down_scale)
            yield KernelCase(
                op="swiglu_ffn+residual (FP8 weights)" + schedule,
                shape={"model": model, "rows": m_run, "hidden": h_run, "intermediate": i_run},
                candidate=partial(op, *args),
                baseline=partial(swiglu_ffn_fp8_scaled_mm, *args),
                flops=6.0 * m_run * h_run * i_run,
                bytes=3 * h_run * i_run + 3 * m_run * h_run * x.element_size(),
                # Both quantize x and the SiLU product per token: a product rounded differently can land in
                # another E4M3 step (2^-4 relative) for a few elements.
                tolerance=3e-2,
                baseline_name=SCALED_MM,
            )
