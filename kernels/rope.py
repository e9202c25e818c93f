"""Rotary position embedding (Su et al. 2021) in the Hugging Face Llama layout (rotate-half, not interleaved).

The cos/sin tables, including Llama-3 frequency scaling, are built once by the runtime; this op only
rotates. Kept apart from attention so prefill, decode and the search's block timing share it.
"""

import torch


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, D/2] (fp32) -> x rotated, in x's dtype (computed in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (N, heads, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]
    # addcmul: 5 ops instead of 7 (the decode step is op-overhead bound on CPU).
    rotated = (torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin))
    return torch.cat(rotated, dim=-1).to(x.dtype)
