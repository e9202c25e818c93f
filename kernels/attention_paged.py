"""Paged attention: every attention layer of every engine step (prefill chunks and decode tokens) over a paged KV cache.

The KV cache keeps each layer's K/V in a pool of fixed-size pages (vLLM's PagedAttention layout, [pages,
page_size, Hkv, D] per layer); sequence b owns the pages listed in block_tables[b]. One engine step packs, for
each running sequence, the tokens whose K/V are not cached yet: one token for a sequence that is decoding, a
chunk of its prompt for one that is prefilling. Their K/V are written to the pool first; then query i of
sequence b (q_len_b queries, seq_lens[b] tokens cached in all) sits at position seq_lens[b] - q_len_b + i and
attends to every cached key up to and including it. Decode (q_len 1), a whole prompt (no keys before it) and a
later chunk of a long prompt are the same computation, so one launch serves a mixed step (vLLM's unified
attention, Sarathi's chunked prefill). `PagedAttentionMetadata` describes a step; the engine builds it once
and every layer reads it.

The Triton kernel packs GQA as the prefill kernel does (attention.py): a program owns BLOCK_M packed
(token, query head) rows of one sequence and one KV head, so each K/V tile is read once for the G query heads
that share it, and every G goes through tl.dot with the rows padded to 16 (decode is memory-bound: the padded
rows cost nothing, while the broadcast-product path for G <= 4 ran at 0.16-0.38x SDPA on the H200,
gpu/2026-11-28). A tile is BLOCK_N keys (64-128) gathered from BLOCK_N / page_size pages of the block table.

When a step's queries of one (sequence, KV head) fit one tile (decode steps, short chunks), the context is
split as in flash-decoding: the grid gets n_splits programs per (sequence, KV head), split s takes the s-th
share of that sequence's own keys (sized from its length, read on the device), and writes an fp32 partial
output with its log-sum-exp; `_merge_kernel` combines the splits. n_splits depends only on host-known sizes
(batch, KV heads, table width), so a decode step is CUDA-graph capturable and still spreads a short and a long
sequence alike over the whole GPU.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention import LOG2_E, attend_tile
from .hardware import dot_precision, sm_count

MAX_SPLITS = 64
WAVES = 4  # split until (sequences × KV heads × splits) programs cover the SMs this many times


@triton.jit(do_not_specialize=["max_tiles", "n_splits"])
def _paged_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    seq_lens_ptr,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_osplit,
    stride_lt,
    stride_lh,
    stride_bt,
    qk_scale,
    max_tiles,
    n_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid (tiles · splits, Hkv, B), last tiles first: under the causal mask they see the most keys.
    tile = max_tiles - 1 - tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    kv_head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    q_len = (tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)).to(tl.int32)
    if tile * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    cached = seq_len - q_len  # keys before the first query of this step

    # Row r of the tile is packed row p = tile·BLOCK_M + r: token p // G, query head kv_head·G + p % G.
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    mask_rows = tokens < q_len
    query_pos = cached + tokens
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = q_ptr + (q_start + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    # The keys any row of the tile sees, then this split's share of them, in whole tiles.
    first_pos = cached + (tile * BLOCK_M) // GROUP
    key_end = tl.minimum(cached + (tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1, seq_len)
    share = tl.cdiv(tl.cdiv(key_end, n_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    hi = tl.minimum(lo + share, key_end)
    # Keys up to the tile's first query are visible to every row: whole tiles of them need no mask.
    band_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq * stride_bt
    k_head = k_ptr + kv_head * stride_kh + offs_d[None, :]
    v_head = v_ptr + kv_head * stride_vh + offs_d[None, :]
    for n0 in range(lo, band_end, BLOCK_N):
        keys = n0 + offs_n
        pages = tl.load(table + keys // PAGE).to(tl.int64)  # each key's page (int64: pools past 2^31 elements)
        slot = (keys % PAGE)[:, None]
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_head + pages[:, None] * stride_kp + slot * stride_ks,
            v_head + pages[:, None] * stride_vp + slot * stride_vs, mask_d[None, :], None, qk_scale, False,
            DOT_PRECISION,
        )  # fmt: skip
    # Diagonal and tail: keys some rows may not see, or past the split's end.
    for n0 in range(band_end, hi, BLOCK_N):
        keys = n0 + offs_n
        mask_keys = keys < hi
        pages = tl.load(table + keys // PAGE, mask=mask_keys, other=0).to(tl.int64)
        slot = (keys % PAGE)[:, None]
        visible = mask_keys[None, :] & (keys[None, :] <= query_pos[:, None])
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_head + pages[:, None] * stride_kp + slot * stride_ks,
            v_head + pages[:, None] * stride_vp + slot * stride_vs, mask_keys[:, None] & mask_d[None, :], visible,
            qk_scale, True, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split: 0, not NaN
    mask_out = mask_rows[:, None] & mask_d[None, :]
    o_ptrs = out_ptr + (q_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:
        tl.store(o_ptrs + split.to(tl.int64) * stride_osplit, out, mask=mask_out)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # base 2
        tl.store(lse_ptr + (q_start + tokens) * stride_lt + heads * stride_lh + split, lse, mask=mask_rows)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _merge_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    n_splits,
    stride_pt,
    stride_ph,
    stride_psplit,
    stride_lt,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[t, h] = Σ_s 2^(lse_s - max) · partial_s / Σ_s 2^(lse_s - max): the softmax over all keys again."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s, mask_d = s < n_splits, offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh + s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits: 2^-inf = 0
    p_ptrs = partial_ptr + token * stride_pt + head * stride_ph + s[:, None] * stride_psplit + offs_d[None, :]
    partial = tl.load(p_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@dataclass(eq=False)
class PagedAttentionMetadata:
    """One engine step as attention sees it: built once per step, read by every layer (vLLM's AttentionMetadata).

    block_tables [B, max_pages] int32: sequence b's pages in order (entries past its own pages are ignored);
    cu_seqlens [B+1] int32: its queries are rows cu_seqlens[b]:cu_seqlens[b+1] of q;
    seq_lens [B] int32: its cached tokens, this step's included;
    max_query_len: the longest run of queries (sizes the grid without a device read).
    """

    block_tables: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    _scratch: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    def scratch(self, n_tokens: int, n_heads: int, n_splits: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 partial outputs [N, Hq, splits, D] and log-sum-exps [N, Hq, splits] for split attention, one
        pair per split count, shared by the layers of the step (under a CUDA graph: allocated at capture)."""
        key = (n_tokens, n_heads, n_splits, head_dim)
        if key not in self._scratch:
            device = self.seq_lens.device
            partial = torch.empty(n_tokens, n_heads, n_splits, head_dim, dtype=torch.float32, device=device)
            lse = torch.empty(n_tokens, n_heads, n_splits, dtype=torch.float32, device=device)
            self._scratch[key] = (partial, lse)
        return self._scratch[key]

    @functools.cached_property
    def host(self) -> _HostView:
        """The step's bounds on the host, read once per step (the plain-torch path's loops need them)."""
        bounds = self.cu_seqlens.tolist()
        return _HostView(bounds, [e - s for s, e in itertools.pairwise(bounds)], self.seq_lens.tolist(),
                         self.block_tables.tolist())  # fmt: skip


@dataclass(frozen=True)
class _HostView:
    bounds: list[int]
    q_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]


