"""The parent's activations at every layer boundary, recorded once and reused by BLD, scoring and pruning.

For windows [n, T+1] of text (inputs + next-token targets), `record` runs the parent and keeps, per layer i,
its input h_i and its mid-point m_i = h_i + attn_i(norm(h_i)) (the FFN's input), plus the last layer's
output h_L. A child block then learns or is scored from exactly the parent's inputs, so no gradient and no
error crosses blocks (Puzzle's decoupled BLD), and replace-1-block scoring starts at layer i instead of 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from tessera.runtime.model import Batch, Model


@dataclass
class Activations:
    tokens: torch.Tensor  # [n, T + 1] int64: inputs tokens[:, :-1], targets tokens[:, 1:]
    inputs: list[torch.Tensor]  # L + 1 tensors [n, T, H]: inputs[i] enters layer i, inputs[L] leaves the last
    mids: list[torch.Tensor]  # L tensors [n, T, H]: after layer i's attention half

    @property
    def n_windows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1


def window_context(model: Model, n_windows: int, seq_len: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The packed prefill batch of n equal windows (no KV cache) and its rotary tables: what a layer needs to
    run on hidden states [n·T, H] outside the model's own forward."""
    device = model.embed_tokens.weight.device
    batch = Batch.sequences([seq_len] * n_windows, device)
    cos, sin = model.rope_tables(batch.positions)
    return batch, cos, sin


@torch.no_grad()
def record(model: Model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Activations:
    """Run the parent over windows [n, T+1] (in chunks of batch_size) and keep every layer boundary (fp32, CPU)."""
    n, t = windows.shape[0], windows.shape[1] - 1
    h_size, n_layers = model.arch.hidden_size, model.arch.n_layers
    inputs = [torch.empty(n, t, h_size) for _ in range(n_layers + 1)]
    mids = [torch.empty(n, t, h_size) for _ in range(n_layers)]
    device = model.embed_tokens.weight.device
    for start in tqdm(range(0, n, batch_size), desc="parent activations", disable=not progress, leave=False):
        chunk = windows[start : start + batch_size, :-1].to(device)
        b = chunk.shape[0]
        batch, cos, sin = window_context(model, b, t)
        h = model.embed_tokens(chunk.reshape(-1))
        for i, layer in enumerate(model.layers):
            inputs[i][start : start + b] = h.view(b, t, -1).float().cpu()
            m = layer.attend(h, batch, cos, sin)
            mids[i][start : start + b] = m.view(b, t, -1).float().cpu()
            h = layer.feed_forward(m)
        inputs[n_layers][start : start + b] = h.view(b, t, -1).float().cpu()
    return Activations(windows, inputs, mids)
