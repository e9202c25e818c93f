"""Rotary position embedding (Su et al. 2021) in the Hugging Face Llama layout (rotate-half, not interleaved).

The cos/sin tables, including Llama-3 frequency scaling, are built once by the runtime in fp32; this op only
rotates, in fp32, and casts back once. Kept apart from attention so prefill, decode and the search's block
timing share it. The runtime rotates q and k together (they sit side by side in the packed qkv output), so
x is usually a strided view: the kernel reads through x's strides and writes a contiguous result.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_heads,
    stride_xn,
    stride_xh,
    stride_cn,
    stride_on,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (offs < HALF)[None, :]
    cos = tl.load(cos_ptr + token * stride_cn + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + token * stride_cn + offs, mask=offs < HALF, other=0.0)[None, :]
    x_ptrs = x_ptr + token * stride_xn + heads[:, None] * stride_xh + offs[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + token * stride_on + heads[:, None] * stride_oh + offs[None, :]
    tl.store(o_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, D/2] (fp32) -> x rotated, in x's dtype (computed in fp32)."""
    n, n_heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != (n, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rope: x {tuple(x.shape)} needs cos/sin of shape ({n}, {head_dim // 2}), got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n:
        _rope_kernel[(n,)](
            x,
            cos,
            sin,
            out,
            n_heads,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            out.stride(0),
            out.stride(1),
            HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(n_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )
    return out


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, D/2] (fp32) -> x rotated, in x's dtype (computed in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (N, heads, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]
    # addcmul: 5 ops instead of 7 (the decode step is op-overhead bound on CPU).
    rotated = (torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin))
    return torch.cat(rotated, dim=-1).to(x.dtype)
