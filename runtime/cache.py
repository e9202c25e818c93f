"""Static KV cache, allocated per layer with that layer's own KV-head count.

Layers with linear or no-op attention get no cache at all, and a layer with 1 KV head holds 1/8 of what a
layer with 8 holds: never padded to the maximum (the bug vLLM's early nemotron-nas support had). Memory is
exactly `ArchConfig.kv_bytes_per_token() * batch_size * max_seq_len` (the one formula, in config.py).
"""

from __future__ import annotations

import torch

from tessera.config import ArchConfig


class KVCache:
    """k[i], v[i]: [batch, n_kv_heads(i), max_seq_len, head_dim] for GQA layer i, None otherwise."""

    def __init__(
        self,
        arch: ArchConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_seq_len >= 1, got {batch_size}, {max_seq_len}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for block in arch.blocks:
            if block.attention.kind == "gqa":
                shape = (batch_size, block.attention.n_kv_heads, max_seq_len, arch.head_dim)
                self.k.append(torch.zeros(shape, device=device, dtype=dtype))
                self.v.append(torch.zeros(shape, device=device, dtype=dtype))
            else:
                self.k.append(None)
                self.v.append(None)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [N, Hkv, D] of N tokens at (cache row, position) pairs rows[N], positions[N]."""
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
