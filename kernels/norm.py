"""RMSNorm (Zhang & Sennrich 2019) with the Hugging Face Llama cast order.

Reduction in fp32, normalised activations cast back to the input dtype, then multiplied by the weight:
bf16 reductions drift badly over 60+ layers. The plain-torch reference below is the CPU path; the Triton
kernel (fused with the residual add) joins it in the kernels issue.
"""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
