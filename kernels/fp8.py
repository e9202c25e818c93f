"""FP8 (E4M3) weights with per-output-channel scales, activations quantized per token on the fly.

The scheme is vLLM's and llm-compressor's "FP8 dynamic" (compressed-tensors, `strategy: channel` weights,
`strategy: token` dynamic activations), the layout a tessera FP8 checkpoint is saved in (runtime/loader.py):
- a weight W [N, K] is stored as Wq = W / s_w in float8_e4m3fn with s_w[n] = max_k |W[n, k]| / 448;
- an activation x [M, K] is quantized at each GEMM: s_x[m] = max_k |x[m, k]| / 448, xq = x / s_x;
- x · Wᵀ ≈ (xq · Wqᵀ) · s_x[m] · s_w[n]: the FP8 products are exact in the fp32 accumulator, only the two
  roundings to E4M3 (3 mantissa bits) lose anything.
The GEMM itself is kernels/gemm.py's (the scales in its epilogue) or, past TRITON_MAX_ROWS rows on CUDA,
cuBLASLt through `torch._scaled_mm` with the same row and column scales.

The reference below dequantizes and multiplies in fp32: the CPU path and the tests' ground truth.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemm import matmul_triton
from .hardware import launch_flags, wait_for_inputs

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite E4M3 value
# The smallest scale (vLLM's): a row of zeros quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


@dataclass(frozen=True)
class Fp8Rows:
    """Activations [M, K] already quantized per token: codes [M, K] float8_e4m3fn, scale [M] fp32, and the dtype
    they stand for (the GEMM's output dtype). What `kernels.rms_norm(..., quantize=True)` gives the next FP8 GEMM,
    so that the norm's kernel quantizes the row it already holds instead of a launch of its own."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def check_fp8_rows(x: torch.Tensor | Fp8Rows, scale: torch.Tensor | None, op: str) -> None:
    """Quantized activations go only into a GEMM with FP8 weights (their scales given)."""
    if isinstance(x, Fp8Rows) and scale is None:
        raise ValueError(f"{op}: quantized activations (Fp8Rows) need FP8 weights with their scales")


def quantized_rows(x: torch.Tensor | Fp8Rows, triton_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of activations x [M, K]: as given when already quantized, else quantized per token here
    (by the Triton kernel or the reference: the same codes)."""
    if isinstance(x, Fp8Rows):
        return x.codes, x.scale
    return quantize_rows_triton(x) if triton_kernel else quantize_rows_reference(x)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (Wq [N, K] float8_e4m3fn, s_w [N] fp32), one scale per output channel (row). Floored at fp32's
    smallest normal only (a row of zeros), not at MIN_SCALE: a row of tiny weights still spans the E4M3 range."""
    return _quantize_rows(w, torch.finfo(torch.float32).tiny)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Wq [N, K], s_w [N] -> W [N, K] in dtype."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, s_x [M] fp32), one scale per row (token). A row holding NaN or
    inf gets a NaN scale, so the NaN reaches that row's GEMM output (the engine then fails that request alone)."""
    return _quantize_rows(x, MIN_SCALE)


def _quantize_rows(x: torch.Tensor, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    # Divided by a tensor on x's device (filled there: no host copy, so CUDA-graph capturable): CUDA divides by a
    # Python number as a product with its reciprocal, one bit off the true quotient for some amax; the Triton
    # kernels' division is the true one, and so is the CPU's.
    scale = xf.abs().amax(dim=1).div(xf.new_full((), FP8_MAX)).clamp_min(min_scale)
    scale = scale.masked_fill(scale.isinf(), float("nan"))  # an infinite row: NaN, as a NaN row's
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest E4M3 value, ties to even, still in fp32. The GPU's conversion
    rounds the same way; doing it here first makes the conversion exact, which the Triton CPU interpreter (the
    tests' GPU stand-in) otherwise gets wrong where rounding carries into the exponent (31.4 became 16, not 32)."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal numbers: keep 3 of fp32's 23 mantissa bits, rounding the 20 dropped ones to nearest even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Below E4M3's smallest normal (2^-6) the spacing is fixed at 2^-9: round |v|·512 to an integer, ties to even
    # (adding and removing 1.5·2^23 leaves the fp32 sum no fraction bits), then give back v's sign (-0 included).
    subnormal = ((tl.abs(v) * 512.0 + 12582912.0) - 12582912.0) / 512.0
    subnormal = tl.where(bits < 0, -subnormal, subnormal)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


def quantize_kv_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """K or V values x (any shape) -> x / scale in float8_e4m3fn, clamped to ±448: the FP8 KV cache's stored form
    (one fp32 scale [1] per layer for its keys, one for its values, as vLLM's per-tensor KV scales)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 cache's values as they stand for: q · scale (in fp32), in dtype."""
    return (q.float() * scale).to(dtype)


def check_kv_scales(pages: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, what: str) -> None:
    """A cache in FP8 comes with its layer's fp32 K and V scales [1] on its device; any other cache with none."""
    if pages.dtype == FP8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None or s.shape != (1,) or s.dtype != torch.float32 or s.device != pages.device:
                got = "None" if s is None else f"{s.dtype} {tuple(s.shape)} on {s.device}"
                raise ValueError(f"{what}: an FP8 KV cache needs {name} as fp32 [1] on {pages.device}, got {got}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{what}: K/V scales are for an FP8 cache, not a {pages.dtype} one")


def check_kv_scale_values(scales: dict[int, tuple[float, float]], what: str) -> None:
    """KV scales must be finite and positive: a zero or negative one would store garbage, silently."""
    for layer, pair in scales.items():
        if not all(math.isfinite(s) and s > 0 for s in pair):
            raise ValueError(
                f"{what}: layer {layer}'s KV-cache scales (model.layers.{layer}.self_attn.k_scale, v_scale) = {pair}"
                " must be finite and > 0"
            )


def bytes_view(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes (torch has no index_copy_ or index_fill_ for FP8: they run on the bytes, where
    the byte 0 is +0.0); any other tensor as it is."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


@triton.jit
def quantize_e4m3(x, scale):
    """x / scale clamped to ±448 and rounded to E4M3 (in fp32: cast it to the FP8 pointer's type to store): as
    quantize_kv_reference, bit for bit. The division is IEEE round-to-nearest (div_rn): the GPU's default fp32
    division may be 2 ulp off, enough to round a quotient next to an E4M3 midpoint the other way."""
    v = tl.math.div_rn(x.to(tl.float32), scale)
    return _round_to_e4m3(
        tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, tl.PropagateNan.ALL)
    )


@triton.jit
def row_scale(amax, MIN_SCALE: tl.constexpr):
    """A row's scale from its elementwise running |max| (NaN-propagating): max / 448, floored at MIN_SCALE. A NaN
    or an infinity anywhere in the row makes it NaN, as the reference's: the GEMM's epilogue then gives that row
    NaN whatever its codes hold (E4M3 has no infinity, and the interpreter cannot write a NaN)."""
    row_max = tl.max(amax, axis=0)
    bad = (tl.max((amax != amax).to(tl.int32), axis=0) > 0) | (row_max == float("inf"))
    return tl.where(bad, float("nan"), tl.maximum(tl.math.div_rn(row_max, 448.0), MIN_SCALE))


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    """One program per row: its absolute maximum, then the row divided by max/448 and rounded to E4M3."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    scale = row_scale(amax, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = offs < K - k0
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=mask, other=0.0)
        tl.store(q_ptr + row * stride_q + k0 + offs, quantize_e4m3(x, scale).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] float8_e4m3fn, s_x [M] fp32), as quantize_rows_reference, in one launch."""
    m, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        # A decode step has one row per sequence, so a program's latency is the launch's: a row up to 16,384 wide
        # (an FFN's h included) in one block, 32 values a thread over up to 16 warps, where 4,096-wide blocks on
        # 4 warps walked the 8B shape's h 4 times a pass.
        block = min(triton.next_power_of_2(k), 16384)
        flags = dict(num_warps=min(16, max(4, block // 512)), **launch_flags(x.device))
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), MIN_SCALE=MIN_SCALE, BLOCK=block, **flags)
    return q, scale


def linear_fp8_reference(
    x: torch.Tensor | Fp8Rows,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, or Fp8Rows) · (Wq [N, K] FP8, s_w [N]) -> [M, N] in out_dtype (x's by default):
    x quantized per token, both operands dequantized, multiplied in fp32; bias [N] and residual [M, N] added in
    fp32."""
    xq, x_scale = quantized_rows(x, triton_kernel=False)
    fp32 = torch.float32
    out = F.linear(dequantize_weight(xq, x_scale, fp32), dequantize_weight(w, w_scale, fp32))
    if bias is not None:
        out = out + bias.float()
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype or x.dtype)


def linear_fp8_triton(
    x: torch.Tensor | Fp8Rows, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear_fp8_reference's result from two launches: the per-token quantization (none for Fp8Rows) and the FP8
    GEMM (tensor cores, the scales and bias in its epilogue)."""
    _check_linear(x, w, w_scale, bias, None)
    xq, x_scale = quantized_rows(x, triton_kernel=True)
    return matmul_triton(xq, w.contiguous(), x.dtype, x_scale, w_scale, bias)


def linear_fp8_scaled_mm(
    x: torch.Tensor | Fp8Rows,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """linear_fp8_reference's result from `torch._scaled_mm` (cuBLASLt on CUDA) with row-wise scales: the
    served path past TRITON_MAX_ROWS rows, as cuBLAS is for bf16 (kernels.swiglu_ffn)."""
    _check_linear(x, w, w_scale, bias, residual)
    xq, x_scale = quantized_rows(x, triton_kernel=x.device.type == "cuda")
    out = torch._scaled_mm(
        xq, w.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :].float(), out_dtype=out_dtype or x.dtype
    )
    if bias is not None:
        out = out + bias
    return out if residual is None else out + residual


def scaled_mm_supports(*dims: int) -> bool:
    """Whether `torch._scaled_mm` takes GEMMs of these K and N: cuBLASLt's FP8 GEMM needs multiples of 16."""
    return all(d % 16 == 0 for d in dims)


def _check_linear(
    x: torch.Tensor | Fp8Rows,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> None:
    m, k = x.shape
    n = w.shape[0]
    if w.dtype != FP8 or w.shape != (n, k) or w_scale.shape != (n,):
        raise ValueError(
            f"linear_fp8: for x {tuple(x.shape)} expected a {FP8} weight (N, {k}) and scales (N,), got "
            f"{w.dtype} {tuple(w.shape)} and {tuple(w_scale.shape)}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"linear_fp8: bias must have shape {(n,)}, got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"linear_fp8: residual must have shape {(m, n)}, got {tuple(residual.shape)}")
