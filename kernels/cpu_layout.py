"""The memory layout in which this CPU's BLAS multiplies a projection matrix fastest.

`F.linear(x, W)` with W [N, K] asks the BLAS for x · Wᵀ. At the few rows of a decode step that product is bound
by reading W, and the BLAS does not read both layouts of W equally fast: on a 2-core AMD EPYC VM (torch 2.13.0
CPU, MKL 2024.2, one row, a pool of copies larger than the caches) W [1536, 256] streamed at 8 GB/s stored
row-major and at 19 GB/s stored transposed (the same [N, K] tensor with strides (1, N), i.e. Wᵀ contiguous),
while W [256, 768] ran faster row-major. Shapes, values and results stay the same; only the strides change,
which every torch op (and autograd) takes as they are.

Which layout wins depends on the shape, the dtype, the BLAS, the CPU and the thread count, so it is measured,
once per process for each of them (about 75 ms a shape on that VM): both layouts over a pool of copies as large
as its L3 cache (a decode step streams its weights), at 1 and 8 rows, interleaved, each the best of REPEATS
passes; the transposed layout must win by MARGIN. A matrix larger than half the pool (a large vocabulary's head)
is measured on its first rows. Matrices under MIN_ELEMENTS stay as they are: they live in the caches, where the
two layouts tie (the tests' tiny models among them).

Because it is measured, two processes on a busy machine can choose differently, and their logits then differ in
the last bits (the same sums in another order). `TESSERA_CPU_LAYOUT=row-major` (or `transposed`) fixes the choice
for every process that inherits it, for outputs that must match across processes bit for bit.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

POOL_BYTES = 32 * 2**20
MIN_ELEMENTS = 2**16
MIN_ROWS = 256  # the fewest rows a matrix is measured on (a larger one on its first rows: transposed_is_faster)
ROWS = (1, 8)  # decode steps: batch 1 and a small batch (at hundreds of rows the layouts tie)
REPEATS = 3
MARGIN = 0.05
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what F.linear runs on the CPU (not FP8)
LAYOUT_ENV = "TESSERA_CPU_LAYOUT"
LAYOUTS = {"measure": None, "row-major": False, "transposed": True}  # its values: measured, or always one layout


def is_transposed(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight is stored transposed (strides (1, N)) rather than row-major."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])


@functools.cache
def transposed_is_faster(n: int, k: int, dtype: torch.dtype, threads: int) -> bool:
    """Whether `F.linear` of a few rows runs measurably faster over W [n, k] stored transposed, on this CPU with
    `threads` torch threads (the current count: the cache key says which it was measured at)."""
    if n * k < MIN_ELEMENTS:
        return False
    item = torch.empty((), dtype=dtype).element_size()
    # A matrix past half the pool (a large vocabulary's head) is measured on its first rows: a slice as large as
    # the caches reads as the whole does, and the pool never holds two copies of a gigabyte matrix.
    n = min(n, max(MIN_ROWS, POOL_BYTES // (2 * k * item)))
    elements = n * k
    copies = max(2, POOL_BYTES // (elements * item))
    pool = torch.full((copies, elements), 0.5, dtype=dtype)  # a constant: no denormals, no NaNs to slow it
    layouts = {
        False: [pool[i].view(n, k) for i in range(copies)],
        True: [pool[i].view(k, n).t() for i in range(copies)],
    }
    # Timed here rather than by devices.median_ms, which times one function for at least 0.3 s: the two layouts
    # alternate pass by pass (a machine's drift meets both alike) and a shape costs ~75 ms.
    best = {False: 0.0, True: 0.0}
    with torch.inference_mode():
        for rows in ROWS:
            x = torch.full((rows, k), 0.5, dtype=dtype)
            passes: dict[bool, list[float]] = {False: [], True: []}
            for r in range(REPEATS + 1):  # the first pass of each layout warms up and is not counted
                for transposed in (False, True) if r % 2 else (True, False):
                    start = time.perf_counter()
                    for w in layouts[transposed]:
                        F.linear(x, w)
                    passes[transposed].append(time.perf_counter() - start)
            for transposed, seconds in passes.items():
                best[transposed] += min(seconds[1:])
    return best[True] < (1 - MARGIN) * best[False]


def fastest_layout(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] (a CPU matrix in a float dtype) in the layout `transposed_is_faster` picks: itself when it
    is in that layout already or too small to matter, else a copy with the same values."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"fastest_layout takes a CPU matrix in {COMPUTE_DTYPES}, got {tuple(weight.shape)} {weight.dtype} "
            f"on {weight.device}"
        )
    n, k = weight.shape
    choice = os.environ.get(LAYOUT_ENV, "measure")
    if choice not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={choice!r}: expected one of {', '.join(LAYOUTS)}")
    want = LAYOUTS[choice]
    if want is None:
        want = transposed_is_faster(n, k, weight.dtype, torch.get_num_threads())
    if want and not is_transposed(weight):
        return weight.t().contiguous().t()
    if not want and is_transposed(weight):
        return weight.contiguous()
    return weight
