"""The Triton GEMM every projection shares: out = a · Wᵀ [· scales] [+ bias] [+ residual], W stored [N, K].

One kernel serves the SwiGLU FFN's down projection (kernels/ffn.py) and, for FP8 weights, every other linear
(q/k/v, o, the linear replacements, the LM head: kernels/fp8.py). Its epilogue applies, in order:
- FP8 scales: a and W in float8 E4M3 with one scale per row of a (per token) and per row of W (per output
  channel): the fp32 accumulator times a_scale[m] · w_scale[n] is the product of the dequantized operands;
- a bias [N];
- a residual [M, N].
When M is small the output has too few tiles to fill the GPU, so the reduction over K is split (split-K): each
split stores an fp32 partial tile, and the split that finishes its tile last sums them all, adds the bias and
residual, and casts (`arrived_last`; serial split-K, as CUTLASS does it: one launch where a separate sum kernel
made two, ~32 kernels fewer in a Llama-8B decode step). Every weight offset is in int64: an
FFN-Fusion group's width reaches ~400,000 rows (Ultra-253B), past int32 at 16k columns. Block shapes are fixed
per M range, not autotuned: autotuning is slow, uncached, and must not run inside a CUDA-graph capture
(REFERENCE.md).

FP8 products: Hopper's FP8 tensor cores accumulate in a float of about 13 mantissa bits, and Triton's default on
sm_90 never promotes to the fp32 accumulator. With FP8 operands every tl.dot here promotes after each BLOCK_K tile
(`max_num_imprecise_acc`, the IMPRECISE_ACC constexpr), as DeepSeek-V3's FP8 GEMMs do every 128 and cuBLASLt
without fast accumulation does. (16-row tiles run on mma.sync with exact fp32 sums anyway.) Unmeasured: its cost.

Two schedules compute the same tiles (`persistent`):
- portable: one program per (output tile, split), operands loaded through pointers: any GPU, the interpreter;
- persistent: as many programs as SMs, each walking output tiles (and splits) in the grouped order, operand tiles
  fetched through tensor-memory descriptors (TMA on Hopper: one instruction moves a whole tile, out-of-bounds rows
  and columns read as zero). Triton's persistent-matmul tutorial measures this near cuBLAS on an H100. Used where
  `tma_ready` says the operands allow it; the dispatch (kernels.swiglu_ffn, kernels.linear) keeps the portable
  schedule until the H200 benchmark (`bench kernels --suite ffn`, its persistent rows) shows which one wins.
The epilogue is one function for both (`_store_tile`).
"""

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .hardware import dot_precision, fitting_stages, hopper, launch_flags, sm_count, wait_for_inputs

