"""Decode attention: one new query per sequence against that layer's KV cache, split over the context.

q [B, Hq, D] against k_cache/v_cache [B, Hkv, S, D], of which the first seq_lens[b] positions are valid.
Decode is bound by reading the cache (about G FLOP per KV byte), so the work is spread over the context
(split-K, as flash-decoding does): grid (B, Hkv, splits), each program reads its slice of one KV head once
for all G query heads of the group, keeps an fp32 partial output and its log-sum-exp, and a second small
kernel merges the splits. With enough (B, Hkv) programs to fill the GPU there is one split and the first
kernel writes the output directly.

The split count follows the cache's capacity S, not the live lengths, so the launch never reads seq_lens
on the host (one sync less, and CUDA-graph capturable); splits past a sequence's length run no loop
iteration and their log-sum-exp of -inf gets weight 0 in the merge. A sequence of length 0 gets zeros.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention import LOG2_E, attend_tile
from .hardware import dot_precision, sm_count

MAX_SPLITS = 64


@triton.jit(do_not_specialize=["split_size"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_osplit,
    stride_lb,
    stride_lh,
    qk_scale,
    split_size,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + batch).to(tl.int64)
    start = split.to(tl.int64) * split_size
    end = tl.minimum(start + split_size, seq_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g  # the G query heads of this KV head, padded to GROUP_PAD rows
    offs_d = tl.arange(0, BLOCK_D)
    mask_g, mask_d = g < GROUP, offs_d < HEAD_DIM
    q_ptrs = q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # (GROUP_PAD, BLOCK_D)

    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n  # int64: S·D past 2^31 at 128k contexts with large batches
        mask_keys = keys < end
        k_ptrs = k_base + keys[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + keys[:, None] * stride_vs + offs_d[None, :]
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_ptrs, v_ptrs, mask_keys[:, None] & mask_d[None, :], mask_keys[None, :], qk_scale,
            True, USE_DOT, DOT_PRECISION,
        )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split or sequence: 0, not NaN
    mask_out = mask_g[:, None] & mask_d[None, :]
    o_ptrs = out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if DIRECT:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.store(o_ptrs + split.to(tl.int64) * stride_osplit, out, mask=mask_out)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # base 2
        tl.store(lse_ptr + batch * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _merge_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    n_splits,
    stride_pb,
    stride_ph,
    stride_psplit,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[b, h] = Σ_s 2^(lse_s - max) · partial_s / Σ_s 2^(lse_s - max): the softmax over all keys again."""
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s, mask_d = s < n_splits, offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + batch * stride_lb + head * stride_lh + s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits: 2^-inf = 0
    p_ptrs = partial_ptr + batch * stride_pb + head * stride_ph + s[:, None] * stride_psplit + offs_d[None, :]
    partial = tl.load(p_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def attention_decode_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] int32 -> out [B, Hq, D]."""
    batch, n_heads, head_dim = q.shape
    _, n_kv, capacity, _ = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] < batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"attention_decode: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")  # fmt: skip
    if n_heads % n_kv:
        raise ValueError(f"attention_decode: {n_heads} query heads are not a multiple of {n_kv} KV heads")
    if seq_lens.shape != (batch,):
        raise ValueError(f"attention_decode: seq_lens must have shape ({batch},), got {tuple(seq_lens.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention_decode: the caches' head dimension must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = n_heads // n_kv
    use_dot = group > 4  # tensor cores pay off past G = 4 (REFERENCE.md); below, padding to 16 rows wastes them
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Without tl.dot the (rows, keys, D) product lives in registers: keep it at 64·128 elements.
    block_n = 64 if use_dot else max(16, 64 // group_pad)

    tiles = triton.cdiv(capacity, block_n)
    splits = min(tiles, MAX_SPLITS, triton.cdiv(2 * sm_count(q.device), batch * n_kv))
    split_size = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(capacity, split_size)
    direct = splits == 1
    if direct:
        partial, lse = out, out  # lse unused
        stride_lb = stride_lh = stride_psplit = 0
    else:
        partial = torch.empty(batch, n_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
        stride_lb, stride_lh, stride_psplit = lse.stride(0), lse.stride(1), partial.stride(2)
    _decode_kernel[(batch, n_kv, splits)](
        q, k_cache, v_cache, seq_lens, partial, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        partial.stride(0), partial.stride(1), stride_psplit, stride_lb, stride_lh,
        LOG2_E / head_dim**0.5, split_size,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        USE_DOT=use_dot, DIRECT=direct, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    if not direct:
        _merge_kernel[(batch, n_heads)](
            partial, lse, out, splits,
            partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out


def attention_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] int32 -> out [B, Hq, D].

    A sequence of length 0 attends to nothing and gets zeros (as the Triton kernel gives), not NaN.
    """
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    # Only the longest live context is read: the rest of the static cache is empty.
    longest = int(seq_lens.max()) if batch else 0
    shortest = longest if batch <= 1 else int(seq_lens.min())
    k, v = k_cache[:, :, :longest].float(), v_cache[:, :, :longest].float()  # (B, Hkv, L, D)
    # GQA as grouped rows: the G query heads of KV head j are G query rows against that head's cache.
    qg = q.view(batch, n_kv, n_heads // n_kv, head_dim).float()  # (B, Hkv, G, D)
    mask = None
    if shortest < longest:
        mask = (torch.arange(longest, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]  # (B,1,1,L)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    if shortest == 0:
        out = out.nan_to_num(0.0)
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)
