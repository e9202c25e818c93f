"""Paged attention in plain torch: the reference for attention_paged.py's Triton kernel, and the CPU serving path.

Same contract (q [N, Hq, D], pages [P, page_size, Hkv, D], a PagedAttentionMetadata). Decode queries (one per
sequence) go through one batched SDPA with a length mask; each sequence with a longer chunk gets its own SDPA
with the causal diagonal shifted by the keys cached before it. What every layer would otherwise recompute from
the step (the host's copy of the bounds, the decode batch's layout and mask, each chunk's pages and causal mask)
is planned once per step and kept on the metadata.

K/V are read in place where a sequence's pages are consecutive: a chunk's, a lone decode sequence's (a request
gets the lowest free pages, so one served alone has them in a row), or a decode batch's when each sequence has
one page and those pages lie together (pages of a whole context, `--page-size`). Elsewhere the pages read are
copied out. Slots that the masks hide must hold finite values (0 · NaN = NaN): a sequence's own pages are
zeroed when it gets them (PagedKVCache.allocate), and table entries past its pages are replaced by its first
page read. A windowed layer's reads start at the page of the first key in the window, as the Triton kernel's do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import first_page_read, window_mask
from .attention_paged import PagedAttentionMetadata, check_inputs
from .fp8 import FP8, dequantize_kv_reference


@dataclass(frozen=True)
class _Chunk:
    """A sequence with more than one query this step (a prompt chunk): its q rows, its keys in the pool (a
    slice of consecutive pages, read in place, or the pages' indices, copied out) and which keys each query
    sees."""

    start: int
    n: int
    length: int
    pages: slice | torch.Tensor
    visible: torch.Tensor  # (n, length): query i sees keys up to length - n + i (and within the window)


@dataclass(frozen=True)
class _StepPlan:
    """The step on the host, and its decode queries' batched attention. With `span` (lo, hi), the decode
    sequences' K/V are pool pages lo..hi-1 in place, row r for page lo + r; `scatter` [n] places sequence i's
    query in its page's row (None: the rows are the sequences, in order), rows of pages with no decode query
    get a zero query and a length of 1, and are dropped. Without it, `keys` [n, width] lists the pages whose
    first `longest` slots are copied out for each sequence, unless `run` (lo, hi): one decode sequence whose pages
    are pool pages lo..hi-1, read in place."""

    chunks: list[_Chunk]
    decode: list[int]  # the sequences with one query this step
    decode_rows: torch.Tensor | None  # their q rows (None: q is exactly them, in order)
    longest: int
    span: tuple[int, int] | None
    scatter: torch.Tensor | None
    keys: torch.Tensor | None
    run: tuple[int, int] | None
    mask: torch.Tensor | None  # (rows, 1, 1, longest): which keys each row sees; None: all of them


def _chunk(
    start: int, n: int, length: int, table: list[int], page: int, window: int | None, device: torch.device
) -> _Chunk:
    skipped = first_page_read(length - n, window, page)  # pages before it, given back ones among them, go unread
    read = table[skipped : -(-length // page)]
    pages = slice(read[0], read[0] + len(read)) if read == list(range(read[0], read[0] + len(read))) else read
    if not isinstance(pages, slice):
        pages = torch.tensor(pages, device=device)
    length -= skipped * page  # positions below count from the first key read
    visible = window_mask(torch.arange(length - n, length, device=device), length, window)
    return _Chunk(start, n, length, pages, visible)


def _plan(meta: PagedAttentionMetadata, page: int, n_tokens: int, window: int | None) -> _StepPlan:
    bounds = meta.cu_seqlens.tolist()
    q_lens = [e - s for s, e in itertools.pairwise(bounds)]
    seq_lens, tables = meta.seq_lens.tolist(), meta.block_tables.tolist()
    decode = [b for b, n in enumerate(q_lens) if n == 1]
    device = meta.seq_lens.device
    chunks = [_chunk(bounds[b], n, seq_lens[b], tables[b], page, window, device) for b, n in enumerate(q_lens) if n > 1]
    if not decode:
        return _StepPlan(chunks, decode, None, 0, None, None, None, None, None)
    rows = None if len(decode) == n_tokens else torch.tensor([bounds[b] for b in decode], device=device)
    # Each decode sequence's pages from the first one its query reads (all of them without a window), and its
    # length counted from there: a windowed layer reads its window, however long the context.
    skipped = [first_page_read(seq_lens[b] - 1, window, page) for b in decode]
    own = [tables[b][s : max(s + 1, -(-seq_lens[b] // page))] for b, s in zip(decode, skipped)]
    lengths = [seq_lens[b] - s * page for b, s in zip(decode, skipped)]
    longest = max(lengths)
    span = scatter = keys = run = None
    firsts = [t[0] for t in own]
    if longest <= page and max(firsts) - min(firsts) < 2 * len(decode):  # one page each, close together
        span = min(firsts), max(firsts) + 1
        if firsts != list(range(*span)):
            scatter = torch.tensor([f - span[0] for f in firsts], device=device)
            spread = [1] * (span[1] - span[0])
            for f, length in zip(firsts, lengths):
                spread[f - span[0]] = length
            lengths = spread
    else:  # copy out: a shorter sequence's table ends before the longest one's: its first page stands in
        width = -(-longest // page)
        if len(own) == 1 and own[0] == list(range(own[0][0], own[0][0] + width)):
            run = own[0][0], own[0][0] + width  # one sequence, pages in a row (a lone request's usually are)
        else:
            keys = torch.tensor([t + [t[0]] * (width - len(t)) for t in own], device=device)
    mask = None  # every row sees all `longest` keys (a batch of 1, say): SDPA without a mask is faster
    if min(lengths) < longest or (window is not None and longest > window):
        # Row r's one query sits at position lengths[r] - 1, counted from the row's first key read.
        mask = window_mask(torch.tensor(lengths, device=device) - 1, longest, window)[:, None, None, :]
    return _StepPlan(chunks, decode, rows, longest, span, scatter, keys, run, mask)


def _decode_keys(pages: torch.Tensor, plan: _StepPlan) -> torch.Tensor:
    """K or V of the decode batch: [rows, Hkv, longest, D]."""
    if plan.span is not None:
        lo, hi = plan.span
        return pages[lo:hi, : plan.longest].transpose(1, 2)  # a view
    if plan.run is not None:
        lo, hi = plan.run
        return pages[lo:hi].flatten(0, 1)[None, : plan.longest].transpose(1, 2)  # a view
    n, width = plan.keys.shape
    if width == 1:  # one page each: copy only the slots read, not whole pages
        return pages[plan.keys[:, 0], : plan.longest].transpose(1, 2)
    gathered = pages.index_select(0, plan.keys.flatten()).view(n, width * pages.shape[1], *pages.shape[2:])
    return gathered[:, : plan.longest].transpose(1, 2)


def _widened(kv: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """K or V as read: an FP8 cache's values times its scale; others as they are."""
    return kv if kv.dtype != FP8 else dequantize_kv_reference(kv, scale, dtype)


def attention_paged_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    meta: PagedAttentionMetadata,
    window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, Hq, D]; k/v pages [P, page_size, Hkv, D] -> [N, Hq, D], as attention_paged_triton. An FP8 cache's
    keys and values are dequantized as they are read (the decode batch's, each chunk's)."""
    check_inputs(q, k_pages, v_pages, meta, window, k_scale, v_scale)
    n_heads, head_dim = q.shape[1:]
    page, n_kv = k_pages.shape[1], k_pages.shape[2]
    plan: _StepPlan = meta.derived(
        ("torch plan", page, q.shape[0], window), lambda: _plan(meta, page, q.shape[0], window)
    )
    attended = None
    if plan.decode:
        n = len(plan.decode)
        qg = (q if plan.decode_rows is None else q[plan.decode_rows]).view(n, n_kv, n_heads // n_kv, head_dim)
        if plan.scatter is not None:
            spread = qg.new_zeros(plan.span[1] - plan.span[0], *qg.shape[1:])
            spread[plan.scatter] = qg
            qg = spread
        # GQA as grouped rows: the G query heads of KV head j are G query rows against that head's keys.
        attended = F.scaled_dot_product_attention(
            qg,
            _widened(_decode_keys(k_pages, plan), k_scale, q.dtype),
            _widened(_decode_keys(v_pages, plan), v_scale, q.dtype),
            attn_mask=plan.mask,
        )  # (rows, Hkv, G, D)
        if plan.scatter is not None:
            attended = attended[plan.scatter]
        attended = attended.reshape(n, n_heads, head_dim)
        if plan.decode_rows is None:
            return attended
    out = torch.empty_like(q)
    if attended is not None:
        out[plan.decode_rows] = attended
    for c in plan.chunks:
        k = k_pages[c.pages].flatten(0, 1)[: c.length].transpose(0, 1)[None]  # (1, Hkv, L, D): a view if a slice
        v = v_pages[c.pages].flatten(0, 1)[: c.length].transpose(0, 1)[None]
        k, v = _widened(k, k_scale, q.dtype), _widened(v, v_scale, q.dtype)
        qs = q[c.start : c.start + c.n].transpose(0, 1)[None]  # (1, Hq, n, D)
        attended = F.scaled_dot_product_attention(qs, k, v, attn_mask=c.visible, enable_gqa=True)
        out[c.start : c.start + c.n] = attended[0].transpose(0, 1)
    return out
