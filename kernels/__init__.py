"""tessera's compute ops: one public function per op, dispatching to a backend.

The runtime model calls only these functions for its heavy work, so a faster kernel changes what is served,
what the search times, and what the cost model predicts, all at once. Backends:
- "triton": the Triton kernels, used by default for CUDA tensors;
- "torch": the plain-torch reference beside each kernel: the CPU path, the tests' ground truth, and the
  path whenever autograd records (the Triton kernels are inference-only; BLD and GKD train through these).
`TESSERA_KERNELS=torch|triton` forces one for every op (read once, at import; `set_backend` changes it at run
time). Forcing "triton" on CPU tensors works only under the Triton interpreter (`TRITON_INTERPRET=1`, set
before import).
"""

import os

import torch

from tessera.errors import UserError

from . import cpu_layout, ffn_tilings
from .attention import attention_prefill_reference, attention_prefill_triton, first_page_read
from .attention_paged import PagedAttentionMetadata, attention_paged_triton, fp8_in_f16, set_fp8_f16
from .attention_paged_reference import attention_paged_reference
from .ffn import TRITON_MAX_ROWS, swiglu_ffn_fp8_scaled_mm, swiglu_ffn_reference, swiglu_ffn_triton
from .fp8 import (
    FP8,
    FP8_MAX,
    MIN_SCALE,
    Fp8Rows,
    check_fp8_rows,
    dequantize_weight,
    linear_fp8_reference,
    linear_fp8_scaled_mm,
    linear_fp8_triton,
    quantize_weight,
    scaled_mm_supports,
)
from .hardware import cpu_launches
from .norm import rms_norm_reference, rms_norm_triton
from .rope import apply_rope_reference, apply_rope_triton, rope_and_cache_reference, rope_and_cache_triton

__all__ = [
    "BACKEND_ENV",
    "FP8",
    "FP8_MAX",
    "MIN_SCALE",
    "Fp8Rows",
    "PagedAttentionMetadata",
    "apply_rope",
    "attention_paged",
    "attention_prefill",
    "backend",
    "dequantize_weight",
    "ffn_route",
    "first_page_read",
    "forced_backend",
    "fp8_in_f16",
    "linear",
    "quantize_weight",
    "rms_norm",
    "rope_and_cache",
    "set_backend",
    "set_fp8_f16",
    "swiglu_ffn",
]

BACKEND_ENV = "TESSERA_KERNELS"
# "torch", "triton", None for automatic; or a bad TESSERA_KERNELS as given, whose error (_bad_environment) the first
# op raises: raised at import, it would be a traceback before the CLI could say it in one line.
_forced: str | None = None
_bad_environment: UserError | None = None


def set_backend(name: str | None) -> None:
    """Force "torch" or "triton" for every op, or None for automatic (Triton on CUDA tensors)."""
    global _forced, _bad_environment
    if name not in (None, "", "torch", "triton"):
        raise UserError(f"{BACKEND_ENV} must be 'torch' or 'triton' (or unset for automatic), got {name!r}")
    _forced, _bad_environment = name or None, None


def forced_backend() -> str | None:
    return None if _bad_environment is not None else _forced


def backend(*tensors: torch.Tensor) -> str:
    """The backend an op on these tensors runs: "triton" or "torch". Called for every op, so kept to a few
    attribute reads (an os.environ lookup here cost 5 % of a CPU decode step)."""
    if _forced == "torch" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return "torch"
    if _forced is None:
        return "triton" if tensors[0].is_cuda else "torch"
    if _forced == "triton":
        if not tensors[0].is_cuda and not cpu_launches():
            raise UserError(f"{BACKEND_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
        return "triton"
    raise _bad_environment  # what is left: a bad TESSERA_KERNELS (the automatic path above pays nothing for it)


try:
    set_backend(os.environ.get(BACKEND_ENV))
except UserError as e:
    _forced, _bad_environment = os.environ[BACKEND_ENV], e


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, quantize: bool = False
) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
    """RMSNorm over the last dimension. x [..., H], weight [H]. With a residual (like x): returns
    (RMSNorm(x + residual), x + residual), the add fused in. quantize (x [M, H]): the normed rows quantized per
    token for an FP8 GEMM (Fp8Rows, what `linear` and `swiglu_ffn` take for FP8 weights), in the norm's launch."""
    impl = rms_norm_triton if backend(x, weight) == "triton" else rms_norm_reference
    return impl(x, weight, eps, residual, quantize)


