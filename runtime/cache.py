"""The paged KV cache: one pool of pages per attention layer, sized by that layer's own KV-head count.

Layers with linear or no-op attention get no pool at all, and a layer with 1 KV head holds 1/8 of what a layer
with 8 holds: never padded to the maximum (the bug vLLM's early nemotron-nas support had). Each page costs
`page_size · ArchConfig.kv_bytes_per_token()` (the one formula, in config.py).

The cache owns its layout; attention sees it only through the pages and the block tables of a step
(kernels.PagedAttentionMetadata). On the GPU pages are 16 tokens. On the CPU a request gets one page of a
whole context when the pool has one for every batch slot (`page_size_for`): its K/V then lie in one stretch of
each layer's pool, and the plain-torch attention reads them in place instead of gathering pages
(docs/serving.md has the step times of both).
"""

from __future__ import annotations

import heapq

import torch

from tessera.config import ArchConfig
from tessera.devices import dtype_name

PAGE_SIZE = 16  # tokens per page, unless the CPU gives a request a whole context (page_size_for)


class PagedKVCache:
    """k[i], v[i]: [num_pages, page_size, n_kv_heads(i), head_dim] for GQA layer i, None otherwise. A sequence
    owns a list of pages (its block table); token t of it lives at slot table[t // page_size] · page_size +
    t % page_size of every layer.

    Page 0 is never handed out: padding rows of a CUDA-graph batch write their K/V there.
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_pages: int,
        page_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_pages < 2 or page_size < 1:
            raise ValueError(
                f"a paged KV cache needs >= 2 pages (one is scratch) of >= 1 token, got {num_pages}, {page_size}"
            )
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
        # The same pools seen slot by slot, [num_pages · page_size, Hkv, D]: where write() puts each token.
        self._k_slots = [None if t is None else t.view(-1, *t.shape[2:]) for t in self.k]
        self._v_slots = [None if t is None else t.view(-1, *t.shape[2:]) for t in self.v]
        self._free = list(range(1, num_pages))  # a heap: the lowest pages first, so a request's are consecutive
        self._dirty = [0] * num_pages  # slots of each page that an owner may have written since it was zeroed

    @staticmethod
    def page_bytes(arch: ArchConfig, page_size: int, dtype: torch.dtype) -> int:
        return page_size * arch.kv_bytes_per_token(dtype_name(dtype))

    @staticmethod
    def page_size_for(
        arch: ArchConfig, device: torch.device, dtype: torch.dtype, budget: int, max_batch: int, max_model_len: int
    ) -> int:
        """GPU: 16 tokens. CPU: a whole max_model_len when `budget` bytes hold one such page per batch slot, so
        every request's K/V lie in one stretch; 16 tokens otherwise."""
        whole = PagedKVCache.page_bytes(arch, max_model_len, dtype)
        if device.type == "cpu" and budget >= max_batch * whole:
            return max_model_len
        return PAGE_SIZE

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, tokens: int) -> list[int]:
        """Pages for `tokens` tokens, lowest first, zeroed as far as anyone wrote to them: the slots a request
        has not written yet hold zeros, never a previous owner's values, so attention over them under a mask
        cannot pick up a NaN (0 · NaN = NaN). Only the slots an earlier owner could have written are zeroed, not
        whole pages: on the CPU a page is a whole context."""
        n = self.pages_for(tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV pool: {n} pages asked, {len(self._free)} free")
        taken = [heapq.heappop(self._free) for _ in range(n)]
        stale = [p * self.page_size + s for p in taken for s in range(self._dirty[p])]
        for i, p in enumerate(taken):
            self._dirty[p] = min(self.page_size, tokens - i * self.page_size)
        if stale:
            index = torch.tensor(stale, device=self.device)
            for t in self._k_slots + self._v_slots:
                if t is not None:
                    t.index_fill_(0, index, 0)
        return taken

    def release(self, pages: list[int]) -> None:
        for p in pages:
            heapq.heappush(self._free, p)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [N, Hkv, D] of N tokens at flat slots [N] (page · page_size + offset)."""
        self._k_slots[layer].index_copy_(0, slots, k)
        self._v_slots[layer].index_copy_(0, slots, v)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
