"""SwiGLU FFN (Shazeer 2020) over packed weights: out = W_down · (silu(W_gate·x) ⊙ W_up·x) [+ residual].

`w_gate_up` is cat(W_gate, W_up) along the output dimension ([2I, H]), packed once at load. The Triton path
is two GEMMs:
1. gate/up: each program computes a gate tile and the matching up tile with two fp32 accumulators that share
   one activation tile, and applies silu(gate)·up in the epilogue, so the [M, 2I] pre-activation never goes
   to memory (Megatron-LM reports +14.8 % decode throughput for this fusion); split over K, as the down GEMM,
   where its tiles cannot cover the SMs twice (a pruned child's narrow FFN at decode);
2. down: [M, I] × W_downᵀ, with the residual add in the epilogue: kernels/gemm.py's GEMM (split-K at small M).
An FFN-Fusion group is this same op with the branches' weights concatenated along I, so widths reach
~400,000 (Ultra-253B): every weight offset is computed in int64 (400k rows × 16k columns overflows int32).
With FP8 weights (kernels/fp8.py) x is quantized per token before the first GEMM and h before the second; each
GEMM multiplies FP8 tiles on the tensor cores and applies the token and channel scales in its epilogue.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import cpu_layout
from .fp8 import (
    Fp8Rows,
    check_fp8_rows,
    linear_fp8_reference,
    linear_fp8_scaled_mm,
    quantize_rows_triton,
    quantized_rows,
)
from .gemm import (
    GemmTiling,
    arrival_counters,
    arrived_last,
    descriptor,
    gemm_blocks,
    grouped_tile,
    matmul_triton,
    persistent_programs,
    split_k_plan,
    sum_partials,
    tma_ready,
)
from .hardware import dot_precision, fitting_stages, launch_flags, sm_count, wait_for_inputs

# Rows up to which the automatic dispatch (kernels.swiglu_ffn) runs these kernels; past it, cuBLAS. On the H200
# (benchmarks/results/nvidia-h200_kernels_ffn.md) they beat cuBLAS eager at 1 and 16 rows (1.02-1.09x, 83-107 % of
# copy bandwidth) and lose from 128 rows up (0.75-0.86x): the served path takes the faster one until they win.
TRITON_MAX_ROWS = 16


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    x_scale_ptr,
    w_scale_ptr,
    h_ptr,
    partial_ptr,
    counter_ptr,
    M,
    I,
    K,
    k_per_split,
    n_splits,
    up_offset,
    stride_xm,
    stride_wn,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (tile, split) takes the split's share of K for a gate tile and its up tile. Split, each program
    stores its two fp32 partial tiles (partial [n_splits, 2, M, I]) and the split that finishes the tile last
    (gemm.arrived_last) sums them in split order and applies the epilogue, as the down GEMM does."""
    wait_for_inputs(PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, I, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < I
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
    # (BLOCK_K, BLOCK_N): W_gate rows, transposed; W_up rows sit I rows below (I · stride, int64 when large)
    gate_ptrs = w_ptr + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None]
    up_ptrs = gate_ptrs + up_offset
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE_ACC)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION, max_num_imprecise_acc=IMPRECISE_ACC)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    finish = True  # unsplit: this program finishes its tile
    if SPLIT_K:
        mask = mask_m[:, None] & mask_n[None, :]
        gate_partials = partial_ptr + offs_m[:, None] * I + offs_n[None, :]  # split 0's gate tile; up M · I on
        tl.store(gate_partials + split.to(tl.int64) * 2 * M * I, acc_gate, mask=mask)
        tl.store(gate_partials + split.to(tl.int64) * 2 * M * I + M * I, acc_up, mask=mask)
        finish = arrived_last(counter_ptr + tl.program_id(0), n_splits)
        if finish:
            acc_gate = sum_partials(gate_partials, 2 * M * I, n_splits, mask)
            acc_up = sum_partials(gate_partials + M * I, 2 * M * I, n_splits, mask)
    if finish:
        _store_swiglu(acc_gate, acc_up, offs_m, offs_n, M, I, x_scale_ptr, w_scale_ptr, h_ptr, stride_hm, SCALED)


