"""Paged attention for the serving engine: any mix of prefill chunks and decode tokens over a paged KV cache.

The serving engine keeps every layer's K/V in a pool of fixed-size pages (vLLM's PagedAttention layout,
[pages, page_size, Hkv, D] per layer); sequence b owns the pages listed in block_tables[b]. One step of the
engine packs, for each running sequence, the tokens whose K/V are not yet cached: one token for a sequence
that is decoding, a chunk of its prompt for one that is prefilling. Their K/V are written to the pool first;
then query i of sequence b (q_len_b queries, seq_lens[b] tokens cached in all) sits at position
seq_lens[b] - q_len_b + i and attends to every cached key up to and including it. Decode (q_len 1), a whole
prompt (no keys before it) and a later chunk of a long prompt are the same computation, so one launch serves
a mixed step (vLLM's unified attention, Sarathi's chunked prefill).

The Triton kernel is the prefill kernel's tiling (attention.py) with two changes: K/V tiles are whole pages
looked up in the block table, and the causal diagonal is shifted by the keys cached before the chunk. A
program owns BLOCK_M packed (token, query head) rows of one sequence and one KV head, so each page is read
once for the G query heads that share it. Decode-only steps use BLOCK_M = 16 (the smallest tl.dot tile) and
no split over the context; at long contexts and small batches the split-K decode kernel of attention_decode.py
parallelises better, and splitting this kernel the same way is left for the GPU tuning pass.
"""

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention import LOG2_E, attend_tile
from .hardware import dot_precision


