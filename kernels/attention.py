"""Causal attention over the heterogeneous runtime's layouts, with grouped-query attention (GQA).

- prefill: a packed variable-length batch (flash-attn varlen layout): q [T, Hq, D], k/v [T, Hkv, D] with
  sequence b at rows cu_seqlens[b]:cu_seqlens[b+1]; each sequence attends causally within itself.
- paged (attention_paged.py): an engine step's prefill chunks and decode tokens over the paged KV cache.

Hq must be a multiple of Hkv; query head h reads KV head h // G with G = Hq // Hkv, as in Hugging Face Llama.
Both Triton kernels pack GQA: a program owns one KV head and treats the G query heads that share it as G
query rows, so each K/V tile is read once for all of them. The layers of a Puzzle child have different
Hkv (8/4/2/1 in Nemotron-51B), hence different G: G is a compile-time constant, one compilation per G.
Softmax statistics are fp32 and in base 2 (exp2 of log2(e)-scaled scores), as in FlashAttention-2.
This file holds prefill (kernel, launcher, reference: the uncached forward that training and scoring run) and
the online-softmax step both kernels share.
"""

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .hardware import dot_precision, launch_flags, wait_for_inputs

LOG2_E = 1.4426950408889634


@triton.jit
def attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_ptrs,
    v_ptrs,
    mask_kv,
    visible,
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of query rows q [R, D] (R >= 16, tl.dot's smallest tile) over a K/V tile of
    BLOCK_N keys -> (acc, m_i, l_i)."""
    # In q's dtype: FP8 cache pages widen exactly to bf16/fp16 (their scales are applied outside the loop).
    k = tl.load(k_ptrs, mask=mask_kv, other=0.0).to(q.dtype)  # (BLOCK_N, D)
    v = tl.load(v_ptrs, mask=mask_kv, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (R, BLOCK_N), log2 units
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit(do_not_specialize=["max_tiles"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_seqlens_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    max_tiles,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # Grid (tiles, Hkv, B). The last tiles of a sequence see the most keys under the causal mask: launch them
    # first so the long programs are not the stragglers.
    tile = max_tiles - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)).to(tl.int32)
    if tile * BLOCK_M >= seq_len * GROUP:
        return

    # Row r of the tile is packed row p = tile·BLOCK_M + r: token p // G, query head kv_head·G + p % G.
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    mask_rows = tokens < seq_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = q_ptr + (start + tokens)[:, None] * stride_qt + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    kv_row = k_ptr + start * stride_kt + kv_head.to(tl.int64) * stride_kh
    vv_row = v_ptr + start * stride_vt + kv_head.to(tl.int64) * stride_vh
    if CAUSAL:
        first_token = (tile * BLOCK_M) // GROUP
        key_end = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1, seq_len)
        # Keys before the tile's first token are visible to every row: no mask (off-band stage).
        band_end = (first_token // BLOCK_N) * BLOCK_N
        diagonal_start = band_end
        if WINDOW > 0:  # keys before the first row's window are skipped; every tile is masked
            band_end = 0
            diagonal_start = tl.maximum(first_token - WINDOW + 1, 0)
    else:
        key_end = seq_len
        band_end = (seq_len // BLOCK_N) * BLOCK_N
        diagonal_start = band_end
    for n0 in range(0, band_end, BLOCK_N):
        keys = (n0 + offs_n).to(tl.int64)
        k_ptrs = kv_row + keys[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = vv_row + keys[:, None] * stride_vt + offs_d[None, :]
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_ptrs, v_ptrs, mask_d[None, :], None, qk_scale, False, DOT_PRECISION
        )
    # Diagonal stage: keys that some rows of the tile may not see.
    for n0 in range(diagonal_start, key_end, BLOCK_N):
        keys = n0 + offs_n
        mask_keys = keys < key_end
        visible = mask_keys[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= tokens[:, None])
        if WINDOW > 0:
            visible = visible & (keys[None, :] > tokens[:, None] - WINDOW)
        k_ptrs = kv_row + keys.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = vv_row + keys.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_ptrs,
            v_ptrs,
            mask_keys[:, None] & mask_d[None, :],
            visible,
            qk_scale,
            True,
            DOT_PRECISION,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + (start + tokens)[:, None] * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


def attention_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    max_seqlen: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> out [T, Hq, D].

    max_seqlen (the longest sequence) sizes the grid; given, it saves a device-to-host read of cu_seqlens.
    window: the query at position p sees keys p - window + 1 .. p.
    """
    check_window(window, causal)
    tokens, n_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != head_dim or not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"attention_prefill: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, "
            f"v {tuple(v.shape)} {v.dtype} do not agree"
        )
    if n_heads % k.shape[1]:
        raise ValueError(f"attention_prefill: {n_heads} query heads are not a multiple of {k.shape[1]} KV heads")
    group = n_heads // k.shape[1]
    # The kernel steps through the head dimension one by one: rows of other strides are made contiguous.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_seqs = cu_seqlens.shape[0] - 1
    if tokens == 0 or n_seqs <= 0:
        return out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    block_m, block_n = (128, 64) if head_dim <= 128 else (64, 32)
    max_tiles = triton.cdiv(max_seqlen * group, block_m)
    if max_tiles == 0:
        return out
    grid = (max_tiles, k.shape[1], n_seqs)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens.to(torch.int32),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        LOG2_E / head_dim**0.5,
        max_tiles,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=causal,
        WINDOW=window or 0,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4,
        num_stages=2,
        **launch_flags(q.device),
    )
    return out


def check_window(window: int | None, causal: bool = True) -> None:
    if window is not None and (not causal or window < 1):
        raise ValueError(f"attention window {window}: expected a causal attention and a window >= 1")


def first_page_read(query_pos: int, window: int | None, page: int) -> int:
    """The first KV page a query at `query_pos` reads: the page of its first visible key (p - window + 1; the
    first page without a window). The cache keeps these pages and the paged kernels start their reads there."""
    return 0 if window is None else max(0, query_pos - window + 1) // page


def window_mask(query_pos: torch.Tensor, key_end: int, window: int | None) -> torch.Tensor:
    """[n, key_end] bool: key j is visible to the query at position p when j <= p (and p - j < window)."""
    keys = torch.arange(key_end, device=query_pos.device)[None, :]
    visible = keys <= query_pos[:, None]
    return visible if window is None else visible & (keys > query_pos[:, None] - window)


def attention_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> out [T, Hq, D]."""
    check_window(window, causal)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        # 4-D (1, H, L, D): only then may SDPA pick a fused kernel; with enable_gqa it reads each KV head
        # once for its G query heads (1.7x the repeat_interleave version: fp32, L = 256, 2-core Xeon dev VM).
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        if window is not None and end - start > window:
            mask = window_mask(torch.arange(end - start, device=q.device), end - start, window)
            attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        else:  # a window no shorter than the sequence hides nothing the causal mask does not
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1)
    return out