@triton.jit
def _store_swiglu(
    acc_gate, acc_up, offs_m, offs_n, M, I, x_scale_ptr, w_scale_ptr, h_ptr, stride_hm, SCALED: tl.constexpr
):
    """The gate/up epilogue: (FP8) the token and channel scales, then silu(gate)·up stored to h [M, I]."""
    mask_m, mask_n = offs_m < M, offs_n < I
    if SCALED:  # FP8 operands: token scales on the rows, gate's and up's channel scales on the columns
        x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        acc_gate = acc_gate * x_scale * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        acc_up = acc_up * x_scale * tl.load(w_scale_ptr + I + offs_n, mask=mask_n, other=0.0)[None, :]
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["n_programs"])
def _persistent_gate_up_kernel(
    x_desc,
    w_desc,
    x_scale_ptr,
    w_scale_ptr,
    h_ptr,
    M,
    I,
    K,
    n_programs,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALED: tl.constexpr,
    PRECISION: tl.constexpr,
    IMPRECISE_ACC: tl.constexpr,
    PDL: tl.constexpr,
):
    """_gate_up_kernel's tiles on the persistent schedule (kernels/gemm.py), operands through tensor descriptors:
    the gate tile at rows n of w_gate_up, the up tile at rows I + n. A gate tile reaching past row I reads up rows
    into columns the store masks off; the up tile past 2I reads zeros."""
    wait_for_inputs(PDL)
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(I, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, n_programs):
        pid_m, pid_n = grouped_tile(tile, M, I, BLOCK_M, BLOCK_N, GROUP_M)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            acc_gate = tl.dot(
                x,
                tl.trans(w_desc.load([pid_n * BLOCK_N, k0])),
                acc_gate,
                input_precision=PRECISION,
                max_num_imprecise_acc=IMPRECISE_ACC,
            )
            acc_up = tl.dot(
                x,
                tl.trans(w_desc.load([I + pid_n * BLOCK_N, k0])),
                acc_up,
                input_precision=PRECISION,
                max_num_imprecise_acc=IMPRECISE_ACC,
            )
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        _store_swiglu(acc_gate, acc_up, offs_m, offs_n, M, I, x_scale_ptr, w_scale_ptr, h_ptr, stride_hm, SCALED)


def gate_up_blocks(m: int, element_size: int = 2) -> GemmTiling:
    """The gate/up GEMM's tiling for m rows of operands of `element_size` bytes: gemm_blocks', BLOCK_N capped at 64
    (two fp32 accumulators at 128 would take 128 registers a thread by themselves). Its BLOCK_N columns are of the
    gate and of the up projection each: a program computes a tile of 2 · BLOCK_N pre-activation columns."""
    tiling = gemm_blocks(m, element_size)
    return replace(tiling, block_n=min(tiling.block_n, 64))


def gate_up_split_plan(
    m: int, hidden: int, inter: int, device: torch.device, tiling: GemmTiling | None = None, element_size: int = 2
) -> tuple[int, int]:
    """(splits, K per split) of the portable gate/up GEMM (with `tiling`, gate_up_blocks' unless given):
    gemm.split_k_plan over its tiles where they cover fewer than half the SMs, else unsplit. On the H200 at M = 1
    (2026-11-30, 3e791a3) the split gate/up lost to the unsplit one at 224 tiles by 3-4 % (the 8B shape,
    Nemotron-51B's half width) and at 112 tiles by 10 % (its quarter width); a narrow child's FFN (Nemotron's 2,816
    columns: 44 tiles) still splits."""
    tiling = tiling or gate_up_blocks(m, element_size)
    tiles = triton.cdiv(m, tiling.block_m) * triton.cdiv(inter, tiling.block_n)
    if 2 * tiles >= sm_count(device):
        return 1, hidden
    return split_k_plan(tiles, hidden, tiling.block_k, device)


