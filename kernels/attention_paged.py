"""Paged attention: every attention layer of every engine step (prefill chunks and decode tokens) over a paged KV cache.

The KV cache keeps each layer's K/V in a pool of fixed-size pages (vLLM's PagedAttention layout, [pages,
page_size, Hkv, D] per layer); sequence b owns the pages listed in block_tables[b]. One engine step packs, for
each running sequence, the tokens whose K/V are not cached yet: one token for a sequence that is decoding, a
chunk of its prompt for one that is prefilling. Their K/V are written to the pool first; then query i of
sequence b (q_len_b queries, seq_lens[b] tokens cached in all) sits at position seq_lens[b] - q_len_b + i and
attends to every cached key up to and including it. Decode (q_len 1), a whole prompt (no keys before it) and a
later chunk of a long prompt are the same computation, so one launch serves a mixed step (vLLM's unified
attention, Sarathi's chunked prefill). `PagedAttentionMetadata` describes a step; the engine builds it once
and every layer reads it. The plain-torch reference, the CPU path, is attention_paged_reference.py.

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
sequence alike over the whole GPU. A step whose chunks take several query tiles is not split; the decode
tokens it holds beside them (the engine plans decodes first: `decode_prefix`) get a split launch of their own.

An FP8 cache (pages in float8_e4m3fn, one fp32 K and one V scale for the layer, rope.py stores them) is read in the
same loop: its tiles widen exactly to the queries' dtype for tl.dot, the K scale joins the softmax scale and the V
scale multiplies the output, so per key it costs nothing beyond the conversion, and reads half the bytes of bf16.
With bf16 queries that conversion may be what costs: on the H200 at 3e791a3 an FP8 cache decoded slower than a bf16
one (0.616 against 0.513 ms, batch 64, G = 4, context 8k) though it reads half the bytes. The sm_90a PTX triton 3.9
compiles (benchmarks/compile_check.py) widens a pair of E4M3 values to fp16 in one instruction
(cvt.rn.f16x2.e4m3x2), then each value to bf16 in another (cvt.bf16.f16): three conversions a pair where fp16
needs one. `set_fp8_f16(True)` (or TESSERA_FP8_KV_F16=1) runs
those launches in fp16 instead: the queries cast to fp16 (clamped to its range: a bf16 query past 65,504 would
overflow), the tiles widened to fp16, P·V in fp16 (finer than bf16). Off until measured: `bench kernels --suite
attention` times both in one run. (P in fp16 flushes weights below 2^-24 of a row's largest to zero, which bf16
keeps: at most that times the keys of the row, of its output.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import triton
import triton.language as tl

from .attention import LOG2_E, attend_tile, check_window
from .fp8 import FP8, check_kv_scales
from .hardware import dot_precision, launch_flags, sm_count, wait_for_inputs

MAX_SPLITS = 64
FP8_F16_ENV = "TESSERA_FP8_KV_F16"
_fp8_f16 = os.environ.get(FP8_F16_ENV, "") == "1"


def set_fp8_f16(on: bool) -> None:
    """Decode over an FP8 cache with bf16 queries in fp16 (module docstring), from the next launch: set it before an
    engine starts, whose CUDA graphs keep the variant they captured."""
    global _fp8_f16
    _fp8_f16 = on


@contextlib.contextmanager
def fp8_in_f16() -> Iterator[None]:
    """`set_fp8_f16(True)` within, the setting before restored after (the benchmark's and compile check's rows)."""
    saved = _fp8_f16
    set_fp8_f16(True)
    try:
        yield
    finally:
        set_fp8_f16(saved)


@dataclass(frozen=True)
class Tiling:
    """How a launch is cut: keys per tile, warps, software-pipeline stages, and how many times the (sequence, KV
    head, split) programs of a split launch should cover the SMs. `default_tiling` picks one;
    benchmarks/tune_attention.py sweeps the alternatives on a GPU."""

    block_n: int
    num_warps: int
    num_stages: int
    waves: int = 4


def block_shape(max_query_len: int, group: int, head_dim: int) -> tuple[int, int]:
    """A tile's rows (packed (token, query head) pairs, padded to 16 for tl.dot) and head-dim columns."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, min(128 if head_dim <= 128 else 64, triton.next_power_of_2(max_query_len * group)))
    return block_m, block_d


