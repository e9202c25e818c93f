"""The memory layout in which this CPU multiplies a projection matrix fastest.

`F.linear(x, W)` with W [N, K] asks the BLAS for x · Wᵀ. At the few rows of a decode step that product is bound
by reading W, and the BLAS does not read both layouts of W equally fast: on a 2-core AMD EPYC VM (torch 2.13.0
CPU, MKL 2024.2, one row, a pool of copies larger than the caches) W [1536, 256] streamed at 8 GB/s stored
row-major and at 19 GB/s stored transposed (the same [N, K] tensor with strides (1, N), i.e. Wᵀ contiguous),
while W [256, 768] ran faster row-major. Shapes, values and results stay the same; only the strides change,
which every torch op (and autograd) takes as they are.

A third layout is oneDNN's own (`pack_weight`): W reordered once into the blocked form its GEMM reads, which
F.linear repacks on every call. On the 2-core AMD EPYC (zen5) dev VM (2026-11-30, a pool of copies past the L3
cache, float32) the demo parent's matrices multiplied 1.8-3.6x faster packed than through F.linear at 1 and 8 rows
(W [1536, 256]: 43 µs against 117 µs row-major and 64-140 µs transposed; the head [8192, 256] at 8 rows: 190 µs
against 636-767 µs). A packed matrix is an opaque tensor that only `packed_linear` reads and autograd cannot
differentiate, so the model keeps its dense parameter and the process a packed twin beside it (`pack`, `twin`), which
`linear` multiplies through while an engine runs a step (`twins_active`) with no gradients recorded; twins cost the
memory of the weights they pack. At 16-2,048 rows (a prefill) packed matrices multiplied 1.6-3.5x faster too on that
VM (the demo parent's shapes, one matrix in the caches, not committed).

Which layout wins depends on the shape, the dtype, the BLAS, the CPU and the thread count, so it is measured,
once per process for each of them (55-111 ms a shape on the zen5 VM, 2026-11-30): the layouts over a pool of
copies as large as its L3 cache (a decode step streams its weights), at 1 and 8 rows, interleaved, each the best of
REPEATS passes; the transposed layout must beat row-major, and the packed one the better of those, by MARGIN. A
matrix larger than half the pool (a large vocabulary's head) is measured on its first rows. Matrices under
MIN_ELEMENTS stay as they are: they live in the caches, where the layouts tie (the tests' tiny models among them).

Because it is measured, two processes on a busy machine can choose differently, and their logits then differ in
the last bits (the same sums in another order). `TESSERA_CPU_LAYOUT=row-major` (or `transposed`, or `packed`) fixes
the choice for every process that inherits it, for outputs that must match across processes bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tessera.errors import UserError

POOL_BYTES = 32 * 2**20
MIN_ELEMENTS = 2**16
MIN_ROWS = 256  # the fewest rows a matrix is measured on (a larger one on its first rows: measured_layout)
ROWS = (1, 8)  # decode steps: batch 1 and a small batch (at hundreds of rows the layouts tie)
REPEATS = 3
MARGIN = 0.05
PACK_ROWS = 8  # the rows oneDNN packs a matrix for (a decode step's few); the packed matrix takes any number
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what F.linear runs on the CPU (not FP8)
LAYOUT_ENV = "TESSERA_CPU_LAYOUT"
LAYOUTS = ("measure", "row-major", "transposed", "packed")  # its values: measured, or always one layout


class Layout(NamedTuple):
    """A matrix's layout: its dense storage (transposed, or row-major) and whether a packed twin multiplies it."""

    transposed: bool
    packed: bool