def _check_shapes(
    x: torch.Tensor | Fp8Rows,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None,
    gate_up_scale: torch.Tensor | None,
    down_scale: torch.Tensor | None,
) -> None:
    m, hidden = x.shape
    inter = w_down.shape[1]
    if w_gate_up.shape != (2 * inter, hidden) or w_down.shape != (hidden, inter):
        raise ValueError(
            f"swiglu_ffn: for x {tuple(x.shape)} expected w_gate_up (2I, {hidden}) and w_down ({hidden}, I), "
            f"got {tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    if residual is not None and residual.shape != (m, hidden):
        raise ValueError(f"swiglu_ffn: residual must have shape {(m, hidden)}, got {tuple(residual.shape)}")
    check_fp8_rows(x, gate_up_scale, "swiglu_ffn")
    if gate_up_scale is None:
        if not x.dtype == w_gate_up.dtype == w_down.dtype:
            raise ValueError(f"swiglu_ffn: x {x.dtype}, w_gate_up {w_gate_up.dtype} and w_down {w_down.dtype} differ")
    elif gate_up_scale.shape != (2 * inter,) or down_scale is None or down_scale.shape != (hidden,):
        raise ValueError(
            f"swiglu_ffn: FP8 weights need scales ({2 * inter},) and ({hidden},), got "
            f"{tuple(gate_up_scale.shape)} and {None if down_scale is None else tuple(down_scale.shape)}"
        )


def swiglu_ffn_triton(
    x: torch.Tensor | Fp8Rows,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    persistent: bool = False,
    split_k: bool = True,
    gate_up_tiling: GemmTiling | None = None,
    down_tiling: GemmTiling | None = None,
) -> torch.Tensor:
    """x [M, H], w_gate_up [2I, H], w_down [H, I], residual [M, H] or None -> [M, H] (+ residual). With FP8
    weights, their per-output-channel scales gate_up_scale [2I] and down_scale [H] (kernels/fp8.py), and x as
    given or already quantized (Fp8Rows).
    persistent: both GEMMs on the persistent TMA schedule where the operands allow it (kernels/gemm.py).
    split_k: the portable gate/up GEMM splits K as gate_up_split_plan says (False: never; the benchmark compares
    the two).
    gate_up_tiling, down_tiling: the two GEMMs' tilings, gate_up_blocks' and gemm_blocks' unless given (the
    tiling sweep, benchmarks/tune_gemm.py)."""
    _check_shapes(x, w_gate_up, w_down, residual, gate_up_scale, down_scale)
    m, hidden = x.shape
    inter = w_down.shape[1]
    x = x if isinstance(x, Fp8Rows) else x.contiguous()  # Fp8Rows' codes are made contiguous
    w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
    residual = residual.contiguous() if residual is not None else None
    if m == 0:
        return torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    scaled = gate_up_scale is not None
    a, a_scale = quantized_rows(x, triton_kernel=True) if scaled else (x, None)
    tiling = gate_up_tiling or gate_up_blocks(m, a.element_size())
    block_m, gate_block_n, block_k = tiling.block_m, tiling.block_n, tiling.block_k
    tiles = triton.cdiv(m, block_m) * triton.cdiv(inter, gate_block_n)
    h = torch.empty(m, inter, dtype=x.dtype, device=x.device)  # silu(gate)·up, the only intermediate
    stages = fitting_stages(tiling.num_stages, (block_m + 2 * gate_block_n) * block_k * a.element_size(), x.device)
    scales = (a_scale, gate_up_scale) if scaled else (h, h)  # unread without SCALED
    flags = dict(
        BLOCK_M=block_m,
        BLOCK_N=gate_block_n,
        BLOCK_K=block_k,
        GROUP_M=tiling.group_m,
        SCALED=scaled,
        PRECISION=dot_precision(a.dtype),
        IMPRECISE_ACC=block_k if scaled else 0,  # FP8: promote to fp32 after each K tile (kernels/gemm.py)
        num_warps=tiling.num_warps,
        num_stages=stages,
        **launch_flags(x.device),
    )
    if persistent and tma_ready(a, w_gate_up):
        programs = persistent_programs(tiles, x.device)
        descs = descriptor(a, block_m, block_k), descriptor(w_gate_up, gate_block_n, block_k)
        if a.element_size() == 4:  # fp32 (the tests): 72 KiB of x, gate and up tiles a stage, plus ~32 KiB of
            # scratch fitting_stages does not model (compiled for sm_90: 2 stages took 104 KiB); 2 stay far inside
            flags["num_stages"] = min(stages, 2)
        _persistent_gate_up_kernel[(programs,)](*descs, *scales, h, m, inter, hidden, programs, h.stride(0), **flags)
    else:
        # Split over K like the down GEMM: a narrow FFN at decode (a pruned child's, Nemotron's 2,816-wide ones:
        # 44 tiles) would otherwise leave most SMs idle.
        splits, k_per_split = gate_up_split_plan(m, hidden, inter, x.device, tiling) if split_k else (1, hidden)
        partial = torch.empty(splits, 2, m, inter, dtype=torch.float32, device=x.device) if splits > 1 else h
        counters = arrival_counters(x.device, tiles) if splits > 1 else h
        shapes = m, inter, hidden, k_per_split, splits, inter * w_gate_up.stride(0)
        strides = a.stride(0), w_gate_up.stride(0), h.stride(0)
        _gate_up_kernel[(tiles, splits)](
            a, w_gate_up, *scales, h, partial, counters, *shapes, *strides, SPLIT_K=splits > 1, **flags
        )
    h, h_scale = quantize_rows_triton(h) if scaled else (h, None)
    return matmul_triton(
        h, w_down, x.dtype, h_scale, down_scale, residual=residual, persistent=persistent, tiling=down_tiling
    )


def swiglu_ffn_reference(
    x: torch.Tensor | Fp8Rows,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, H], w_gate_up [2I, H], w_down [H, I], residual [M, H] or None -> [M, H] (+ residual). With FP8
    weights and their scales: both GEMMs as kernels/fp8.py's reference, silu(gate)·up in fp32, rounded to x's
    dtype before it is quantized (as the Triton path stores it)."""
    if gate_up_scale is not None:
        fp32 = torch.float32
        return _swiglu_ffn_fp8(x, w_gate_up, w_down, residual, gate_up_scale, down_scale, linear_fp8_reference, fp32)
    gate, up = cpu_layout.linear(x, w_gate_up).chunk(2, dim=-1)  # (M, I) each (F.linear, or a packed twin)
    out = cpu_layout.linear(F.silu(gate) * up, w_down)
    return out if residual is None else residual + out


def swiglu_ffn_fp8_scaled_mm(
    x: torch.Tensor | Fp8Rows,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None,
    gate_up_scale: torch.Tensor,
    down_scale: torch.Tensor,
) -> torch.Tensor:
    """The FP8 FFN on `torch._scaled_mm` (cuBLASLt): the served path past TRITON_MAX_ROWS rows on CUDA."""
    _check_shapes(x, w_gate_up, w_down, residual, gate_up_scale, down_scale)
    # Row-wise scaled cuBLASLt writes bf16 only: gate and up are rounded to it before silu(gate)·up.
    return _swiglu_ffn_fp8(x, w_gate_up, w_down, residual, gate_up_scale, down_scale, linear_fp8_scaled_mm, x.dtype)


def _swiglu_ffn_fp8(x, w_gate_up, w_down, residual, gate_up_scale, down_scale, linear, gate_dtype) -> torch.Tensor:
    gate, up = linear(x, w_gate_up, gate_up_scale, out_dtype=gate_dtype).chunk(2, dim=-1)
    h = (F.silu(gate) * up).to(x.dtype)
    return linear(h, w_down, down_scale, residual=residual)
