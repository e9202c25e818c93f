"""Attention: tessera's paged attention (the op every served step runs) and its uncached varlen prefill vs
`F.scaled_dot_product_attention` (flash backend, `enable_gqa`) on a contiguous cache of the same lengths, on the
head layouts of real configs, head dim 128.

- decode (`attention_paged`, one query per sequence): K/V in 16-token pages in a shuffled order, as a busy
  engine's pool holds them; query/KV heads of Llama-3.1-8B (32/8, G = 4), Llama-3.1-70B (64/8, G = 8) and the
  per-layer KV heads of Nemotron-51B (64 query heads over 4, 2, 1 KV heads: G = 16, 32, 64). Memory-bound:
  bytes = the K and V cache read once. Goals (issue 14, H200): >= 1.3x SDPA and >= 80 % of the measured copy
  bandwidth at context >= 8192 for every G and batch 1, 16, 64; never below 1.0x anywhere in the table.
- decode over an FP8 cache (`--kv-cache-dtype fp8`, issue 20): the same op reading E4M3 pages with per-layer
  scales, against the same SDPA over the bf16 cache (the dequantized values, so outputs agree to bf16 rounding).
  Bytes = the FP8 cache read once (half of bf16's): the ratio to SDPA is what the halved bytes buy. Each FP8 case
  also runs with the tiles widened to fp16 and the bf16 queries cast to it ("fp16 dot",
  `kernels.fp8_in_f16`, off in the served path until these rows say it is faster).
- mixed step (`attention_paged`, decode tokens beside a new prompt's 512-token chunk, the step a busy engine runs
  when a request arrives): the decodes in a split launch of their own ahead of the chunk's (meta.decode_prefix,
  2026-11-30) against the one unsplit launch that served such steps before, same inputs. Bytes = the K/V read.
- prefill: causal, equal-length prompts, each one chunk: `attention_paged` over pages (how the engine prefills)
  and `attention_prefill` over packed tokens (the uncached forward of scoring). SDPA takes [B, H, L, D].
  Compute-bound: 2·B·Hq·L²·D FLOPs (half the square, causal). Goal: >= 1.0x SDPA's flash backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tessera import kernels
from tessera.kernels.fp8 import bytes_view, dequantize_kv_reference, quantize_kv_reference

from .harness import KernelCase

HEAD_DIM = 128
PAGE = 16  # the engine's page size on the GPU
HEADS = [  # (model, query heads, KV heads)
    ("llama-3.1-8b", 32, 8),
    ("llama-3.1-70b", 64, 8),
    ("nemotron-51b kv4", 64, 4),
    ("nemotron-51b kv2", 64, 2),
    ("nemotron-51b kv1", 64, 1),
]
DECODE = [(1, 8192), (1, 131072), (16, 8192), (64, 8192)]  # (batch, context)
PREFILL = [(1, 4096), (4, 2048), (1, 16384)]  # (batch, sequence length)
FP8_DECODE = [(1, 8192), (16, 8192), (64, 8192)]  # (batch, context) over an FP8 cache
MIXED = [(1, 8192), (16, 8192), (64, 8192)]  # (decode sequences, their context) beside one CHUNK-token prompt
CHUNK = 512


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backends: list[SDPBackend]):
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _sdpa_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[SDPBackend], str]:
    """Flash if it takes GQA on this torch and device; otherwise whatever SDPA picks (recorded)."""
    q = torch.randn(1, 8, 16, HEAD_DIM, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 16, HEAD_DIM, device=device, dtype=dtype)
    try:
        sdpa(q, kv, kv, True, [SDPBackend.FLASH_ATTENTION])
        return [SDPBackend.FLASH_ATTENTION], "F.scaled_dot_product_attention, flash backend, enable_gqa"
    except RuntimeError:
        every = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        return every, "F.scaled_dot_product_attention, default backend choice (flash refused), enable_gqa"


def _paged(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k/v [B, L, Hkv, D] copied onto 16-token pages in a shuffled order (page 0 left out, as the engine's
    scratch page): pages [1 + B·L/16, 16, Hkv, D] each, and the block tables [B, L/16]."""
    batch, length = k.shape[:2]
    n = length // PAGE
    order = torch.randperm(batch * n, generator=gen, device=k.device) + 1
    pools = []
    for x in (k, v):
        pool = torch.zeros(1 + batch * n, PAGE, *x.shape[2:], device=x.device, dtype=x.dtype)
        bytes_view(pool).index_copy_(0, order, bytes_view(x).reshape(batch * n, PAGE, *x.shape[2:]))
        pools.append(pool)
    return pools[0], pools[1], order.view(batch, n).to(torch.int32)


