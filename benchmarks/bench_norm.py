"""RMSNorm fused with the residual add: tessera's op vs torch eager (add, then torch's RMSNorm, HF cast order).

The shape the runtime runs between every two sublayers: s = x + residual; y = RMSNorm(s); both returned.
Rows M = batch × tokens (1 for batch-1 decode, up to 16k for a prefill), hidden sizes of Llama-3.1-8B (4096)
and Llama-3.1-70B / Nemotron-51B (8192). Memory-bound: bytes = read x, residual, weight; write y and s.
Goal (issue 3, H200): >= 2x torch eager.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from tessera import kernels
from tessera.kernels.norm import rms_norm_reference

from .harness import KernelCase

HIDDEN = (4096, 8192)  # Llama-3.1-8B; Llama-3.1-70B and Nemotron-51B
ROWS = (1, 16, 128, 2048, 16384)


def fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return kernels.rms_norm(x, weight, 1e-5, residual)[0]


def eager(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rms_norm_reference(x + residual, weight, 1e-5)


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Iterator[KernelCase]:
    # On CPU the ops run their references: a quick sanity pass over shrunken shapes.
    shrink = 1 if device.type == "cuda" else 16
    for hidden in HIDDEN:
        h_run = hidden // shrink
        for m_run in sorted({max(1, m // shrink) for m in ROWS}):
            gen = torch.Generator(device).manual_seed(m_run)
            x = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            residual = torch.randn(m_run, h_run, device=device, dtype=dtype, generator=gen)
            weight = 1 + 0.1 * torch.randn(h_run, device=device, dtype=dtype, generator=gen)

            size = x.element_size()
            yield KernelCase(
                op="rms_norm+residual",
                shape={"rows": m_run, "hidden": h_run},
                candidate=partial(fused, x, residual, weight),
                baseline=partial(eager, x, residual, weight),
                flops=4.0 * m_run * h_run,
                bytes=(4 * m_run * h_run + h_run) * size,
                tolerance=1e-2,  # bf16: both round the output once, maybe on either side of a tie
                baseline_name="torch eager: x + residual, F.rms_norm (HF cast order)",
            )
