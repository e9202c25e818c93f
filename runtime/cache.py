"""The paged KV cache: one pool of pages per attention layer, sized by that layer's own KV-head count.

Layers with linear or no-op attention get no pool at all, and a layer with 1 KV head holds 1/8 of what a layer
with 8 holds: never padded to the maximum (the bug vLLM's early nemotron-nas support had). A page of a KV group
(below) costs `page_size` × the sum over that group's layers of their KV bytes per token (`group_page_bytes`,
from config.py's per-layer formula); with one group, `page_size · ArchConfig.kv_bytes_per_token()`.

Layers are grouped by attention window (`KVGroup`, vLLM's KV-cache groups): the full-attention layers share one
page space and block table per sequence, the layers of each window another. A sequence's full-attention pages
grow with it; in a windowed group it holds at most `window_pages` pages, enough for its window plus the most tokens one
step writes: as it takes a page for new tokens past those, its oldest page goes back to the pool (vLLM frees a
sliding window's blocks so too), so a windowed layer's KV memory stops growing past its window. A sequence's
page list and block table in a windowed group still have an entry for every page of its tokens: 0 (the scratch
page) for those it gave back, which attention never reads (they are outside the window of every query left).
Pages that leave a sequence this way keep their K/V (and their hash, below) until the pool hands them out again,
as a finished sequence's do.

An FP8 cache (`dtype` kernels.FP8, the engine's `kv_cache_dtype="fp8"`) holds E4M3 values, one byte each, with one
K and one V scale per layer (the model's calibrated ones, Model.kv_scales, else 1.0); `rotate_and_store` and
`attend` hand them to the kernels.

Prefix caching (vLLM's automatic prefix caching): a full page of a sequence is known by a hash of every token up to
its end (`page_hashes`, a chain), so two sequences with the same first tokens have the same K/V on pages of the
same hashes, in every group. A page that has been filled is registered under its hash in its group (`register`); a
new sequence takes the registered pages of its longest cached prefix (`lookup`, `share`: a page then has several
owners, `KVGroup.refs`) and computes only the tokens past them. A prefix counts as cached when every
full-attention group holds all its pages and every windowed group those its window still reads (the pages of
its last `window` tokens: vLLM's hybrid prefix cache asks the same). A registered page whose last owner leaves
keeps its K/V and stays findable (`KVGroup.evictable`), counted as free: it is handed out again, the least
recently freed first, only when no page without K/V worth keeping is left.

The cache owns its layout; attention sees it only through the pages and the block tables of a step
(kernels.PagedAttentionMetadata). Pages are 16 tokens by default, on the GPU and the CPU alike: the CPU once gave
each request one page of a whole context, read in place, which shared nothing and was not the faster layout in
interleaved runs on the AMD EPYC VM (level at batch 1, slower at batch 4-16), though single runs there and on an
Intel Xeon VM have seen it ahead at batch 16 (docs/serving.md has the step times of both).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tessera import kernels
from tessera.config import ArchConfig
from tessera.devices import dtype_name, upload
from tessera.kernels.fp8 import bytes_view, check_kv_scale_values

PAGE_SIZE = 16  # tokens per page, unless the engine is asked for others (EngineConfig.page_size)
STEP_TOKENS = 512  # tokens one engine step packs by default (EngineConfig.max_step_tokens)
UNCALIBRATED_KV_SCALE = 1.0  # an FP8 cache's scale for a layer without calibrated ones (vLLM's default too)


@dataclass
class KVGroup:
    """Attention layers that share a page space: the full-attention ones (window None), or one window's.

    num_pages: the group's pool, page 0 included (never handed out: padding rows of a CUDA-graph batch write
    their K/V there, and a windowed sequence's entries for the pages it gave back point there). window_pages: the most
    pages a sequence holds in the group at once (its window plus one step's tokens, in pages, plus one: past
    them its oldest goes back as it takes a new one); None: as many as its tokens fill. A page is free (no owner),
    owned (`refs`), or registered under the hash of the prefix its K/V hold (prefix caching), owned or not."""

    window: int | None
    layers: tuple[int, ...]
    num_pages: int
    page_size: int
    window_pages: int | None
    free: list[int] = field(default_factory=list)  # a heap: the lowest pages first, so a prompt's are consecutive
    dirty: list[int] = field(default_factory=list)  # slots of each free page its last owners may have written
    stale: list[int] = field(default_factory=list)  # slots of pages handed out since the last clear_stale, to zero
    refs: list[int] = field(default_factory=list)  # owners of each page (more than one: a shared prefix page)
    # Prefix caching: registered pages by hash and hash by page; the registered pages no one owns, least recently
    # freed first (free too: handed out when `free` is empty, losing their hash).
    by_hash: dict[bytes, int] = field(default_factory=dict)
    hash_of: dict[int, bytes] = field(default_factory=dict)
    evictable: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.free = list(range(1, self.num_pages))
        self.dirty = [0] * self.num_pages
        self.refs = [0] * self.num_pages

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens holds here at most."""
        pages = -(-tokens // self.page_size)
        return pages if self.window_pages is None else min(pages, self.window_pages)

    def first_held(self, tokens: int) -> int:
        """The first of the pages a sequence of `tokens` tokens holds (those before it went back)."""
        return 0 if self.window_pages is None else max(0, -(-tokens // self.page_size) - self.window_pages)

    def first_read(self, tokens: int) -> int:
        """The first page the next query of a sequence of `tokens` tokens reads (at position `tokens`): a prefix of
        `tokens` tokens is cached where these pages are."""
        return kernels.first_page_read(tokens, self.window, self.page_size)

    def held(self, own: list[int]) -> int:
        """How many pages a sequence's list `own` holds (0: an entry for a page it gave back, in a windowed group)."""
        return len(own) if self.window_pages is None else len(own) - own.count(0)

    def holds_fewer(self, own: list[int], most: int) -> bool:
        """held(own) < most, without a scan: a windowed list is the pages given back (0) and then those held."""
        return len(own) < most or not own[-most]

    def give_back(self, page: int, dirty: int) -> None:
        """One owner fewer for `page`, whose owner wrote `dirty` of its slots; past the last owner it is free,
        or findable by its hash while free (`evictable`) when registered."""
        self.refs[page] -= 1
        if self.refs[page]:
            return  # a shared prefix page another sequence still reads
        if page in self.hash_of:
            self.dirty[page] = self.page_size  # registered pages are full
            self.evictable[page] = None
        else:  # take() zeroed dirty when it handed the page out
            self.dirty[page] = dirty
            heapq.heappush(self.free, page)

    @property
    def available(self) -> int:
        """Pages a sequence can take: the free ones and the registered ones no one owns."""
        return len(self.free) + len(self.evictable)

    def take(self) -> int:
        """A page for one owner: the lowest free page, else the registered page freed longest ago (its hash
        forgotten). Its earlier owners' slots go to `stale`."""
        if self.free:
            page = heapq.heappop(self.free)
        else:
            page, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(page)]
        self.stale.extend(range(page * self.page_size, page * self.page_size + self.dirty[page]))
        self.dirty[page], self.refs[page] = 0, 1
        return page


def prefix_pages(tokens: Sequence[int], page_size: int) -> int:
    """The pages of a prompt that may be found cached: its full pages before its last token's, whose logits the
    engine must compute (the engine's lookup and the data-parallel router's guess of it)."""
    return (len(tokens) - 1) // page_size


def page_hashes(tokens: Sequence[int], page_size: int, hashes: list[bytes], pages: int) -> list[bytes]:
    """Extend `hashes`, those of a sequence's first full pages, to its first `pages` (each full in `tokens`). Page
    i's hash digests page i-1's and page i's tokens, so it stands for every token up to the page's end: equal
    hashes, equal prefixes (128-bit BLAKE2b: no collision to expect, and none to craft from token ids)."""
    for i in range(len(hashes), pages):
        digest = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        digest.update(array("q", tokens[i * page_size : (i + 1) * page_size]).tobytes())
        hashes.append(digest.digest())
    return hashes


def kv_groups(arch: ArchConfig) -> list[tuple[int | None, tuple[int, ...]]]:
    """(window, layers) of each group: the full-attention layers first (also when there are none and no
    windowed layers either: a model without attention keeps a bookkeeping page space), then each window's."""
    gqa = [(i, b.attention.window) for i, b in enumerate(arch.blocks) if b.attention.kind == "gqa"]
    windows = sorted({w for _, w in gqa if w is not None})
    full = tuple(i for i, w in gqa if w is None)
    groups = [(None, full)] if full or not windows else []
    return groups + [(w, tuple(i for i, lw in gqa if lw == w)) for w in windows]


def window_pages(window: int | None, page_size: int, step_tokens: int | None, max_tokens: int) -> int | None:
    """Pages a sequence keeps in a group of `window`: None (all) for full attention or when the most tokens one
    step writes for a sequence is not known. A step writes its tokens before attention reads: with `step_tokens`
    new tokens, the oldest key any of them still sees is `window + step_tokens - 1` tokens back, which
    pages_for(window + step_tokens) + 1 pages always keep."""
    if window is None or step_tokens is None:
        return None
    return min(-(-max_tokens // page_size), -(-(window + step_tokens) // page_size) + 1)


def kept_tokens(window: int | None, context: int, page_size: int = PAGE_SIZE, step_tokens: int = STEP_TOKENS) -> int:
    """Tokens' worth of K/V a sequence of `context` tokens holds in a layer of `window`: all of them under full
    attention, at most its window_pages under a window (more than the window: one step's tokens and a page).
    The search prices a windowed block's memory with it (search/cost.py)."""
    most = window_pages(window, page_size, step_tokens, context)
    return context if most is None else min(context, most * page_size)


class PagedKVCache:
    """k[i], v[i]: [group pages, page_size, n_kv_heads(i), head_dim] for GQA layer i, None otherwise. A sequence
    owns a list of pages in each group (`allocate`, grown by `extend`); token t of it lives at
    `slots(pages[g], t, t + 1)` of every layer of group g.

    dtype: the pools', the model's compute dtype or kernels.FP8 (an FP8 cache: E4M3 values, with the layer's
    scales k_scale[i], v_scale[i], fp32 [1] on the device, from `scales` {layer: (k, v)}, 1.0 where not given).
    step_tokens: the most tokens one step writes for one sequence (the engine's step budget); with it a sequence
    holds at most `window_pages` pages of a windowed group, without it every page, like full attention.
    prefix_caching: keep filled pages findable by the prefix they hold (module docstring).
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_pages: int | Sequence[int],
        page_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        step_tokens: int | None = None,
        scales: Mapping[int, tuple[float, float]] | None = None,
        prefix_caching: bool = False,
    ) -> None:
        layout = kv_groups(arch)
        counts = [num_pages] * len(layout) if isinstance(num_pages, int) else list(num_pages)
        if len(counts) != len(layout) or min(counts) < 2 or page_size < 1:
            raise ValueError(
                f"a paged KV cache needs >= 2 pages (one is scratch) of >= 1 token in each of its {len(layout)} "
                f"groups, got {num_pages}, {page_size}"
            )
        self.page_size, self.device = page_size, torch.device(device)
        self.groups = [
            KVGroup(w, layers, n, page_size, window_pages(w, page_size, step_tokens, arch.max_position_embeddings))
            for (w, layers), n in zip(layout, counts)
        ]
        self.prefix_caching = prefix_caching
        self.group_of: list[int | None] = [None] * arch.n_layers
        for g, group in enumerate(self.groups):
            for i in group.layers:
                self.group_of[i] = g
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for i, block in enumerate(arch.blocks):
            if block.attention.kind == "gqa":
                pages = self.groups[self.group_of[i]].num_pages
                shape = (pages, page_size, block.attention.n_kv_heads, arch.head_dim)
                self.k.append(torch.zeros(shape, device=device, dtype=dtype))
                self.v.append(torch.zeros(shape, device=device, dtype=dtype))
            else:
                self.k.append(None)
                self.v.append(None)
        # The same pools seen slot by slot, [pages · page_size, Hkv, D]: where write() puts each token.
        self._k_slots = [None if t is None else t.view(-1, *t.shape[2:]) for t in self.k]
        self._v_slots = [None if t is None else t.view(-1, *t.shape[2:]) for t in self.v]
        self.fp8 = dtype == kernels.FP8
        scales = scales or {}
        if not self.fp8 and scales:
            raise ValueError(f"KV scales are for an FP8 cache, not a {dtype} one")
        check_kv_scale_values(scales, "PagedKVCache")
        self.k_scale: list[torch.Tensor | None] = [None] * arch.n_layers
        self.v_scale: list[torch.Tensor | None] = [None] * arch.n_layers
        for i, pool in enumerate(self.k):
            if pool is not None and self.fp8:
                k, v = scales.get(i, (UNCALIBRATED_KV_SCALE, UNCALIBRATED_KV_SCALE))
                self.k_scale[i] = torch.tensor([k], dtype=torch.float32, device=device)
                self.v_scale[i] = torch.tensor([v], dtype=torch.float32, device=device)

    @staticmethod
    def page_bytes(arch: ArchConfig, page_size: int, dtype: torch.dtype) -> int:
        """A page in every attention layer, in pools of `dtype` (kernels.FP8: one byte a value)."""
        return page_size * arch.kv_bytes_per_token(kv_dtype=dtype_name(dtype))

    @staticmethod
    def group_page_bytes(arch: ArchConfig, page_size: int, dtype: torch.dtype) -> list[int]:
        """A page in every layer of each group (kv_groups order), in pools of `dtype`."""
        name = dtype_name(dtype)
        return [
            page_size * sum(arch.kv_bytes_per_token_layer(arch.blocks[i], kv_dtype=name) for i in layers)
            for _, layers in kv_groups(arch)
        ]

    # Pages: the first group's figures stand for the pool (the full-attention layers' when there are any, the
    # ones that grow with a sequence); admission asks every group (`Engine._can_start`).

    @property
    def usable_pages(self) -> int:
        return self.groups[0].num_pages - 1

    @property
    def free_pages(self) -> int:
        """Pages no sequence owns (registered prefix pages among them: they are handed out when needed)."""
        return self.groups[0].available

    def pages_needed(self, tokens: int) -> list[int]:
        """Pages a sequence of `tokens` tokens holds in each group."""
        return [g.pages_for(tokens) for g in self.groups]

    def capacity(self, pages: list[list[int]]) -> int:
        """The most tokens a sequence with `pages` (per group) can have without another page."""
        return min(len(own) for own in pages) * self.page_size

    def extend(self, pages: list[list[int]], tokens: int, window_tokens: int | None = None) -> bool:
        """Give a sequence with `pages` (per group, extended in place) the pages it lacks for `tokens` tokens, the
        lowest free first, a windowed group's oldest given back first where the sequence would hold more than
        `window_pages` (`_slide`); False, changing nothing, when the pool lacks them. window_tokens: the tokens
        to hold in the windowed groups instead (those computed by the end of the step: a long prompt's later
        chunks take their pages as their steps come). The slots an earlier owner wrote on the pages handed out
        are zeroed by the next `clear_stale()`, once for all the pages of a step."""
        plans = [
            self._slide(group, own, tokens if group.window_pages is None or window_tokens is None else window_tokens)
            for group, own in zip(self.groups, pages)
        ]
        for group, own, (back, new) in zip(self.groups, pages, plans):
            freed = sum(group.refs[own[i]] == 1 for i in back)  # a shared page stays with its other owners
            if sum(new) - freed > group.available:
                return False
        for group, own, (back, new) in zip(self.groups, pages, plans):
            for i in back:
                group.give_back(own[i], self.page_size)  # a page before the last is full
                own[i] = 0
            own.extend(group.take() if held else 0 for held in new)
        return True

    def _slide(self, group: KVGroup, own: list[int], tokens: int) -> tuple[list[int], list[bool]]:
        """For a sequence with pages `own` in `group` to hold `tokens` tokens: the indices of the pages it gives
        back (held, before `first_held`), and for each page it lacks whether it takes one (no: it is before
        `first_held` already, as when a long prompt's pages are asked for at once)."""
        first, pages = group.first_held(tokens), -(-tokens // self.page_size)
        back = []
        i = min(first, len(own)) - 1
        while i >= 0 and own[i]:  # the held pages are the last ones: the rest went back already
            back.append(i)
            i -= 1
        return back, [i >= first for i in range(len(own), pages)]

    def clear_stale(self) -> None:
        """Zero the slots earlier owners wrote on the pages handed out since the last call: a request's slots
        that it has not written yet hold zeros, never a previous owner's values, so attention over them under a
        mask cannot pick up a NaN (0 · NaN = NaN). Only slots someone wrote are zeroed, not whole pages (which
        may be long: `--page-size` sets them)."""
        for group in self.groups:
            if group.stale:
                index = upload(group.stale, self.device, torch.int64)
                for layer in group.layers:
                    for pool in (self._k_slots[layer], self._v_slots[layer]):
                        bytes_view(pool).index_fill_(0, index, 0)
                group.stale = []

    def allocate(self, tokens: int) -> list[list[int]]:
        """Each group's pages for a new sequence of `tokens` tokens, stale slots zeroed (`extend`)."""
        pages: list[list[int]] = [[] for _ in self.groups]
        if not self.extend(pages, tokens):
            free = [g.available for g in self.groups]
            raise RuntimeError(f"KV pool: {self.pages_needed(tokens)} pages asked, {free} free")
        self.clear_stale()
        return pages

    def release(self, pages: list[list[int]], tokens: int) -> None:
        """Return a sequence's pages to the pool; it wrote (or may have written) the K/V of its first `tokens`
        tokens, on as many slots of each page (every slot of a page before its last), which the page's next owner
        gets zeroed."""
        page_size = self.page_size
        for group, own in zip(self.groups, pages):
            # The last pages first: of a sequence's registered pages, its longest prefix stays findable longest.
            for i in reversed(range(len(own))):
                if own[i]:  # 0: a windowed page it gave back already
                    group.give_back(own[i], min(page_size, max(0, tokens - i * page_size)))

    # Prefix caching

    def lookup(self, hashes: Sequence[bytes]) -> list[list[int]]:
        """The cached pages of the longest prefix of these page hashes that every group holds (module docstring),
        per group, an entry for each page of the prefix: a windowed group's pages before `first_read` are 0 (not
        needed, not shared). Empty lists when nothing is cached or prefix caching is off."""
        n = len(hashes) if self.prefix_caching else 0
        for group in self.groups:
            if group.window is None:  # every page: the run of leading hits
                n = next((i for i, h in enumerate(hashes[:n]) if h not in group.by_hash), n)
        windowed = [g for g in self.groups if g.window is not None]
        while n:  # a page missing at i rules out every longer prefix too: its window reads that page as well
            first = [g.first_read(n * self.page_size) for g in windowed]
            missing = [i for g, f in zip(windowed, first) for i in range(f, n) if hashes[i] not in g.by_hash]
            if not missing:
                break
            n = max(missing)
        return [
            [0] * (first := g.first_read(n * self.page_size)) + [g.by_hash[h] for h in hashes[first:n]]
            for g in self.groups
        ]

    def share(self, pages: list[list[int]], hits: list[list[int]]) -> None:
        """Give a sequence with no pages yet (`pages`, per group, extended in place) the cached pages `hits`
        (`lookup`'s) as its first ones."""
        for group, own, found in zip(self.groups, pages, hits):
            for p in found:
                if p:
                    group.evictable.pop(p, None)
                    group.refs[p] += 1
            own.extend(found)

    def register(self, group: int, page: int, page_hash: bytes) -> bool:
        """Make a page of `group` findable by the hash of the prefix it ends (its K/V written, or being written by
        the step that registers it); whether it was registered. A prefix already registered keeps its page (two
        sequences computed it at once): this one stays private."""
        g = self.groups[group]
        if not self.prefix_caching or page_hash in g.by_hash or page in g.hash_of:
            return False
        g.by_hash[page_hash] = page
        g.hash_of[page] = page_hash
        return True

    def forget(self, pages: Sequence[tuple[int, int]]) -> None:
        """Make these pages, (group, page) each, unfindable (their K/V are not what their hash says: a step that
        failed, a request that failed); those no one owns become plain free pages."""
        for group, p in pages:
            g = self.groups[group]
            if p in g.hash_of:
                del g.by_hash[g.hash_of.pop(p)]
                if p in g.evictable:
                    del g.evictable[p]
                    heapq.heappush(g.free, p)  # dirty: page_size, set when it was freed

    def forget_unshared(self, pages: list[list[int]], hashes: Sequence[bytes] = ()) -> None:
        """`forget` those of a sequence's pages (per group) that no other sequence holds (a failed request's): the
        pages it shares, other sequences' steps wrote too, and their outputs vouch for them. hashes: those of the
        pages it registered; in a windowed group, the pages under them that no one holds, which it gave back as it
        went, go too (a model windowed everywhere would find them at a shorter prefix)."""
        unshared = [(g, p) for g, own in enumerate(pages) for p in own if p and self.groups[g].refs[p] == 1]
        for g, group in enumerate(self.groups):
            if group.window_pages is not None:
                found = (group.by_hash.get(h) for h in hashes)
                unshared += [(g, p) for p in found if p is not None and group.refs[p] == 0]
        self.forget(unshared)

    def slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """Where the tokens at positions start..end-1 of a sequence with these pages (of one group) live: token t
        on page t // page_size. The rule written out, one token at a time: the engine computes it on the device
        (`BlockTables.slots`), and the tests check that against this."""
        page = self.page_size
        return [pages[t // page] * page + t % page for t in range(start, end)]

    def table(self, pages: list[int], width: int, start: int = 0) -> list[int]:
        """A sequence's block-table row, entries start..width-1: its pages (as `slots`), 0 past them (never read)."""
        return [pages[i] if i < len(pages) else 0 for i in range(start, width)]

    def rotate_and_store(
        self, layer: int, slots: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """RoPE over qk [N, Hq + Hkv, D] (queries, then keys), the rotated keys and v [N, Hkv, D] stored at flat
        slots [N] (page · page_size + offset) of `layer`; returns the rotated qk. One kernel on the GPU
        (kernels.rope_and_cache)."""
        k_slots, v_slots = self._k_slots[layer], self._v_slots[layer]
        return kernels.rope_and_cache(
            qk, v, cos, sin, k_slots, v_slots, slots, self.k_scale[layer], self.v_scale[layer]
        )

    def attend(
        self, layer: int, q: torch.Tensor, meta: kernels.PagedAttentionMetadata, window: int | None
    ) -> torch.Tensor:
        """Attention of q [N, Hq, D] over `layer`'s cached keys as `meta` places them (kernels.attention_paged), an
        FP8 cache's values read with their scales."""
        k, v = self.k[layer], self.v[layer]
        return kernels.attention_paged(q, k, v, meta, window, self.k_scale[layer], self.v_scale[layer])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class BlockTables:
    """The running sequences' block tables in every KV group, one row per batch slot, kept on the cache's device
    (vLLM's persistent block table). A row is written when its sequence is admitted and widened as the sequence
    takes more pages (`grow`, once a step for all of them); each step gathers the rows of its sequences and
    computes where each token's K/V go on the device, rather than rebuilding every table and slot in Python (at
    batch 256, `Engine._step_batch` under cProfile on the 2-core dev VM: 9.1 ms before, 2.7 ms after). The rule
    is `PagedKVCache.table` and `slots`'."""

    def __init__(self, cache: PagedKVCache, rows: int, width: int) -> None:
        self.cache = cache
        self.tables = torch.zeros(len(cache.groups), rows, width, dtype=torch.int32, device=cache.device)
        self.widths = [0] * rows  # entries each row's sequence fills: a page for each page of its tokens
        self._free = list(range(rows - 1, -1, -1))  # pop() hands out the lowest row

    def width_for(self, tokens: int) -> int:
        width = -(-tokens // self.cache.page_size)
        if width > self.tables.shape[2]:
            raise ValueError(f"block tables: {tokens} tokens need {width} pages, rows hold {self.tables.shape[2]}")
        return width

    def add(self, pages: list[list[int]], tokens: int) -> int:
        """Write the table of a sequence of `tokens` tokens holding `pages` (per group) into a free row; its row."""
        if not self._free:
            raise RuntimeError(f"block tables: all {self.tables.shape[1]} rows are in use")
        width = self.width_for(tokens)
        row = self._free.pop()
        self.widths[row] = width
        rows = [self.cache.table(own, width) for own in pages]
        self.tables[:, row, :width] = upload(rows, self.tables.device, torch.int32).view(len(pages), width)
        return row

    def grow(self, sequences: list[tuple[int, list[list[int]], int]]) -> None:
        """Widen the rows of those sequences that now hold more tokens than their rows cover: (row, its pages per
        group, its tokens) each, the new entries of all of them written in one copy to the device."""
        entries: list[tuple[int, int, int, int]] = []  # (group, row, column, page)
        page_size = self.cache.page_size
        for row, pages, tokens in sequences:
            old = self.widths[row]
            if tokens <= old * page_size:
                continue  # most steps of a decode: its last page has room
            width = self.width_for(tokens)
            for g, own in enumerate(pages):
                # The new entries, and in a windowed group those of the pages held at the last write (from its
                # first held): the ones given back since (PagedKVCache.extend) now belong to others or to no one,
                # and become 0, the scratch page, so that no read, even a masked one, reaches them.
                group = self.cache.groups[g]  # full attention: the new entries only
                start = old if group.window_pages is None else group.first_held(old * page_size)
                entries.extend((g, row, c, page) for c, page in enumerate(self.cache.table(own, width, start), start))
            self.widths[row] = width
        if entries:
            g, r, c, page = upload(entries, self.tables.device, torch.int64).T
            self.tables[g, r, c] = page.to(torch.int32)

    def remove(self, row: int) -> None:
        self._free.append(row)

    def gather(self, rows: list[int], rows_t: torch.Tensor) -> torch.Tensor:
        """[groups, B, width]: the tables of `rows` (rows_t: the same on the device), in their order, as wide as the
        widest of them fills (the attention kernel's capacity, hence its split plan, follows this width)."""
        return self.tables[:, rows_t, : max(self.widths[r] for r in rows)]

    def slots(self, tables: torch.Tensor, seq_of_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[groups, N] int64: the slot of each of N tokens, token i at `positions[i]` of sequence
        `seq_of_token[i]` (an index into the B rows of `tables`, as `gather` returned them)."""
        page = self.cache.page_size
        return tables[:, seq_of_token, positions // page].long() * page + positions % page