def _in_fp16(op: Callable[[], torch.Tensor]) -> torch.Tensor:
    with kernels.fp8_in_f16():
        return op()


def _decode_case(
    model, n_heads, n_kv, batch, context, device, dtype, baseline, fp8: bool = False, fp16_dot: bool = False
) -> KernelCase:
    gen = torch.Generator(device).manual_seed(batch * context + n_kv)
    q = torch.randn(batch, n_heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, context, n_kv, HEAD_DIM, device=device, dtype=dtype, generator=gen) for _ in range(2))
    scales = {}
    if fp8:  # E4M3 pages at a scale that spans unit-normal values; SDPA reads the values they stand for
        scales = {
            "k_scale": torch.full((1,), 4 / 448, device=device),
            "v_scale": torch.full((1,), 4 / 448, device=device),
        }
        k, v = quantize_kv_reference(k, scales["k_scale"]), quantize_kv_reference(v, scales["v_scale"])
    k_pages, v_pages, tables = _paged(k, v, gen)
    if fp8:
        k, v = (
            dequantize_kv_reference(k, scales["k_scale"], dtype),
            dequantize_kv_reference(v, scales["v_scale"], dtype),
        )
    k_cache, v_cache = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # SDPA's [B, Hkv, L, D]
    del k, v
    meta = kernels.PagedAttentionMetadata(
        tables,
        torch.arange(batch + 1, dtype=torch.int32, device=device),
        torch.full((batch,), context, dtype=torch.int32, device=device),
        1,
    )
    backends, name = baseline
    q4 = q.view(batch, n_heads, 1, HEAD_DIM)
    size = q.element_size()
    candidate = partial(kernels.attention_paged, q, k_pages, v_pages, meta, **scales)
    return KernelCase(
        op="attention_paged decode" + (" (FP8 cache, fp16 dot)" if fp16_dot else " (FP8 cache)" if fp8 else ""),
        shape={"model": model, "q_heads": n_heads, "kv_heads": n_kv, "batch": batch, "context": context},
        candidate=partial(_in_fp16, candidate) if fp16_dot else candidate,
        baseline=lambda: sdpa(q4, k_cache, v_cache, False, backends).view(batch, n_heads, HEAD_DIM),
        flops=4.0 * batch * n_heads * context * HEAD_DIM,
        bytes=(2 * batch * n_kv * context * k_pages.element_size() + 2 * batch * n_heads * size) * HEAD_DIM,
        tolerance=2e-2,  # bf16 P·V with P rounded to bf16 on both sides, in different orders
        baseline_name=name + ", contiguous cache",
    )