def is_transposed(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight is stored transposed (strides (1, N)) rather than row-major."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] reordered into oneDNN's blocked layout: an opaque tensor that only `packed_linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ (+ bias [N]) -> [..., N], W packed by `pack_weight` (oneDNN's GEMM, no gradient)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU pack and multiply `dtype` matrices: oneDNN is in x86 builds; fp16 needs
    AVX512-FP16 or AVX-NE-CONVERT (the 2-core AMD EPYC VM has neither and refuses it)."""
    try:
        w, x = torch.ones(16, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
        return bool(torch.equal(packed_linear(x, pack_weight(w)), F.linear(x, w)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _multiply(layout: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, w) if layout == "packed" else F.linear(x, w)


@functools.cache
def measured_layout(n: int, k: int, dtype: torch.dtype, threads: int) -> Layout:
    """The layout in which a few rows multiply W [n, k] measurably fastest on this CPU with `threads` torch threads
    (the current count: the cache key says which it was measured at)."""
    if n * k < MIN_ELEMENTS:
        return Layout(False, False)
    item = torch.empty((), dtype=dtype).element_size()
    # A matrix past half the pool (a large vocabulary's head) is measured on its first rows: a slice as large as
    # the caches reads as the whole does, and the pool never holds two copies of a gigabyte matrix.
    n = min(n, max(MIN_ROWS, POOL_BYTES // (2 * k * item)))
    elements = n * k
    copies = max(2, POOL_BYTES // (elements * item))
    pool = torch.full((copies, elements), 0.5, dtype=dtype)  # a constant: no denormals, no NaNs to slow it
    layouts = {
        "row-major": [pool[i].view(n, k) for i in range(copies)],
        "transposed": [pool[i].view(k, n).t() for i in range(copies)],
    }
    if packing_works(dtype):
        with contextlib.suppress(RuntimeError):  # oneDNN refused this shape (or the pool's memory): dense only
            layouts["packed"] = [pack_weight(w) for w in layouts["row-major"]]
    # Timed here rather than by devices.median_ms, which times one function for at least 0.3 s: the layouts
    # alternate pass by pass, in turns reversed every other pass (a machine's drift meets them alike).
    best = dict.fromkeys(layouts, 0.0)
    with torch.inference_mode():
        for rows in ROWS:
            x = torch.full((rows, k), 0.5, dtype=dtype)
            passes: dict[str, list[float]] = {name: [] for name in layouts}
            for r in range(REPEATS + 1):  # the first pass of each layout warms up and is not counted
                for name in list(layouts) if r % 2 else reversed(layouts):
                    start = time.perf_counter()
                    for w in layouts[name]:
                        _multiply(name, x, w)
                    passes[name].append(time.perf_counter() - start)
            for name, seconds in passes.items():
                best[name] += min(seconds[1:])
    transposed = best["transposed"] < (1 - MARGIN) * best["row-major"]
    dense = best["transposed" if transposed else "row-major"]
    return Layout(transposed, "packed" in best and best["packed"] < (1 - MARGIN) * dense)


def layout_for(weight: torch.Tensor) -> Layout:
    """The layout of `weight` [N, K] (a CPU matrix in a float dtype F.linear runs): TESSERA_CPU_LAYOUT's, or
    measured (`measured_layout`). `packed` only where this build packs its dtype."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"a CPU weight layout takes a CPU matrix in {COMPUTE_DTYPES}, got {tuple(weight.shape)} {weight.dtype} "
            f"on {weight.device}"
        )
    choice = os.environ.get(LAYOUT_ENV, "measure")
    if choice not in LAYOUTS:
        raise UserError(f"{LAYOUT_ENV}={choice!r}: expected one of {', '.join(LAYOUTS)}")
    if choice == "measure":
        return measured_layout(*weight.shape, weight.dtype, torch.get_num_threads())
    return Layout(choice == "transposed", choice == "packed" and packing_works(weight.dtype))


def fastest_layout(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] in the dense layout `layout_for` picks: itself when it is in that layout already or too
    small to matter, else a copy with the same values."""
    want = layout_for(weight).transposed
    if want and not is_transposed(weight):
        return weight.t().contiguous().t()
    if not want and is_transposed(weight):
        return weight.contiguous()
    return weight


class _Twin(NamedTuple):
    weight: weakref.ref  # the matrix it was packed from (the entry goes when the matrix does)
    packed: torch.Tensor
    signature: tuple  # the matrix's version, storage, shape, strides and dtype when packed
    bytes: int


_TWINS: dict[int, _Twin] = {}  # id(matrix) -> its packed twin, for the whole process


def _signature(weight: torch.Tensor) -> tuple:
    return weight._version, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype


def twin(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed twin of `weight`, while it is current: made from this tensor, which has since kept its storage,
    shape, strides, dtype and version (an in-place update through it, a new `.data`, retires the twin). A write
    that bypasses the version counter (through `.data` or a numpy alias) is not seen: update weights through the
    tensor itself, or call `drop`."""
    entry = _TWINS.get(id(weight))
    if entry is None or entry.weight() is not weight or entry.signature != _signature(weight):
        return None
    return entry.packed


def twin_bytes() -> int:
    """The memory the process's packed twins hold (each the size of its dense matrix)."""
    return sum(entry.bytes for entry in _TWINS.values())


def pack(weight: torch.Tensor, room: float) -> bool:
    """Give `weight` a current packed twin (kept, or made) while the process's twins stay within `room` bytes;
    whether it has one. None is made for a tensor made in inference mode (no version to tell an update by) or
    where oneDNN refuses the matrix."""
    if twin(weight) is not None:
        return True
    drop(weight)
    size = weight.numel() * weight.element_size()
    if twin_bytes() + size > room:
        return False
    try:
        signature = _signature(weight)
        packed = pack_weight(weight.detach())
    except RuntimeError:
        return False
    key = id(weight)
    _TWINS[key] = _Twin(weakref.ref(weight, lambda _, key=key: _TWINS.pop(key, None)), packed, signature, size)
    return True


def drop(weight: torch.Tensor) -> None:
    """Forget `weight`'s packed twin, if it has one."""
    _TWINS.pop(id(weight), None)


_ACTIVE: ContextVar[bool] = ContextVar("packed_twins_active", default=False)


@contextlib.contextmanager
def twins_active() -> Iterator[None]:
    """While active (in this thread or task), `linear` multiplies through current packed twins: an engine's step."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the weight's packed twin where twins are active, it has a current one, x
    is in its dtype and no gradient is recorded (the packed GEMM has no backward)."""
    if _ACTIVE.get() and not torch.is_grad_enabled() and x.dtype == weight.dtype:
        packed = twin(weight)
        if packed is not None:
            return packed_linear(x, packed, bias)
    return F.linear(x, weight, bias)
