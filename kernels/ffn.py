"""SwiGLU FFN (Shazeer 2020) over packed weights: out = W_down · (silu(W_gate·x) ⊙ W_up·x).

`w_gate_up` is cat(W_gate, W_up) along the output dimension ([2I, H]), packed once at load so the gate and
up projections are one GEMM. An FFN-Fusion group is the same op with the groups' weights concatenated
along I. The plain-torch reference below is the CPU path and the tests' ground truth.
"""

import torch
import torch.nn.functional as F


def swiglu_ffn_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [M, H], w_gate_up [2I, H], w_down [H, I] -> [M, H]."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)  # (M, I) each
    return F.linear(F.silu(gate) * up, w_down)
