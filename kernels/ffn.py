"""SwiGLU FFN (Shazeer 2020) over packed weights: out = W_down · (silu(W_gate·x) ⊙ W_up·x) [+ residual].

`w_gate_up` is cat(W_gate, W_up) along the output dimension ([2I, H]), packed once at load. The Triton path
is two GEMMs:
1. gate/up: each program computes a gate tile and the matching up tile with two fp32 accumulators that share
   one activation tile, and applies silu(gate)·up in the epilogue, so the [M, 2I] pre-activation never goes
   to memory (Megatron-LM reports +14.8 % decode throughput for this fusion);
2. down: [M, I] × W_downᵀ, with the residual add in the epilogue. When M is small the output has too few
   tiles to fill the GPU, so the reduction over I is split (split-K) and a small kernel sums the fp32
   partials, adds the residual and casts.
An FFN-Fusion group is this same op with the branches' weights concatenated along I, so widths reach
~400,000 (Ultra-253B): every weight offset is computed in int64 (400k rows × 16k columns overflows int32).
Block shapes are fixed per M range, not autotuned: autotuning is slow, uncached, and must not run inside a
CUDA-graph capture (REFERENCE.md).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .hardware import dot_precision, sm_count

# Rows up to which the automatic dispatch (kernels.swiglu_ffn) runs these kernels; past it, cuBLAS. On the H200
# (benchmarks/results/nvidia-h200_kernels_ffn.md) they beat cuBLAS eager at 1 and 16 rows (1.02-1.09x, 83-107 % of
# copy bandwidth) and lose from 128 rows up (0.75-0.86x): the served path takes the faster one until they win.
TRITON_MAX_ROWS = 16


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time: the programs running together walk
    the same weight columns, so each weight tile is read from memory once and from L2 after."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * tiles_n)) % group_size, (pid % (GROUP_M * tiles_n)) // group_size


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    M,
    I,
    K,
    up_offset,
    stride_xm,
    stride_wn,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, I, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < I
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    gate_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W_gate rows, transposed
    up_ptrs = gate_ptrs + up_offset  # W_up rows sit I rows below (I · stride, int64 when large)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    h_ptr,
    w_ptr,
    residual_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_hm,
    stride_wn,
    stride_rm,
    stride_om,
    stride_os,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[split] = h[:, split's K range] · W_down[:, same]ᵀ (+ residual when unsplit)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + (k_start + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None]  # (BLOCK_K, BLOCK_N): W_downᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
    out_ptrs = out_ptr + split.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,
    residual_ptr,
    out_ptr,
    numel,
    n_splits,
    stride_split,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = Σ_splits partial (+ residual), over flat contiguous [M·N] views."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(partial_ptr + s * stride_split + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_blocks(m: int) -> tuple[int, int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages for an M-row GEMM.

    Up to ~200 rows an H200 GEMM is bound by streaming the weights (REFERENCE.md): the smallest M tile
    tl.dot takes (16) and long K tiles keep many weight bytes in flight. Past that, square-ish tiles for reuse.
    """
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 64:
        return 64, 64, 64, 4, 4
    if m <= 256:
        return 64, 128, 64, 4, 3
    return 128, 128, 64, 8, 3


def swiglu_ffn_triton(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, H], w_gate_up [2I, H], w_down [H, I], residual [M, H] or None -> [M, H] (+ residual)."""
    m, hidden = x.shape
    inter = w_down.shape[1]
    if w_gate_up.shape != (2 * inter, hidden) or w_down.shape != (hidden, inter):
        raise ValueError(
            f"swiglu_ffn: for x {tuple(x.shape)} expected w_gate_up (2I, {hidden}) and w_down ({hidden}, I), "
            f"got {tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    if residual is not None and residual.shape != (m, hidden):
        raise ValueError(f"swiglu_ffn: residual must have shape {(m, hidden)}, got {tuple(residual.shape)}")
    if not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise ValueError(f"swiglu_ffn: x {x.dtype}, w_gate_up {w_gate_up.dtype} and w_down {w_down.dtype} differ")
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = _gemm_blocks(m)
    precision = dot_precision(x.dtype)
    h = torch.empty(m, inter, dtype=x.dtype, device=x.device)  # silu(gate)·up, the only intermediate
    # Two fp32 accumulators: at BLOCK_N 128 they alone would take 128 registers per thread; cap it at 64.
    gate_block_n = min(block_n, 64)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(inter, gate_block_n),)
    _gate_up_kernel[grid](
        x,
        w_gate_up,
        h,
        m,
        inter,
        hidden,
        inter * w_gate_up.stride(0),
        x.stride(0),
        w_gate_up.stride(0),
        h.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=gate_block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        PRECISION=precision,
        num_warps=warps,
        num_stages=stages,
    )

    # Split the reduction over I until the output tiles cover the SMs twice, keeping >= 8 K tiles per split.
    tiles = triton.cdiv(m, block_m) * triton.cdiv(hidden, block_n)
    k_tiles = triton.cdiv(inter, block_k)
    splits = max(1, min(triton.cdiv(2 * sm_count(x.device), tiles), k_tiles // 8))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(inter, k_per_split)
    target = out if splits == 1 else torch.empty(splits, m, hidden, dtype=torch.float32, device=x.device)
    res = residual if residual is not None else out
    _down_kernel[(tiles, splits)](
        h,
        w_down,
        res,
        target,
        m,
        hidden,
        inter,
        k_per_split,
        h.stride(0),
        w_down.stride(0),
        res.stride(0),
        hidden,
        m * hidden,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        HAS_RESIDUAL=residual is not None and splits == 1,
        PRECISION=precision,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * hidden, block),)](
            target,
            res,
            out,
            m * hidden,
            splits,
            m * hidden,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
        )
    return out


def swiglu_ffn_reference(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, H], w_gate_up [2I, H], w_down [H, I], residual [M, H] or None -> [M, H] (+ residual)."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # (M, I) each
    out = F.linear(F.silu(gate) * up, w_down)
    return out if residual is None else residual + out