def _check(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedAttentionMetadata) -> None:
    n_heads, head_dim = q.shape[1:]
    if k_pages.shape != v_pages.shape or k_pages.dim() != 4 or k_pages.shape[3] != head_dim:
        raise ValueError(f"attention_paged: q {tuple(q.shape)} does not fit pages k {tuple(k_pages.shape)}, "
                         f"v {tuple(v_pages.shape)} (expected [pages, page_size, Hkv, {head_dim}])")  # fmt: skip
    if n_heads % k_pages.shape[2]:
        raise ValueError(f"attention_paged: {n_heads} query heads are not a multiple of {k_pages.shape[2]} KV heads")
    n_seqs, tables = meta.batch_size, meta.block_tables
    if meta.cu_seqlens.shape != (n_seqs + 1,) or tables.dim() != 2 or tables.shape[0] < n_seqs:
        raise ValueError(f"attention_paged: cu_seqlens {tuple(meta.cu_seqlens.shape)}, block_tables "
                         f"{tuple(tables.shape)} and seq_lens {tuple(meta.seq_lens.shape)} "
                         "disagree on the batch")  # fmt: skip


def split_count(programs: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits of the context for `programs` (sequence, KV head) pairs whose tables hold `capacity` keys: enough
    to cover the SMs WAVES times, never more than the capacity has tiles."""
    return max(1, min(MAX_SPLITS, triton.cdiv(capacity, block_n), triton.cdiv(WAVES * sm_count(device), programs)))


def attention_paged_triton(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedAttentionMetadata
) -> torch.Tensor:
    """q [N, Hq, D]; k/v pages [P, page_size, Hkv, D] -> [N, Hq, D]. No device read: CUDA-graph capturable."""
    _check(q, k_pages, v_pages, meta)
    n_heads, head_dim = q.shape[1:]
    page, n_kv = k_pages.shape[1], k_pages.shape[2]
    if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("attention_paged: the pages' head dimension must be contiguous")
    group = n_heads // n_kv
    out = torch.empty_like(q)
    n_seqs, max_query_len = meta.batch_size, meta.max_query_len
    if q.shape[0] == 0 or n_seqs == 0 or max_query_len <= 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, min(128 if head_dim <= 128 else 64, triton.next_power_of_2(max_query_len * group)))
    block_n = 64 if block_d >= 128 else 128  # 64-128 keys per tile: bytes in flight for a memory-bound loop
    max_tiles = triton.cdiv(max_query_len * group, block_m)
    capacity = meta.block_tables.shape[1] * page
    n_splits = split_count(n_seqs * n_kv, capacity, block_n, q.device) if max_tiles == 1 else 1
    if n_splits > 1:
        partial, lse = meta.scratch(q.shape[0], n_heads, n_splits, head_dim)
        lse_strides = lse.stride(0), lse.stride(1)
    else:
        partial, lse, lse_strides = out, out, (0, 0)  # lse unused
    _paged_kernel[(max_tiles * n_splits, n_kv, n_seqs)](
        q, k_pages, v_pages, partial, lse, meta.block_tables, meta.cu_seqlens, meta.seq_lens,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2) if n_splits > 1 else 0, *lse_strides,
        meta.block_tables.stride(0), LOG2_E / head_dim**0.5, max_tiles, n_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page,
        SPLIT=n_splits > 1, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4, num_stages=2 if block_m >= 128 else 3,
    )  # fmt: skip
    if n_splits > 1:
        _merge_kernel[(q.shape[0], n_heads)](
            partial, lse, out, n_splits,
            partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits),
        )  # fmt: skip
    return out


def attention_paged_reference(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedAttentionMetadata
) -> torch.Tensor:
    """Same contract as attention_paged_triton, in plain torch (the CPU serving path).

    Decode queries (one per sequence) go through one batched SDPA with a length mask; each sequence with a longer
    chunk gets its own SDPA with the shifted causal mask. K/V are read in place where a sequence's pages are
    consecutive (the CPU cache gives each request one page: PagedKVCache.page_size_for), and gathered otherwise.
    Slots that the masks hide must hold finite values (0 · NaN = NaN): a sequence's own pages are zeroed when it
    gets them (PagedKVCache.allocate), and table entries past its pages are redirected to its first page.
    """
    _check(q, k_pages, v_pages, meta)
    out = torch.empty_like(q)
    n_heads, head_dim = q.shape[1:]
    n_kv = k_pages.shape[2]
    host = meta.host
    single = [b for b, n in enumerate(host.q_lens) if n == 1]
    if single:
        longest = max(host.seq_lens[b] for b in single)
        everyone = len(single) == q.shape[0]  # a decode-only step: q rows are the sequences in order
        qg = q if everyone else q[torch.tensor([host.bounds[b] for b in single], device=q.device)]
        qg = qg.view(len(single), n_kv, n_heads // n_kv, head_dim)  # GQA as grouped rows: (Bs, Hkv, G, D)
        lengths = [host.seq_lens[b] for b in single]
        k, v, qg, lengths, order = _decode_keys(k_pages, v_pages, qg, lengths, [host.tables[b] for b in single],
                                                longest)  # fmt: skip
        visible = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        attended = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :])
        attended = (attended if order is None else attended[order]).reshape(len(single), n_heads, head_dim)
        if everyone:
            return attended
        out[torch.tensor([host.bounds[b] for b in single], device=q.device)] = attended
    for b, n in enumerate(host.q_lens):
        if n <= 1:
            continue
        length, start = host.seq_lens[b], host.bounds[b]
        k = sequence_keys(k_pages, host.tables[b], length).transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = sequence_keys(v_pages, host.tables[b], length).transpose(0, 1)[None]
        qs = q[start : start + n].transpose(0, 1)[None]  # (1, Hq, n, D)
        positions = torch.arange(length - n, length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # (n, L)
        attended = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible, enable_gqa=True)
        out[start : start + n] = attended[0].transpose(0, 1)
    return out


def sequence_keys(pages: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence, [length, Hkv, D]: a view of the pool when its pages
    are consecutive, else a copy of the pages that hold them."""
    n = -(-length // pages.shape[1])
    first = table[0]
    if table[:n] == list(range(first, first + n)):
        return pages[first : first + n].flatten(0, 1)[:length]
    used = torch.tensor(table[:n], device=pages.device)
    return pages.index_select(0, used).flatten(0, 1)[:length]


def _decode_keys(k_pages, v_pages, qg, lengths, tables, longest):
    """K/V [rows, Hkv, longest, D] for the batched decode SDPA, with the queries and lengths of those rows, and
    the rows' order back to the sequences' (None: the same).

    When every sequence lies in one page (the CPU cache's layout) and their pages span few more than there are
    sequences, the K/V are the pool's pages lo..hi in place: a page in that span with no query this step gets a
    zero query and a length of 1, and its row is dropped. Otherwise what is read is copied out of the pages."""
    page, n = k_pages.shape[1], len(tables)
    if longest <= page:
        firsts = [t[0] for t in tables]
        lo, hi = min(firsts), max(firsts) + 1
        if hi - lo >= 2 * n:  # scattered: copy the n pages' first `longest` slots
            index = torch.tensor(firsts, device=qg.device)
            return k_pages[index, :longest].transpose(1, 2), v_pages[index, :longest].transpose(1, 2), qg, lengths, None
        k = k_pages[lo:hi, :longest].transpose(1, 2)  # (hi - lo, Hkv, longest, D), a view
        v = v_pages[lo:hi, :longest].transpose(1, 2)
        if firsts == list(range(lo, hi)):
            return k, v, qg, lengths, None
        index = torch.tensor(firsts, device=qg.device) - lo
        scattered = qg.new_zeros(hi - lo, *qg.shape[1:])
        scattered[index] = qg
        span_lengths = [1] * (hi - lo)
        for f, length in zip(firsts, lengths):
            span_lengths[f - lo] = length
        return k, v, scattered, span_lengths, index
    # Several pages each: gather them. A shorter sequence's table ends before the longest one's: read its first
    # page there instead (the length mask hides it), never a page it does not own.
    width = -(-longest // page)
    rows = []
    for t, length in zip(tables, lengths):
        own = t[: max(1, -(-length // page))]
        rows.append(own + [own[0]] * (width - len(own)))
    table = torch.tensor(rows, device=qg.device).flatten()
    k = k_pages.index_select(0, table).view(n, width * page, *k_pages.shape[2:])[:, :longest]
    v = v_pages.index_select(0, table).view(n, width * page, *v_pages.shape[2:])[:, :longest]
    return k.transpose(1, 2), v.transpose(1, 2), qg, lengths, None