def default_tiling(block_m: int, block_d: int, programs: int, device: torch.device) -> Tiling:
    """The tiling of a launch of `programs` (sequence, KV head) pairs with block_m-row tiles. 64-128 keys per tile
    (bytes in flight for a memory-bound loop); a tall tile (prefill) gets 8 warps. Decode (short tiles): of the 35
    tilings swept on the H200 at G = 4, 8 and 64 (benchmarks/results/nvidia-h200_tune_attention.md), 64 keys, 4
    warps and 2 stages came within 10 % of each shape's best (3 stages, the earlier default: within 16 %; 8 warps
    lost up to 1.8x). With those, splitting the context to cover the SMs twice was the fastest for G = 4 and 8 at
    batch 1, 16 and 64 (within 0.1 % of once at batch 64, 4-8 % ahead of 4 times, the earlier default). G = 16
    shares G = 4's 16-row tile. G's rows in one tile (block_m >= 32: G = 32, 64) are compute enough per key that
    fewer, longer splits win where the pairs are many: once at batch 64 (the sweep: 6 % ahead of 4 times for G = 64;
    the H200 runs: 0.77-0.83x SDPA once at 3e791a3, 0.71-0.78x 4 times at 2b6d4ed). With pairs for under a quarter
    of the SMs, 4 times: at batch 16 the runs gave 0.81-0.83x 4 times (2b6d4ed) and 0.70-0.77x once (3e791a3), at
    batch 1 1.62-1.66x and 1.55-1.62x (two runs' ratios to their own SDPA, not one run's: the sweep's G = 32 and 64
    shapes, first in its list now, compare them in one). Every swept shape had an 8,192-token context: longer
    contexts (131,072 in the kernel benchmark) follow the same rule unmeasured."""
    block_n = 64 if block_d >= 128 else 128
    if block_m >= 128:
        return Tiling(block_n, num_warps=8, num_stages=2)
    if block_m < 32:
        return Tiling(block_n, num_warps=4, num_stages=2, waves=2)
    return Tiling(block_n, num_warps=4, num_stages=2, waves=1 if 4 * programs >= sm_count(device) else 4)


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
    k_scale_ptr,
    v_scale_ptr,
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
    WINDOW: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    FP8_F16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
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
    if FP8_F16:  # FP8 tiles widen to q's dtype (attend_tile): to fp16 in one instruction (module docstring)
        # A NaN query stays NaN (the engine ends its request), as in bf16.
        q = tl.maximum(q.to(tl.float32), -65504.0, propagate_nan=tl.PropagateNan.ALL)
        q = tl.minimum(q, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)

    # The keys any row of the tile sees, then this split's share of them, in whole tiles.
    first_pos = cached + (tile * BLOCK_M) // GROUP
    key_end = tl.minimum(cached + (tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1, seq_len)
    key_start = 0
    if WINDOW > 0:  # nothing before the first row's window is read
        key_start = tl.maximum(first_pos - WINDOW + 1, 0)
    share = tl.cdiv(tl.cdiv(key_end - key_start, n_splits), BLOCK_N) * BLOCK_N
    lo = key_start + split * share
    hi = tl.minimum(lo + share, key_end)
    # Keys up to the tile's first query are visible to every row: whole tiles of them need no mask (under a
    # window every tile is masked).
    band_end = lo + tl.maximum(tl.minimum(hi, first_pos + 1) - lo, 0) // BLOCK_N * BLOCK_N
    if WINDOW > 0:
        band_end = lo

    if FP8_CACHE:  # scores q·(s_k·kq) = s_k·(q·kq): the key scale joins the softmax scale
        qk_scale = qk_scale * tl.load(k_scale_ptr)
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
            q,
            acc,
            m_i,
            l_i,
            k_head + pages[:, None] * stride_kp + slot * stride_ks,
            v_head + pages[:, None] * stride_vp + slot * stride_vs,
            mask_d[None, :],
            None,
            qk_scale,
            False,
            DOT_PRECISION,
        )
    # Diagonal and tail: keys some rows may not see, or past the split's end.
    for n0 in range(band_end, hi, BLOCK_N):
        keys = n0 + offs_n
        mask_keys = keys < hi
        pages = tl.load(table + keys // PAGE, mask=mask_keys, other=0).to(tl.int64)
        slot = (keys % PAGE)[:, None]
        visible = mask_keys[None, :] & (keys[None, :] <= query_pos[:, None])
        if WINDOW > 0:
            visible = visible & (keys[None, :] > query_pos[:, None] - WINDOW)
        acc, m_i, l_i = attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_head + pages[:, None] * stride_kp + slot * stride_ks,
            v_head + pages[:, None] * stride_vp + slot * stride_vs,
            mask_keys[:, None] & mask_d[None, :],
            visible,
            qk_scale,
            True,
            DOT_PRECISION,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty split: 0, not NaN
    if FP8_CACHE:  # Σ p·(s_v·vq) = s_v·Σ p·vq
        out = out * tl.load(v_scale_ptr)
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
    PDL: tl.constexpr,
):
    """out[t, h] = Σ_s 2^(lse_s - max) · partial_s / Σ_s 2^(lse_s - max): the softmax over all keys again."""
    wait_for_inputs(PDL)
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
    max_query_len: the longest run of queries (sizes the grid without a device read);
    decode_prefix: how many of the first sequences have one query each (the engine plans decodes first). In a
    step that also holds longer chunks, the Triton launcher gives them a split launch of their own, whose
    buffers hold one row per sequence: a count past the one-query sequences would write past them, so it is
    checked wherever cu_seqlens is on the host (`check_inputs`) and must be exact on a GPU.
    """

    block_tables: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    decode_prefix: int = 0
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    def derived(self, key: tuple, build: Callable[[], object]) -> object:
        """What a launcher derives from the step (scratch buffers, a host-side plan), built by the first layer
        that asks and reused by the others. Under a CUDA graph it is built at capture and kept."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