try:  # host-side tensor descriptors (triton >= 3.3; the H200 image has 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the portable schedule only
    TensorDescriptor = None


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can describe these 2-D operands: an NVIDIA Hopper-or-newer GPU (or CPU tensors
    where launches take them: the interpreter emulates descriptors, compile-only mode compiles them), non-empty,
    rows contiguous, and base address and row stride 16-byte aligned (TMA's rule)."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if not hopper(t.device):
            return False
        if t.dim() != 2 or t.numel() == 0 or t.stride(1) != 1:
            return False
        if (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def descriptor(t: torch.Tensor, rows: int, cols: int):
    """A tensor descriptor of 2-D `t` that loads [rows, cols] tiles."""
    return TensorDescriptor.from_tensor(t, [rows, cols])


# Split-K's arrival counters (`arrived_last`), one int32 an output tile, per device: zeroed once, and every launch
# leaves the ones it used at zero (the last split of a tile resets its counter), so a CUDA graph replays with no
# memset. A launch splits only while its tiles cover the SMs less than twice (matmul_triton): 2 · SMs of them serve
# every launch. The launches on a device share them: kernels on one stream run one after another (under
# programmatic dependent launch too: each waits for the one before to complete); GEMMs on two streams at once would
# each need their own.
_arrival_counters: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n of the device's split-K counters, all zero between launches. A launch that needs more (CPU tensors
    sized for another compile target) gets a new set; earlier sets are kept, as a captured CUDA graph may hold them.
    Made outside a CUDA-graph capture: a set made inside one would stay unzeroed until the graph first replays."""
    made = _arrival_counters.setdefault(device, [])
    if not made or made[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "matmul_triton: a split-K GEMM's first launch on this device is inside a CUDA-graph capture; "
                "launch it once before capturing (its arrival counters are made and zeroed then)"
            )
        made.append(torch.zeros(max(n, 2 * sm_count(device)), dtype=torch.int32, device=device))
    return made[-1]


@triton.jit
def arrived_last(counter_ptr, n_arrivals):
    """Whether this program is the last of the `n_arrivals` that each call this once on the int32 counter at
    counter_ptr (0 before the first); the last resets it to 0 for the next launch. Every program's stores before
    the call are visible to the last one's loads after it, made through L2 (`cache_modifier=".cg"`): a barrier,
    then one acquire-release atomic a program at GPU scope (CUTLASS's semaphore pattern; Triton has one thread
    do a scalar atomic and hands its result to the others through shared memory, behind another barrier). No
    program waits for another, so any schedule completes."""
    tl.debug_barrier()  # every thread's stores issued before the thread that counts says so
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == n_arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_partials(partial_ptrs, split_stride, n_splits, mask):
    """The fp32 tile summed over the n_splits partial tiles at partial_ptrs + s · split_stride, in split order
    (whichever split sums: the same bits every time), read through L2 as `arrived_last` requires."""
    acc = tl.load(partial_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, n_splits):
        acc += tl.load(partial_ptrs + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _store_tile(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    split,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    stride_rm,
    stride_om,
    tile,
    n_splits,
    partial_ptr,
    counter_ptr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """The GEMM's epilogue: the fp32 tile acc [BLOCK_M, BLOCK_N] scaled (FP8), plus bias and residual, stored to
    out [M, N]. Split over K, the tile is split `split`'s fp32 partial (partial [n_splits, M, N], contiguous), and
    the split that finishes output tile `tile` last (`arrived_last`) stores their sum."""
    mask_m, mask_n = offs_m < M, offs_n < N
    if SCALED:  # linear in the partial sums, so each split scales its own
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * a_scale[:, None] * w_scale[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    finish = True  # unsplit: this program finishes its tile
    if SPLIT_K:
        partial_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]  # split 0's tile
        tl.store(partial_ptrs + split.to(tl.int64) * M * N, acc, mask=mask)
        finish = arrived_last(counter_ptr + tile, n_splits)
        if finish:
            acc = sum_partials(partial_ptrs, M * N, n_splits, mask)
    if finish:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time: the programs running together walk
    the same weight columns, so each weight tile is read from memory once and from L2 after."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * tiles_n)) % group_size, (pid % (GROUP_M * tiles_n)) // group_size


@triton.jit
def _matmul_kernel(
    a_ptr,
    w_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_per_split,
    n_splits,
    stride_am,
    stride_wn,
    stride_rm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """out = a · Wᵀ, scaled, plus bias and residual; program (tile, split) takes the split's share of K."""
    wait_for_inputs(PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None]  # (BLOCK_K, BLOCK_N): Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE_ACC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_tile(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        split,
        a_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        residual_ptr,
        out_ptr,
        stride_rm,
        stride_om,
        tl.program_id(0),
        n_splits,
        partial_ptr,
        counter_ptr,
        SCALED,
        HAS_BIAS,
        HAS_RESIDUAL,
        SPLIT_K,
    )


@triton.jit(do_not_specialize=["n_programs"])
def _persistent_matmul_kernel(
    a_desc,
    w_desc,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_per_split,
    n_splits,
    n_programs,
    stride_rm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """_matmul_kernel's tiles on the persistent schedule: program p takes work items p, p + n_programs, ...; item
    i is output tile i % tiles (grouped order) of split i // tiles. A split's K range is whole BLOCK_K tiles, so a
    tile load never reaches into the next split's range (past K the descriptor reads zeros)."""
    wait_for_inputs(PDL)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for item in tl.range(tl.program_id(0), tiles * n_splits, n_programs):
        pid_m, pid_n = grouped_tile(item % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        split = item // tiles
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])  # (BLOCK_M, BLOCK_K)
            w = w_desc.load([pid_n * BLOCK_N, k0])  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE_ACC)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        _store_tile(
            acc,
            offs_m,
            offs_n,
            M,
            N,
            split,
            a_scale_ptr,
            w_scale_ptr,
            bias_ptr,
            residual_ptr,
            out_ptr,
            stride_rm,
            stride_om,
            item % tiles,
            n_splits,
            partial_ptr,
            counter_ptr,
            SCALED,
            HAS_BIAS,
            HAS_RESIDUAL,
            SPLIT_K,
        )