def _mixed_case(model, n_heads, n_kv, batch, context, chunk, device, dtype) -> KernelCase:
    gen = torch.Generator(device).manual_seed(batch * context + chunk)
    q = torch.randn(batch + chunk, n_heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    kv = [
        torch.randn(n, length, n_kv, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        for n, length in ((batch, context), (batch, context), (1, chunk), (1, chunk))
    ]
    k_dec, v_dec, decode_tables = _paged(kv[0], kv[1], gen)
    k_new, v_new, chunk_table = _paged(kv[2], kv[3], gen)
    k_pages, v_pages = torch.cat([k_dec, k_new[1:]]), torch.cat([v_dec, v_new[1:]])  # one pool: the chunk's after
    tables = torch.zeros(batch + 1, decode_tables.shape[1], dtype=torch.int32, device=device)
    tables[:batch] = decode_tables
    tables[batch, : chunk_table.shape[1]] = chunk_table[0] + k_dec.shape[0] - 1
    cu = torch.tensor([*range(batch + 1), batch + chunk], dtype=torch.int32, device=device)
    lens = torch.tensor([context] * batch + [chunk], dtype=torch.int32, device=device)

    def step(decode_prefix: int) -> torch.Tensor:  # new metadata a call, as each engine step builds its own
        meta = kernels.PagedAttentionMetadata(tables, cu, lens, chunk, decode_prefix)
        return kernels.attention_paged(q, k_pages, v_pages, meta)

    return KernelCase(
        op=f"attention_paged mixed step (decodes + a {chunk}-token prompt)",
        shape={"model": model, "q_heads": n_heads, "kv_heads": n_kv, "batch": batch, "context": context},
        candidate=partial(step, batch),
        baseline=partial(step, 0),
        flops=4.0 * batch * n_heads * context * HEAD_DIM + 2.0 * n_heads * chunk * chunk * HEAD_DIM,
        bytes=2 * (batch * context + chunk) * n_kv * HEAD_DIM * k_pages.element_size(),
        tolerance=2e-2,  # the split's fp32 partials merged against one pass: bf16 rounding apart
        baseline_name="attention_paged in one launch, the decodes unsplit (before 2026-11-30)",
    )


def _prefill_cases(model, n_heads, n_kv, batch, length, device, dtype, baseline) -> Iterator[KernelCase]:
    gen = torch.Generator(device).manual_seed(batch * length + n_kv)
    tokens = batch * length
    q = torch.randn(tokens, n_heads, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(tokens, n_kv, HEAD_DIM, device=device, dtype=dtype, generator=gen) for _ in range(2))
    cu_seqlens = torch.arange(0, tokens + 1, length, dtype=torch.int32, device=device)
    k_pages, v_pages, tables = _paged(k.view(batch, length, n_kv, HEAD_DIM), v.view(batch, length, n_kv, HEAD_DIM), gen)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    meta = kernels.PagedAttentionMetadata(tables, cu_seqlens, seq_lens, length)
    backends, name = baseline

    def as_bhld(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, t.shape[1], HEAD_DIM).transpose(1, 2)  # (B, H, L, D), a view

    def eager() -> torch.Tensor:
        out = sdpa(as_bhld(q), as_bhld(k), as_bhld(v), True, backends)  # (B, Hq, L, D)
        return out.transpose(1, 2).reshape(tokens, n_heads, HEAD_DIM)

    size = q.element_size()
    shape = {"model": model, "q_heads": n_heads, "kv_heads": n_kv, "batch": batch, "context": length}
    work = dict(
        flops=2.0 * batch * n_heads * length * length * HEAD_DIM,
        bytes=(2 * tokens * n_heads + 2 * tokens * n_kv) * HEAD_DIM * size,
    )
    yield KernelCase(
        op="attention_paged prefill",
        shape=shape,
        candidate=partial(kernels.attention_paged, q, k_pages, v_pages, meta),
        baseline=eager,
        tolerance=2e-2,
        baseline_name=name,
        **work,
    )
    yield KernelCase(
        op="attention_prefill (uncached)",
        shape=shape,
        candidate=partial(kernels.attention_prefill, q, k, v, cu_seqlens, True, length),
        baseline=eager,
        tolerance=2e-2,
        baseline_name=name,
        **work,
    )


def cases(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Iterator[KernelCase]:
    """On CPU the references run on shrunken shapes: a sanity pass of the suite, not a measurement."""
    on_gpu = device.type == "cuda"
    baseline = _sdpa_backends(device, dtype)
    for model, n_heads, n_kv in HEADS:
        for batch, context in DECODE:
            b, c = (batch, context) if on_gpu else (max(1, batch // 16), max(PAGE, context // 64))
            yield _decode_case(model, n_heads, n_kv, b, c, device, dtype, baseline)
    for model, n_heads, n_kv in HEADS:
        for batch, context in FP8_DECODE:
            b, c = (batch, context) if on_gpu else (max(1, batch // 16), max(PAGE, context // 64))
            yield _decode_case(model, n_heads, n_kv, b, c, device, dtype, baseline, fp8=True)
            yield _decode_case(model, n_heads, n_kv, b, c, device, dtype, baseline, fp8=True, fp16_dot=True)
    for model, n_heads, n_kv in HEADS:
        if n_kv in (2, 4):
            continue  # prefill is compute-bound, KV heads barely matter: keep G = 4, 8 and the G = 64 extreme
        for batch, length in PREFILL:
            b, c = (batch, length) if on_gpu else (max(1, batch // 16), max(PAGE, length // 64))
            yield from _prefill_cases(model, n_heads, n_kv, b, c, device, dtype, baseline)
    for model, n_heads, n_kv in HEADS[:2]:  # G = 4 and 8; last, so a suite step cut short keeps the rows above
        for batch, context in MIXED:
            b, c, n = (batch, context, CHUNK) if on_gpu else (max(1, batch // 16), max(PAGE, context // 64), 64)
            yield _mixed_case(model, n_heads, n_kv, b, c, n, device, dtype)