def check_inputs(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    meta: PagedAttentionMetadata,
    window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    check_window(window)
    n_heads, head_dim = q.shape[1:]
    if k_pages.shape != v_pages.shape or k_pages.dim() != 4 or k_pages.shape[3] != head_dim:
        raise ValueError(
            f"attention_paged: q {tuple(q.shape)} does not fit pages k {tuple(k_pages.shape)}, "
            f"v {tuple(v_pages.shape)} (expected [pages, page_size, Hkv, {head_dim}])"
        )
    if n_heads % k_pages.shape[2]:
        raise ValueError(f"attention_paged: {n_heads} query heads are not a multiple of {k_pages.shape[2]} KV heads")
    if k_pages.dtype != v_pages.dtype or k_pages.dtype not in (q.dtype, FP8):
        raise ValueError(
            f"attention_paged: the pages ({k_pages.dtype}, {v_pages.dtype}) must both be in q's dtype ({q.dtype}) "
            f"or both in {FP8}"
        )
    check_kv_scales(k_pages, k_scale, v_scale, "attention_paged")
    n_seqs, tables = meta.batch_size, meta.block_tables
    if meta.decode_prefix:  # once a step, not once a layer
        meta.derived(("decode_prefix checked",), lambda: _check_decode_prefix(meta))
    if meta.cu_seqlens.shape != (n_seqs + 1,) or tables.dim() != 2 or tables.shape[0] < n_seqs:
        raise ValueError(
            f"attention_paged: cu_seqlens {tuple(meta.cu_seqlens.shape)}, block_tables "
            f"{tuple(tables.shape)} and seq_lens {tuple(meta.seq_lens.shape)} "
            "disagree on the batch"
        )


def _check_decode_prefix(meta: PagedAttentionMetadata) -> bool:
    """decode_prefix within the batch, and on the host also exactly leading one-query sequences."""
    count, cu = meta.decode_prefix, meta.cu_seqlens
    if not 0 <= count <= meta.batch_size or (
        cu.device.type == "cpu" and cu[: count + 1].tolist() != [*range(count + 1)]
    ):
        raise ValueError(
            f"attention_paged: decode_prefix {count} is not a count of leading one-query sequences "
            f"(batch {meta.batch_size}, cu_seqlens starting {cu[: count + 1].tolist()[:8]})"
        )
    return True


def split_count(programs: int, capacity: int, tiling: Tiling, device: torch.device) -> int:
    """Splits of the context for `programs` (sequence, KV head) pairs whose tables hold `capacity` keys: enough
    to cover the SMs `tiling.waves` times, never more than the capacity has tiles."""
    waves = triton.cdiv(tiling.waves * sm_count(device), programs)
    return max(1, min(MAX_SPLITS, triton.cdiv(capacity, tiling.block_n), waves))


def attention_paged_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    meta: PagedAttentionMetadata,
    window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """q [N, Hq, D]; k/v pages [P, page_size, Hkv, D] -> [N, Hq, D]. No device read: CUDA-graph capturable.
    window: the query at position p reads keys p - window + 1 .. p only. k_scale, v_scale: an FP8 cache's
    (fp32 [1] each). tiling: `default_tiling`'s unless given (in a mixed step, for the chunks' launch).

    A step whose chunks take more than one query tile is not split (split_count). When it also holds decode
    tokens, they get a launch of their own first, split as in a decode step (meta.decode_prefix: the leading
    one-query sequences); in the one launch, a decode at a long context would be one program streaming all its
    keys, the step's slowest, while the chunks' tiles see few keys each."""
    check_inputs(q, k_pages, v_pages, meta, window, k_scale, v_scale)
    if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("attention_paged: the pages' head dimension must be contiguous")
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernel steps through the head dimension one by one
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_seqs, max_query_len = meta.batch_size, meta.max_query_len
    if q.shape[0] == 0 or n_seqs == 0 or max_query_len <= 0:
        return out
    launch = partial(_launch, q, k_pages, v_pages, out, meta, window, k_scale, v_scale)
    group = q.shape[1] // k_pages.shape[2]
    tiles = triton.cdiv(max_query_len * group, block_shape(max_query_len, group, q.shape[2])[0])
    decodes = meta.decode_prefix if tiles > 1 else 0
    if 0 < decodes < n_seqs:
        launch(0, decodes, 1, decodes, None)  # their rows are q's first, one each; their own default tiling
        launch(decodes, n_seqs, max_query_len, q.shape[0], tiling)  # more than one tile: not split, no merge
    else:
        launch(0, n_seqs, max_query_len, q.shape[0], tiling)
    return out


def _launch(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    out: torch.Tensor,
    meta: PagedAttentionMetadata,
    window: int | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    first: int,
    end: int,
    max_query_len: int,
    rows: int,
    tiling: Tiling | None,
) -> None:
    """Attention of sequences first..end-1 of the step (their queries at most max_query_len each, within q's
    first `rows` rows) into their rows of out."""
    n_heads, head_dim = q.shape[1:]
    page, n_kv = k_pages.shape[1], k_pages.shape[2]
    group = n_heads // n_kv
    n_seqs = end - first
    tables, cu_seqlens, seq_lens = meta.block_tables[first:end], meta.cu_seqlens[first:], meta.seq_lens[first:end]
    block_m, block_d = block_shape(max_query_len, group, head_dim)
    tiling = tiling or default_tiling(block_m, block_d, n_seqs * n_kv, q.device)
    max_tiles = triton.cdiv(max_query_len * group, block_m)
    capacity = tables.shape[1] * page
    if window is not None:  # a window bounds the keys a split shares out
        capacity = min(capacity, window + max_query_len)
    n_splits = split_count(n_seqs * n_kv, capacity, tiling, q.device) if max_tiles == 1 else 1
    if n_splits > 1:  # fp32 partial outputs and log-sum-exps, shared by the layers of the step
        shape, dev = (rows, n_heads, n_splits), q.device
        partial_out, lse = meta.derived(
            ("splits", *shape, head_dim),
            lambda: (
                torch.empty(*shape, head_dim, dtype=torch.float32, device=dev),
                torch.empty(*shape, dtype=torch.float32, device=dev),
            ),
        )
        lse_strides = lse.stride(0), lse.stride(1)
    else:
        partial_out, lse, lse_strides = out, out, (0, 0)  # lse unused
    _paged_kernel[(max_tiles * n_splits, n_kv, n_seqs)](
        q,
        k_pages,
        v_pages,
        partial_out,
        lse,
        tables,
        cu_seqlens,
        seq_lens,
        k_scale if k_scale is not None else seq_lens,  # unread without FP8_CACHE
        v_scale if v_scale is not None else seq_lens,
        q.stride(0),
        q.stride(1),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        v_pages.stride(0),
        v_pages.stride(1),
        v_pages.stride(2),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2) if n_splits > 1 else 0,
        *lse_strides,
        tables.stride(0),
        LOG2_E / head_dim**0.5,
        max_tiles,
        n_splits,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=tiling.block_n,
        PAGE=page,
        SPLIT=n_splits > 1,
        WINDOW=window or 0,
        FP8_CACHE=k_pages.dtype == FP8,
        FP8_F16=_fp8_f16 and k_pages.dtype == FP8 and q.dtype == torch.bfloat16,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        **launch_flags(q.device),
    )
    if n_splits > 1:
        _merge_kernel[(rows, n_heads)](
            partial_out,
            lse,
            out,
            n_splits,
            partial_out.stride(0),
            partial_out.stride(1),
            partial_out.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(n_splits),
            **launch_flags(q.device),
        )