@dataclass(frozen=True)
class GemmTiling:
    """How a GEMM launch is cut: its output tile (block_m × block_n), the K tile, warps, software-pipeline stages
    and the rows of tiles walked together (GROUP_M, for L2 reuse of the weight tiles). `gemm_blocks` picks one per
    M range; benchmarks/tune_gemm.py sweeps the alternatives on a GPU."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Up to this many rows a GEMM is a decode step's: 16-row tiles (the smallest tl.dot takes) streaming the weights.
# The tilings per M range (gemm_blocks), the sweep's candidates (benchmarks/tune_gemm.py) and the measured tables'
# regimes (kernels/ffn_tilings.py) split here.
DECODE_ROWS = 16


def gemm_blocks(m: int, element_size: int = 2) -> GemmTiling:
    """The tiling of an M-row GEMM of operands of `element_size` bytes.

    Up to ~200 rows an H200 GEMM is bound by streaming the weights (REFERENCE.md): the smallest M tile
    tl.dot takes (16) and long K tiles keep many weight bytes in flight. Past that, square-ish tiles for reuse.
    FP8 operands take K tiles twice as long, the same bytes a stage as bf16's: with bf16's tiles the H200 streamed
    the 8B shape's FP8 FFN at 52 % of copy bandwidth at M = 1 where bf16 reached 79 % (2026-11-30, 3e791a3).
    """
    if m <= DECODE_ROWS:
        tiling = GemmTiling(16, 64, 128, 4, 4)
    elif m <= 64:
        tiling = GemmTiling(64, 64, 64, 4, 4)
    elif m <= 256:
        tiling = GemmTiling(64, 128, 64, 4, 3)
    else:
        tiling = GemmTiling(128, 128, 64, 8, 3)
    return replace(tiling, block_k=tiling.block_k * 2) if element_size == 1 else tiling


def split_k_plan(tiles: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split) of a GEMM with `tiles` output tiles over a reduction of k: split until the tiles cover
    the SMs twice, keeping >= 8 K tiles a split (a thin GEMM of few tiles would leave most SMs idle)."""
    k_tiles = triton.cdiv(k, block_k)
    splits = max(1, min(triton.cdiv(2 * sm_count(device), tiles), k_tiles // 8))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def persistent_programs(work: int, device: torch.device) -> int:
    """Programs of a persistent launch: one per SM, fewer when there is less work."""
    return max(1, min(work, sm_count(device)))


def matmul_triton(
    a: torch.Tensor,
    w: torch.Tensor,
    out_dtype: torch.dtype,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    persistent: bool = False,
    tiling: GemmTiling | None = None,
) -> torch.Tensor:
    """a [M, K] · w [N, K]ᵀ -> [M, N] in out_dtype. With a_scale [M] and w_scale [N] (fp32; a and w in FP8) the
    product is scaled per row and column; bias [N] and residual [M, N] are added last. Inputs contiguous.
    persistent: the persistent TMA schedule where `tma_ready` allows it (else the portable one).
    tiling: `gemm_blocks`' unless given (the tiling sweep)."""
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    tiling = tiling or gemm_blocks(m, a.element_size())
    block_m, block_n, block_k = tiling.block_m, tiling.block_n, tiling.block_k
    stages = fitting_stages(tiling.num_stages, (block_m + block_n) * block_k * a.element_size(), a.device)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, k_per_split = split_k_plan(tiles, k, block_k, a.device)
    split_k = splits > 1
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=a.device) if split_k else out
    scaled = a_scale is not None
    res = residual if residual is not None else out
    epilogue = (
        a_scale if scaled else out,
        w_scale if scaled else out,
        bias if bias is not None else out,
        res,
        out,
        partial,
        arrival_counters(a.device, tiles) if split_k else partial,
    )
    shapes = (m, n, k, k_per_split, splits)
    flags = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=tiling.group_m,
        SCALED=scaled,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        SPLIT_K=split_k,
        PRECISION=dot_precision(a.dtype),
        IMPRECISE_ACC=block_k if scaled else 0,  # FP8: promote to fp32 after each K tile (module doc)
        num_warps=tiling.num_warps,
        num_stages=stages,
        **launch_flags(a.device),
    )
    if persistent and tma_ready(a, w):
        programs = persistent_programs(tiles * splits, a.device)
        a_desc, w_desc = descriptor(a, block_m, block_k), descriptor(w, block_n, block_k)
        _persistent_matmul_kernel[(programs,)](a_desc, w_desc, *epilogue, *shapes, programs, res.stride(0), n, **flags)
    else:
        _matmul_kernel[(tiles, splits)](a, w, *epilogue, *shapes, a.stride(0), w.stride(0), res.stride(0), n, **flags)
    return out
