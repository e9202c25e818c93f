"""RMSNorm (Zhang & Sennrich 2019) with the Hugging Face Llama cast order.

Reduction in fp32, normalised activations cast back to the input dtype, then multiplied by the weight:
bf16 reductions drift badly over 60+ layers. The plain-torch reference below is the CPU path; the Triton
kernel (fused with the residual add) joins it in the kernels issue.
"""

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype."""
    # F.rms_norm computes x * rsqrt(mean(x²) + eps) in one op. In fp32 the weight can go in too (same
    # arithmetic); otherwise HF's order: normalise the fp32 copy, cast back, then scale.
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