def _cublas_rows(x: torch.Tensor | Fp8Rows, plan: ffn_tilings.FfnPlan | None = None) -> bool:
    """Whether the automatic dispatch hands an x of this many rows to cuBLAS rather than the Triton GEMMs. With an
    FFN's plan from its GPU's measured table (kernels/ffn_tilings.py), where that table measured cuBLAS faster;
    without one, past TRITON_MAX_ROWS, where cuBLAS is the faster on the H200 for bf16 FFNs (kernels/ffn.py). FP8
    follows the same rule, its own crossover on the H200 (3e791a3): the Triton FP8 FFN 1.33-1.60x `_scaled_mm` at
    M <= 16, 0.66-0.83x from 128 rows (M between 17 and 127 unmeasured)."""
    if _forced is not None:
        return False
    return not plan.triton if plan is not None else x.shape[0] > TRITON_MAX_ROWS


def ffn_route(
    x: torch.Tensor | Fp8Rows, w_gate_up: torch.Tensor, w_down: torch.Tensor, fp8: bool = False
) -> tuple[str, ffn_tilings.FfnPlan | None]:
    """How `swiglu_ffn` runs an FFN of FP8 weights (fp8) or not on x: "torch" (the reference: the CPU, autograd),
    "cublas" (bf16 past the crossover), "scaled_mm" (FP8 past it) or "triton", with the measured plan it follows
    (kernels/ffn_tilings.py: its GPU's table, for 2-byte activations and FP8 weights; None without one)."""
    if backend(_codes(x), w_gate_up, w_down) != "triton":
        return "torch", None
    plan = None
    if fp8 or _codes(x).element_size() == 2:  # fp32 runs the built-in tilings
        plan = ffn_tilings.plan(x.shape[0], "fp8" if fp8 else "bf16", _codes(x).device)
    if _cublas_rows(x, plan):
        if not fp8:
            return "cublas", plan
        if scaled_mm_supports(*w_down.shape):  # both GEMMs' K and N are the hidden size and the width
            return "scaled_mm", plan
    return "triton", plan


