"""RMSNorm (Zhang & Sennrich 2019) with the Hugging Face Llama cast order, optionally fused with the residual add.

Reduction in fp32, normalised activations cast back to the input dtype, then multiplied by the weight:
bf16 reductions drift badly over 60+ layers. With a residual the op is what a decoder layer does between its
sublayers: s = x + residual (rounded to the activation dtype, as Hugging Face adds), then RMSNorm(s), and
s is returned too as the new residual stream. Fused, that is one read of x and the residual and two writes,
instead of the three passes (add, norm, scale) of torch eager.

Before an FP8 GEMM (`quantize=True`) the kernel also quantizes the normed row per token, as kernels/fp8.py's
quantize_rows does to the normed output (the same codes and scale, bit for bit): the row is already in its
registers, so the GEMM's input costs no launch of its own (two fewer per layer of an FP8 decode step).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fp8 import FP8, MIN_SCALE, Fp8Rows, quantize_e4m3, quantize_rows_reference, row_scale
from .hardware import launch_flags, wait_for_inputs

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    n_cols,
    eps,
    scale_ptr,
    HAS_RESIDUAL: tl.constexpr,
    QUANTIZE: tl.constexpr,
    NORMED_DTYPE: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    act_dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the activation dtype before the norm sees it, exactly as `h = h + attn(...)` would be.
        summed = (x + res).to(act_dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * rstd).to(act_dtype).to(tl.float32)  # HF: cast back to the input dtype, then scale
    if QUANTIZE:  # out holds the E4M3 codes of the normed row (as rounded to NORMED_DTYPE), scale_ptr its scale
        y = (normed * weight).to(NORMED_DTYPE).to(tl.float32)
        scale = row_scale(tl.abs(y), MIN_SCALE=MIN_SCALE)  # padding columns hold 0
        tl.store(scale_ptr + row, scale)
        tl.store(out_ptr + row * stride_out + cols, quantize_e4m3(y, scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + row * stride_out + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, quantize: bool = False
) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """x [..., H], weight [H], residual like x or None -> normed [..., H] (and the new residual x + residual).
    quantize: the normed rows as Fp8Rows [M, H] (x 2-D) for an FP8 GEMM."""
    hidden = x.shape[-1]
    if quantize and x.dim() != 2:
        raise ValueError(f"rms_norm: quantize=True takes x [M, H], got {tuple(x.shape)}")
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=FP8 if quantize else out_dtype, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device) if quantize else out  # unread: not QUANTIZE
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()
        res_out = torch.empty_like(x2)
    else:
        res2 = res_out = x2  # unused: HAS_RESIDUAL is False
    block = triton.next_power_of_2(hidden)
    # One row per program; 16-byte loads want BLOCK / (32·warps) >= 4-8 elements per thread.
    num_warps = min(max(block // 512, 1), 16)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            res2,
            weight,
            out,
            res_out,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            res_out.stride(0),
            hidden,
            eps,
            scale,
            HAS_RESIDUAL=residual is not None,
            QUANTIZE=quantize,
            NORMED_DTYPE=_TL_DTYPES[out_dtype],
            MIN_SCALE=MIN_SCALE,
            BLOCK=block,
            num_warps=num_warps,
            **launch_flags(x.device),
        )
    out = Fp8Rows(out, scale, out_dtype) if quantize else out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, quantize: bool = False
) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """x [..., H], weight [H], residual like x or None -> normed [..., H] in x's dtype (and x + residual).
    quantize: the normed rows quantized per token (kernels/fp8.py's reference), as Fp8Rows."""
    if residual is not None:
        x = x + residual
        return rms_norm_reference(x, weight, eps, quantize=quantize), x
    if quantize:
        normed = rms_norm_reference(x, weight, eps)
        return Fp8Rows(*quantize_rows_reference(normed), normed.dtype)
    # F.rms_norm computes x * rsqrt(mean(x²) + eps) in one op. In fp32 the weight can go in too (same
    # arithmetic); otherwise HF's order: normalise the fp32 copy, cast back, then scale.
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
