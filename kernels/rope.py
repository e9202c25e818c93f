"""Rotary position embedding (Su et al. 2021) in the Hugging Face Llama layout (rotate-half, not interleaved).

The cos/sin tables, including Llama-3 frequency scaling, are built once by the runtime in fp32; this op only
rotates, in fp32, and casts back once. Kept apart from attention so prefill, decode and the search's block
timing share it. The runtime rotates q and k together (they sit side by side in the packed qkv output), so
x is usually a strided view: the kernel reads through x's strides and writes a contiguous result.

An engine step with a KV cache also stores each token's rotated key and its value in the cache: `rope_and_cache`
does the rotation and both stores in the one kernel (three kernels before: RoPE and two index copies, each a
launch of a few microseconds on a few kilobytes at batch 1, 64 of them in a 32-layer decode step; TensorRT-LLM
and vLLM fuse the same way). Into an FP8 cache (pages in float8_e4m3fn) it stores key / k_scale and value / v_scale,
clamped to ±448 and rounded to E4M3 (kernels/fp8.py's `quantize_e4m3`, bit for bit as torch converts).
"""

import torch
import triton
import triton.language as tl

from .fp8 import FP8, bytes_view, check_kv_scales, quantize_e4m3, quantize_kv_reference
from .hardware import launch_flags, wait_for_inputs


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    k_scale_ptr,
    v_scale_ptr,
    n_heads,
    n_kv_heads,
    stride_xn,
    stride_xh,
    stride_cn,
    stride_on,
    stride_oh,
    stride_vn,
    stride_vh,
    stride_cs,
    stride_ch,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    CACHE: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token per program: its n_heads heads of x rotated into out; with CACHE, the last n_kv_heads of them
    (the keys) also rotated into the KV cache at the token's slot, and its values copied there (with FP8_CACHE
    divided by the layer's K and V scales and rounded to E4M3)."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    in_half = offs < HALF
    cos = tl.load(cos_ptr + token * stride_cn + offs, mask=in_half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + token * stride_cn + offs, mask=in_half, other=0.0)[None, :]
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & in_half[None, :]
    x_ptrs = x_ptr + token * stride_xn + heads[:, None] * stride_xh + offs[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + token * stride_on + heads[:, None] * stride_oh + offs[None, :]
    tl.store(o_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if CACHE:
        slot = tl.load(slots_ptr + token).to(tl.int64)
        kv = tl.arange(0, BLOCK_KV)
        mask = (kv < n_kv_heads)[:, None] & in_half[None, :]
        k_ptrs = x_ptr + token * stride_xn + (n_heads - n_kv_heads + kv)[:, None] * stride_xh + offs[None, :]
        k1 = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        # Keys are rounded to x's dtype first, as the reference stores the rotated keys it returns.
        k1, k2 = (k1 * cos - k2 * sin).to(out_ptr.dtype.element_ty), (k2 * cos + k1 * sin).to(out_ptr.dtype.element_ty)
        v_ptrs = v_ptr + token * stride_vn + kv[:, None] * stride_vh + offs[None, :]
        v1, v2 = tl.load(v_ptrs, mask=mask, other=0.0), tl.load(v_ptrs + HALF, mask=mask, other=0.0)
        if FP8_CACHE:
            k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
            k1, k2 = quantize_e4m3(k1, k_scale), quantize_e4m3(k2, k_scale)
            v1, v2 = quantize_e4m3(v1, v_scale), quantize_e4m3(v2, v_scale)
        c_ptrs = k_cache_ptr + slot * stride_cs + kv[:, None] * stride_ch + offs[None, :]
        tl.store(c_ptrs, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        c_ptrs = v_cache_ptr + slot * stride_cs + kv[:, None] * stride_ch + offs[None, :]
        tl.store(c_ptrs, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    n, _, head_dim = x.shape
    if head_dim % 2 or cos.shape != (n, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"RoPE: x {tuple(x.shape)} needs cos/sin of shape ({n}, {head_dim // 2}), got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )


def _launch(x, cos, sin, out, cache=None) -> None:
    """The kernel over x's tokens: every head rotated into out, and with cache = (v, k_slots, v_slots, slots,
    k_scale, v_scale) the last v.shape[1] heads (the keys) and the values into the cache (scales: None, or the
    FP8 cache's)."""
    n, n_heads, head_dim = x.shape
    v, k_slots, v_slots, slots, k_scale, v_scale = cache if cache is not None else (out,) * 4 + (None, None)
    fp8 = k_slots.dtype == FP8
    n_kv = v.shape[1] if cache is not None else 0
    if n:
        _rope_kernel[(n,)](
            x,
            cos,
            sin,
            out,
            v,
            k_slots,
            v_slots,
            slots,
            k_scale if fp8 else out,
            v_scale if fp8 else out,
            n_heads,
            n_kv,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            out.stride(0),
            out.stride(1),
            v.stride(0),
            v.stride(1),
            k_slots.stride(0),
            k_slots.stride(1),
            HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(n_heads),
            BLOCK_KV=triton.next_power_of_2(max(n_kv, 1)),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            CACHE=cache is not None,
            FP8_CACHE=fp8,
            **launch_flags(x.device),
        )


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, D/2] (fp32) -> x rotated, in x's dtype (computed in fp32)."""
    _check_tables(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, out)
    return out


def _check_cache(qk, v, k_slots, v_slots, slots, k_scale, v_scale) -> None:
    n, heads, head_dim = qk.shape
    n_kv = v.shape[1] if v.dim() == 3 else -1
    if v.shape != (n, n_kv, head_dim) or not 0 < n_kv < heads or slots.shape != (n,):
        raise ValueError(
            f"rope_and_cache: qk {tuple(qk.shape)} (queries, then keys), v {tuple(v.shape)} and slots "
            f"{tuple(slots.shape)} disagree"
        )
    if (
        k_slots.shape[1:] != (n_kv, head_dim)
        or v_slots.shape != k_slots.shape
        or k_slots.dtype != v_slots.dtype
        or qk.dtype != v.dtype
        or k_slots.dtype not in (qk.dtype, FP8)
    ):
        raise ValueError(
            f"rope_and_cache: cache slots {tuple(k_slots.shape)} {k_slots.dtype} / {v_slots.dtype} do not hold "
            f"keys and values of ({n_kv}, {head_dim}) {qk.dtype} / {v.dtype}"
        )
    if k_slots.stride() != v_slots.stride() or k_slots.stride(-1) != 1:
        raise ValueError(
            f"rope_and_cache: the K and V slots must share one layout with a contiguous head dimension, got strides "
            f"{k_slots.stride()} and {v_slots.stride()}"
        )
    check_kv_scales(k_slots, k_scale, v_scale, "rope_and_cache")


def rope_and_cache_triton(qk, v, cos, sin, k_slots, v_slots, slots, k_scale=None, v_scale=None) -> torch.Tensor:
    """See kernels.rope_and_cache."""
    _check_tables(qk, cos, sin)
    _check_cache(qk, v, k_slots, v_slots, slots, k_scale, v_scale)
    if qk.stride(-1) != 1:
        qk = qk.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slots.contiguous()
    out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    _launch(qk, cos, sin, out, (v, k_slots, v_slots, slots, k_scale, v_scale))
    return out


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, D/2] (fp32) -> x rotated, in x's dtype (computed in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (N, heads, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]
    # addcmul: 5 ops instead of 7 (the decode step is op-overhead bound on CPU).
    rotated = (torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin))
    return torch.cat(rotated, dim=-1).to(x.dtype)


def rope_and_cache_reference(qk, v, cos, sin, k_slots, v_slots, slots, k_scale=None, v_scale=None) -> torch.Tensor:
    """See kernels.rope_and_cache: the rotation, then the two stores. Unlike the kernel it takes any cache layout
    (index_copy_ does), so only the tables and the scales are checked: it runs for every layer of every CPU step."""
    _check_tables(qk, cos, sin)
    check_kv_scales(k_slots, k_scale, v_scale, "rope_and_cache")
    rotated = apply_rope_reference(qk, cos, sin)
    k = rotated[:, qk.shape[1] - v.shape[1] :]
    if k_slots.dtype == FP8:
        k, v = quantize_kv_reference(k, k_scale), quantize_kv_reference(v, v_scale)
    bytes_view(k_slots).index_copy_(0, slots, bytes_view(k))
    bytes_view(v_slots).index_copy_(0, slots, bytes_view(v))
    return rotated