def swiglu_ffn(
    x: torch.Tensor | Fp8Rows,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    residual: torch.Tensor | None = None,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU FFN. x [M, H], w_gate_up [2I, H] = cat(gate, up), w_down [H, I] -> [M, H], plus the residual
    [M, H] when one is given (added in the down GEMM's epilogue). FP8 weights come with their per-channel scales
    gate_up_scale [2I] and down_scale [H] (kernels/fp8.py). Chosen automatically (`ffn_route`): past
    TRITON_MAX_ROWS rows cuBLAS runs it (the torch path, or `torch._scaled_mm` for FP8), there the faster one on the
    H200; on a GPU with a measured tiling table (kernels/ffn_tilings.py) its plan for the rows says which runs it,
    and with which tilings.
    x may come quantized already (Fp8Rows, from `rms_norm(..., quantize=True)`) when the weights are FP8."""
    check_fp8_rows(x, gate_up_scale, "swiglu_ffn")
    args = (x, w_gate_up, w_down, residual, gate_up_scale, down_scale)
    route, plan = ffn_route(x, w_gate_up, w_down, fp8=gate_up_scale is not None)
    if route in ("torch", "cublas"):
        return swiglu_ffn_reference(*args)
    if route == "scaled_mm":
        return swiglu_ffn_fp8_scaled_mm(*args)
    if plan is None:
        return swiglu_ffn_triton(*args)
    return swiglu_ffn_triton(*args, persistent=plan.persistent, gate_up_tiling=plan.gate_up, down_tiling=plan.down)


def linear(
    x: torch.Tensor | Fp8Rows,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] · weight [N, K]ᵀ (+ bias [N]) -> [M, N]. A weight in the compute dtype is F.linear (cuBLAS; on the
    CPU inside an engine's step, its oneDNN-packed twin where it has one: kernels/cpu_layout.py); an
    FP8 weight comes with its per-channel scales [N] and runs kernels/fp8.py's GEMM (Triton up to
    TRITON_MAX_ROWS rows, `torch._scaled_mm` past it, the dequantizing reference on the CPU), on x as given or
    already quantized (Fp8Rows, from `rms_norm(..., quantize=True)`)."""
    check_fp8_rows(x, scale, "linear")
    if scale is None:
        return cpu_layout.linear(x, weight, bias)  # F.linear, or a CPU engine's packed twin (kernels/cpu_layout.py)
    if isinstance(x, torch.Tensor) and x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias, scale).view(*x.shape[:-1], weight.shape[0])
    choice = backend(_codes(x), weight)
    if choice == "torch":
        return linear_fp8_reference(x, weight, scale, bias)
    if _cublas_rows(x) and scaled_mm_supports(*weight.shape):
        return linear_fp8_scaled_mm(x, weight, scale, bias)
    return linear_fp8_triton(x, weight, scale, bias)


def _codes(x: torch.Tensor | Fp8Rows) -> torch.Tensor:
    """The tensor an op's backend is chosen by: x, or its E4M3 codes."""
    return x.codes if isinstance(x, Fp8Rows) else x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by per-token tables cos/sin [N, D/2]."""
    impl = apply_rope_triton if backend(x) == "triton" else apply_rope_reference
    return impl(x, cos, sin)


def rope_and_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_slots: torch.Tensor,
    v_slots: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """An engine step's RoPE and KV-cache store: qk [N, Hq + Hkv, D] (queries, then keys; a view of the packed
    qkv output) rotated by cos/sin [N, D/2], the rotated keys and the values v [N, Hkv, D] stored at the flat
    slots [N] of the layer's cache (k_slots/v_slots [S, Hkv, D]); returns the rotated qk [N, Hq + Hkv, D] (the
    queries for attention, the keys too for a step that attends over its own keys). An FP8 cache (slots in
    kernels.FP8) stores keys / k_scale and values / v_scale in E4M3 (fp32 scales [1], the layer's)."""
    impl = rope_and_cache_triton if backend(qk, v, k_slots) == "triton" else rope_and_cache_reference
    return impl(qk, v, cos, sin, k_slots, v_slots, slots, k_scale, v_scale)


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    max_seqlen: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Packed varlen attention. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> [T, Hq, D].
    max_seqlen, when the caller knows it, spares the Triton launcher a device-to-host read. window (causal only):
    the query at position p sees keys p - window + 1 .. p."""
    if backend(q, k, v) == "triton":
        return attention_prefill_triton(q, k, v, cu_seqlens, causal, max_seqlen, window)
    return attention_prefill_reference(q, k, v, cu_seqlens, causal, window)


def attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    meta: PagedAttentionMetadata,
    window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill chunks and decode tokens together over a paged KV cache (every cached attention of an engine step).
    q [N, Hq, D], pages [P, page_size, Hkv, D]; `meta` says where each sequence's queries and pages are.
    window: the query at position p sees cached keys p - window + 1 .. p only. An FP8 cache comes with its
    layer's scales (rope_and_cache), applied as its pages are read."""
    impl = attention_paged_triton if backend(q, k_pages, v_pages) == "triton" else attention_paged_reference
    return impl(q, k_pages, v_pages, meta, window, k_scale, v_scale)
