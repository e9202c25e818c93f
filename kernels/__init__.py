"""tessera's compute ops: one public function per op, dispatching to a backend.

The runtime model calls only these functions for its heavy work, so a faster kernel changes what is served,
what the search times, and what the cost model predicts, all at once. Backends:
- "torch": the plain-torch references beside each kernel (the CPU path and the tests' ground truth);
- "triton": Triton kernels on CUDA tensors, with `TESSERA_KERNELS=torch|triton` to force one (both added
  by the kernels issue; until then every op runs its reference, on every device).
"""

import torch

from .attention import attention_decode_reference, attention_prefill_reference
from .ffn import swiglu_ffn_reference
from .norm import rms_norm_reference
from .rope import apply_rope_reference

__all__ = ["apply_rope", "attention_decode", "attention_prefill", "rms_norm", "swiglu_ffn"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. x [..., H], weight [H]."""
    return rms_norm_reference(x, weight, eps)


def swiglu_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN. x [M, H], w_gate_up [2I, H] = cat(gate, up), w_down [H, I] -> [M, H]."""
    return swiglu_ffn_reference(x, w_gate_up, w_down)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by per-token tables cos/sin [N, D/2]."""
    return apply_rope_reference(x, cos, sin)


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Packed varlen attention. q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> [T, Hq, D]."""
    return attention_prefill_reference(q, k, v, cu_seqlens, causal)


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """One query per sequence over its cache. q [B, Hq, D], caches [B, Hkv, S, D], seq_lens [B] int32."""
    return attention_decode_reference(q, k_cache, v_cache, seq_lens)