@triton.jit(do_not_specialize=["max_tiles"])
def _paged_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
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
    stride_bt,
    qk_scale,
    max_tiles,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAGE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid (tiles, Hkv, B), last tiles first: under the causal mask they see the most keys.
    tile = max_tiles - 1 - tl.program_id(0)
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

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_n = tl.arange(0, PAGE)
    table = block_tables_ptr + seq * stride_bt
    k_head = k_ptr + kv_head * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_head = v_ptr + kv_head * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    first_pos = cached + (tile * BLOCK_M) // GROUP
    key_end = tl.minimum(cached + (tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1, seq_len)
    # Pages wholly before the tile's first query are visible to every row: no mask (off-band stage).
    band_end = (first_pos // PAGE) * PAGE
    for n0 in range(0, band_end, PAGE):
        page = tl.load(table + n0 // PAGE).to(tl.int64)
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_head + page * stride_kp, v_head + page * stride_vp, mask_d[None, :], None,
            qk_scale, False, True, DOT_PRECISION,
        )  # fmt: skip
    # Diagonal stage: pages that some rows of the tile may not see, the last possibly part-filled.
    for n0 in range(band_end, key_end, PAGE):
        page = tl.load(table + n0 // PAGE).to(tl.int64)
        keys = n0 + offs_n
        mask_keys = keys < key_end
        visible = mask_keys[None, :] & (keys[None, :] <= query_pos[:, None])
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_head + page * stride_kp, v_head + page * stride_vp,
            mask_keys[:, None] & mask_d[None, :], visible, qk_scale, True, True, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + (q_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


def _check(q, k_pages, v_pages, block_tables, cu_seqlens, seq_lens) -> None:
    n_heads, head_dim = q.shape[1:]
    if k_pages.shape != v_pages.shape or k_pages.dim() != 4 or k_pages.shape[3] != head_dim:
        raise ValueError(f"attention_paged: q {tuple(q.shape)} does not fit pages k {tuple(k_pages.shape)}, "
                         f"v {tuple(v_pages.shape)} (expected [pages, page_size, Hkv, {head_dim}])")  # fmt: skip
    if n_heads % k_pages.shape[2]:
        raise ValueError(f"attention_paged: {n_heads} query heads are not a multiple of {k_pages.shape[2]} KV heads")
    n_seqs = seq_lens.shape[0]
    if cu_seqlens.shape != (n_seqs + 1,) or block_tables.dim() != 2 or block_tables.shape[0] < n_seqs:
        raise ValueError(f"attention_paged: cu_seqlens {tuple(cu_seqlens.shape)}, block_tables "
                         f"{tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} "
                         "disagree on the batch")  # fmt: skip


def attention_paged_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
) -> torch.Tensor:
    """q [N, Hq, D]; k/v pages [P, page_size, Hkv, D]; block_tables [B, max_pages] int32; cu_seqlens [B+1]
    int32 (the queries of each sequence); seq_lens [B] int32 (cached tokens, these queries included).

    max_query_len sizes the grid without a device read (CUDA-graph capturable).
    """
    _check(q, k_pages, v_pages, block_tables, cu_seqlens, seq_lens)
    n_heads, head_dim = q.shape[1:]
    page, n_kv = k_pages.shape[1], k_pages.shape[2]
    if page < 16 or page & (page - 1):
        raise ValueError(f"attention_paged: the Triton kernel needs a power-of-two page size >= 16, got {page}")
    if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("attention_paged: the pages' head dimension must be contiguous")
    group = n_heads // n_kv
    out = torch.empty_like(q)
    n_seqs = seq_lens.shape[0]
    if q.shape[0] == 0 or n_seqs == 0 or max_query_len <= 0:
        return out
    block_m = max(16, min(128 if head_dim <= 128 else 64, triton.next_power_of_2(max_query_len * group)))
    max_tiles = triton.cdiv(max_query_len * group, block_m)
    _paged_kernel[(max_tiles, n_kv, n_seqs)](
        q, k_pages, v_pages, out, block_tables, cu_seqlens, seq_lens,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        LOG2_E / head_dim**0.5, max_tiles,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m,
        PAGE=page, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )  # fmt: skip
    return out


def gather_pages(pages: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of the sequences whose page lists are table [..., max_pages]:
    [..., length, Hkv, D] (a copy; only the pages that hold them are read)."""
    page = pages.shape[1]
    used = table[..., : -(-length // page)].long()
    gathered = pages.index_select(0, used.flatten()).view(*used.shape, *pages.shape[1:])  # (..., n_pages, page, Hkv, D)
    return gathered.flatten(-4, -3)[..., :length, :, :]


def attention_paged_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int | None = None,
    rows: torch.Tensor | None = None,
    row_pages: int = 0,
) -> torch.Tensor:
    """Same contract as attention_paged_triton, in plain torch (the CPU serving path).

    Decode rows (one query each) go through one batched SDPA with a length mask; each sequence with a longer
    chunk gets its own SDPA with the shifted causal mask. max_query_len is unused (the bounds are read from
    cu_seqlens on the host).

    rows [B] int64, with row_pages: every sequence's pages are the whole row rows[b], i.e. pages
    1 + rows[b] · row_pages onward in order (PagedKVCache with rows). K/V are then read in place, and the decode
    rows' batch is the pool's rows lo..hi at their fixed stride, instead of gathered pages: gathering copies all
    the K/V a step reads (README, Serving, has the step times of both).
    """
    _check(q, k_pages, v_pages, block_tables, cu_seqlens, seq_lens)
    out = torch.empty_like(q)
    n_heads, head_dim = q.shape[1:]
    n_kv, page = k_pages.shape[2], k_pages.shape[1]
    group = n_heads // n_kv
    bounds, lens = cu_seqlens.tolist(), seq_lens.tolist()
    q_lens = [e - s for s, e in itertools.pairwise(bounds)]
    row_list = rows.tolist() if rows is not None else None

    def keys(pages: torch.Tensor, b: int, length: int) -> torch.Tensor:  # (length, Hkv, D) of sequence b
        if row_list is None:
            return gather_pages(pages, block_tables[b], length)
        return _row_view(pages, row_list[b], row_list[b] + 1, row_pages)[0, :length]

    single = [b for b, n in enumerate(q_lens) if n == 1]
    seq_rows = [row_list[b] for b in single] if row_list is not None else []
    if seq_rows and seq_rows == list(range(seq_rows[0], seq_rows[0] + len(single))) and len(single) == q.shape[0]:
        # The steady decode step: one query per sequence, their rows consecutive (the engine orders them by
        # row). Nothing is indexed or copied: q, the rows and the output are views.
        lo, longest = seq_rows[0], max(lens)
        qg = q.view(len(single), n_kv, group, head_dim)  # GQA as grouped rows, as below
        k = _row_view(k_pages, lo, lo + len(single), row_pages)[:, :longest].transpose(1, 2)
        v = _row_view(v_pages, lo, lo + len(single), row_pages)[:, :longest].transpose(1, 2)
        visible = torch.arange(longest, device=q.device)[None, :] < seq_lens[:, None]
        attended = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :])
        return attended.view(q.shape)
    if single:
        idx = torch.tensor(single, device=q.device)
        at = torch.tensor([bounds[b] for b in single], device=q.device)
        longest = max(lens[b] for b in single)
        lengths = seq_lens[idx, None].long()
        # GQA as grouped rows: the G query heads of KV head j are G query rows against that head's keys.
        qg = q[at].view(len(single), n_kv, group, head_dim)  # (Bs, Hkv, G, D)
        if row_list is None:
            # A shorter sequence's table ends before the longest one's: its entries past its own pages point at
            # its first page, and the length mask hides them. The slots it reads past its length are its own
            # pages' unwritten (zeroed, PagedKVCache.allocate) slots or its own K/V: finite, so weight 0 keeps
            # them out.
            table = block_tables[idx, : -(-longest // page)]
            owned = torch.arange(table.shape[1], device=q.device)[None, :] * page < lengths
            table = torch.where(owned, table, table[:, :1])
            k = gather_pages(k_pages, table, longest).transpose(1, 2)  # (Bs, Hkv, L, D)
            v = gather_pages(v_pages, table, longest).transpose(1, 2)
            order = slice(None)
        else:
            # Rows lo..hi-1 at their stride, in place. A row with no decode query in this step gets a zero query
            # and a context of 1, and its output is dropped. A sequence's own row holds its K/V, then zeros
            # (allocate zeroes a row as far as anything wrote to it), so what the mask hides is finite.
            lo, hi = min(seq_rows), max(seq_rows) + 1
            order = torch.tensor(seq_rows, device=q.device) - lo
            scattered = qg.new_zeros(hi - lo, n_kv, group, head_dim)
            scattered[order] = qg
            qg, all_lengths = scattered, lengths.new_ones(hi - lo, 1)
            all_lengths[order] = lengths
            lengths = all_lengths
            k = _row_view(k_pages, lo, hi, row_pages)[:, :longest].transpose(1, 2)
            v = _row_view(v_pages, lo, hi, row_pages)[:, :longest].transpose(1, 2)
        visible = torch.arange(longest, device=q.device)[None, :] < lengths  # (rows, L)
        attended = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :])
        out[at] = attended[order].reshape(len(single), n_heads, head_dim)
    for b, n in enumerate(q_lens):
        if n <= 1:
            continue
        length, start = lens[b], bounds[b]
        k = keys(k_pages, b, length).transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = keys(v_pages, b, length).transpose(0, 1)[None]
        qs = q[start : start + n].transpose(0, 1)[None]  # (1, Hq, n, D)
        positions = torch.arange(length - n, length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # (n, L)
        attended = F.scaled_dot_product_attention(qs, k, v, attn_mask=visible, enable_gqa=True)
        out[start : start + n] = attended[0].transpose(0, 1)
    return out


def _row_view(pages: torch.Tensor, first: int, last: int, row_pages: int) -> torch.Tensor:
    """Rows first..last-1 of a pool whose pages 1.. are rows of row_pages pages: [rows, row tokens, Hkv, D]."""
    block = pages[1 + first * row_pages : 1 + last * row_pages]
    return block.view(last - first, row_pages * pages.shape[1], *pages.shape[2:])
