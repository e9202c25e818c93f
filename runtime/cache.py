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


class PagedKVCache:
    """The serving engine's KV pool: k[i], v[i] are [num_pages, page_size, n_kv_heads(i), head_dim] for GQA
    layer i, None otherwise. A sequence owns a list of pages (its block table); token t of it lives at slot
    table[t // page_size] · page_size + t % page_size of every layer. Each page costs
    `page_size · kv_bytes_per_token()`: a layer with 1 KV head holds 1/8 of what a layer with 8 holds.

    Page 0 is never handed out: padding rows of a CUDA-graph batch write their K/V there.

    With `row_pages` (the CPU engine), pages 1.. are also rows of row_pages consecutive pages, and a request
    gets a whole free row when there is one: its tokens then sit in one contiguous stretch of every layer's
    pool, which plain-torch attention reads in place (attention_paged_reference's `rows`) instead of gathering
    pages, and rows at a fixed stride let one batched attention call cover many requests. When no row is wholly
    free, requests get scattered pages as usual.
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_pages: int,
        page_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        row_pages: int = 0,
    ) -> None:
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a paged KV cache needs >= 2 pages (one is scratch) of >= 1 token, got {num_pages}, "
                             f"{page_size}")  # fmt: skip
        self.num_pages, self.page_size, self.device = num_pages, page_size, torch.device(device)
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for block in arch.blocks:
            if block.attention.kind == "gqa":
                shape = (num_pages, page_size, block.attention.n_kv_heads, arch.head_dim)
                self.k.append(torch.zeros(shape, device=device, dtype=dtype))
                self.v.append(torch.zeros(shape, device=device, dtype=dtype))
            else:
                self.k.append(None)
                self.v.append(None)
        self._free = list(range(num_pages - 1, 0, -1))  # a stack; page 0 is the scratch page
        self.row_pages = row_pages
        self.rows = (num_pages - 1) // row_pages if row_pages > 0 else 0
        self._row_free = [row_pages] * self.rows  # free pages in each row
        self._row_dirty = [0] * self.rows  # pages of each row written to since it was last zeroed (a prefix)

    @staticmethod
    def page_bytes(arch: ArchConfig, page_size: int, dtype: torch.dtype) -> int:
        return page_size * arch.kv_bytes_per_token(str(dtype).removeprefix("torch."))

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """n free pages, zeroed: the slots of a request's pages that it has not written yet hold zeros, never a
        previous owner's values, so attention over them under a mask cannot pick up a NaN (0 · NaN = NaN).

        With rows, a request of at most row_pages pages gets a whole free row (all its pages, in order). Batched
        attention reads a row past its owner's pages, under the mask, so the whole row must hold nothing stale;
        zeroing only the pages written since the row was last zeroed (`_row_dirty`) keeps that true without
        zeroing max_model_len tokens of every layer per request."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool: {n} pages asked, {len(self._free)} free")
        row = next((r for r, free in enumerate(self._row_free) if free == self.row_pages), None)
        if row is not None and n <= self.row_pages:
            first = 1 + row * self.row_pages
            taken = list(range(first, first + self.row_pages))
            self._free = [p for p in self._free if not first <= p < first + self.row_pages]
            stale = taken[: max(n, self._row_dirty[row])]
            self._row_dirty[row] = n  # its owner writes only the pages it asked for
        else:
            taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
            stale = taken
            for row, index in self._in_rows(taken):  # a scattered owner dirties the rows its pages are in
                self._row_dirty[row] = max(self._row_dirty[row], index + 1)
        self._count(taken, -1)
        index = torch.tensor(stale, device=self.device)
        for t in self.k + self.v:
            if t is not None:
                t.index_fill_(0, index, 0)
        return taken

    def release(self, pages: list[int]) -> None:
        self._free.extend(pages)
        self._count(pages, +1)

    def _count(self, pages: list[int], change: int) -> None:
        """Keep each row's free-page count."""
        for row, _ in self._in_rows(pages):
            self._row_free[row] += change

    def _in_rows(self, pages: list[int]):
        """(row, index in the row) of each of these pages that lies in a row (those past the last whole row
        belong to none)."""
        for p in pages if self.rows else ():
            row, index = divmod(p - 1, self.row_pages)
            if row < self.rows:
                yield row, index

    def row_of(self, pages: list[int]) -> int | None:
        """The row these pages are, if they are exactly one whole row."""
        if not self.rows or len(pages) != self.row_pages or (pages[0] - 1) % self.row_pages:
            return None
        return (pages[0] - 1) // self.row_pages

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [N, Hkv, D] of N tokens at flat slots [N] (page · page_size + offset)."""
        kc, vc = self.k[layer], self.v[layer]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k)
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
