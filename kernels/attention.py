"""Causal attention over the heterogeneous runtime's layouts, with grouped-query attention (GQA).

- prefill: a packed variable-length batch (flash-attn varlen layout): q [T, Hq, D], k/v [T, Hkv, D] with
  sequence b at rows cu_seqlens[b]:cu_seqlens[b+1]; each sequence attends causally within itself.
- decode: one new query per sequence against that layer's KV cache [B, Hkv, S, D], of which the first
  seq_lens[b] positions are valid (the new token's K/V already written).

Hq must be a multiple of Hkv; query head h reads KV head h // (Hq // Hkv), as in Hugging Face Llama.
The plain-torch references below are the CPU path; the Triton kernels join them in the kernels issue.
"""

import itertools

import torch
import torch.nn.functional as F


def attention_prefill_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] int32 -> out [T, Hq, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    group = q.shape[1] // k.shape[1]
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, L, D)
        vs = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out


def attention_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] int32 -> out [B, Hq, D]."""
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
    return out.reshape(batch, n_heads, head_dim).to(q.dtype)
