"""Paged attention (the serving engine's mixed prefill/decode step) against attention written out by hand.

The independent reference lays each sequence's keys out contiguously, computes softmax(q·kᵀ/√D) with the
causal diagonal shifted by the keys cached before the step, in float64, one query head at a time (query head
h reads KV head h // G). Both the Triton kernel (GPU, else the interpreter) and the plain-torch path the CPU
serves with are checked against it. Pages are handed out in a shuffled order, so a kernel that ignored the
block table would read another sequence's keys; pages no sequence owns are NaN-poisoned and unused table
entries out of range, so reading another page shows up as NaN or an index error. The unwritten tail of a
sequence's last page is zero, as PagedKVCache.allocate leaves it.

Cases mix decode tokens (one query), whole prompts (nothing cached before) and later chunks of a long prompt
(a cached prefix), with G = 1, 4 and 8, head dims 16 and 24 (not a power of two), pages of 16 and 32
tokens, and contexts that end mid-page. Tolerances as for the other attention kernels (relative to the
largest reference value): float32 1e-5, float16 2e-3 (P rounded to fp16 for P·V).
"""

from __future__ import annotations

import pytest
import torch

from tessera import kernels
from tessera.kernels.attention_paged import attention_paged_reference

from .conftest import KERNEL_DEVICE, relative_error

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

# (query tokens this step, cached tokens in all after it) per sequence; query heads; KV heads; head dim; page
CASES = [
    ([(1, 1)], 4, 4, 16, 16),
    ([(1, 17), (5, 5), (1, 40)], 8, 2, 16, 16),
    ([(37, 37), (1, 100), (20, 53)], 8, 1, 24, 16),
    ([(3, 70), (1, 33), (1, 2), (64, 64)], 4, 1, 16, 32),
]


def paged_layout(lengths: list[int], n_kv: int, head_dim: int, page: int, dtype: torch.dtype, seed: int):
    """Contiguous per-sequence K/V, the same K/V scattered over shuffled pages, and the block tables."""
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // page) for n in lengths]
    total = sum(n_pages) + 3  # spare pages that no sequence owns
    order = torch.randperm(total, generator=gen).tolist()
    k_pages = torch.full((total, page, n_kv, head_dim), float("nan"))
    v_pages = torch.full((total, page, n_kv, head_dim), float("nan"))
    tables = torch.full((len(lengths), max(n_pages) + 2), 10**6, dtype=torch.int32)  # out-of-range filler
    ks, vs = [], []
    for b, n in enumerate(lengths):
        k, v = (torch.randn(n, n_kv, head_dim, generator=gen) for _ in range(2))
        ks.append(k), vs.append(v)
        for i in range(n_pages[b]):
            p = order.pop()
            tables[b, i] = p
            k_pages[p], v_pages[p] = 0.0, 0.0
            k_pages[p, : min(page, n - i * page)] = k[i * page : (i + 1) * page]
            v_pages[p, : min(page, n - i * page)] = v[i * page : (i + 1) * page]
    dev = dict(device=KERNEL_DEVICE)
    return ks, vs, k_pages.to(dtype=dtype, **dev), v_pages.to(dtype=dtype, **dev), tables.to(**dev)


def by_hand(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], q_lens: list[int]) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    n_heads, head_dim = q.shape[1:]
    start = 0
    for k, v, n in zip(ks, vs, q_lens):
        group = n_heads // k.shape[1]
        length = k.shape[0]
        for i in range(n):
            pos = length - n + i
            for h in range(n_heads):
                keys, values = k[: pos + 1, h // group].double(), v[: pos + 1, h // group].double()
                weights = torch.softmax(keys @ q[start + i, h].double() / head_dim**0.5, dim=0)
                out[start + i, h] = weights @ values
        start += n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_matches_hand_written(case: int, dtype: torch.dtype) -> None:
    seqs, n_heads, n_kv, head_dim, page = CASES[case]
    q_lens, lengths = [n for n, _ in seqs], [n for _, n in seqs]
    ks, vs, k_pages, v_pages, tables = paged_layout(lengths, n_kv, head_dim, page, dtype, seed=case)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(100 + case))
    # The hand reference sees the same rounded values the kernels read.
    ks = [k.to(dtype).float() for k in ks]
    vs = [v.to(dtype).float() for v in vs]
    expected = by_hand(q.to(dtype).float(), ks, vs, q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=KERNEL_DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)
    qd = q.to(device=KERNEL_DEVICE, dtype=dtype)
    kernels.set_backend("triton")
    try:
        triton_out = kernels.attention_paged(qd, k_pages, v_pages, tables, cu, seq_lens, max(q_lens))
    finally:
        kernels.set_backend(None)
    torch_out = attention_paged_reference(qd, k_pages, v_pages, tables, cu, seq_lens)
    assert relative_error(triton_out.cpu(), expected) <= TOL[dtype]
    assert relative_error(torch_out.cpu(), expected) <= TOL[dtype]


def test_paged_attention_rejects_mismatched_shapes() -> None:
    q = torch.zeros(3, 8, 16)
    pages = torch.zeros(4, 16, 3, 16)  # 3 KV heads do not divide 8 query heads
    tables = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        attention_paged_reference(q, pages, pages, tables, torch.tensor([0, 3]), torch.tensor([3]))
    with pytest.raises(ValueError, match="disagree on the batch"):
        attention_paged_reference(
            q, torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16), tables, torch.tensor([0, 1, 3]), torch.tensor([3])
        )


# Whole rows of pages (PagedKVCache with rows, the CPU engine): (query tokens, cached tokens, row) per sequence.
ROW_CASES = [
    [(1, 17, 2), (1, 40, 3), (1, 5, 4)],  # the steady decode step: consecutive rows in order, read as views
    [(1, 17, 4), (5, 5, 0), (1, 40, 1), (20, 53, 5)],  # decodes in rows 4 and 1 (row 2, 3 between: NaN), chunks
]


@pytest.mark.parametrize("case", range(len(ROW_CASES)))
def test_paged_attention_over_whole_rows_matches_hand_written(case: int) -> None:
    """Each sequence owns a whole row of 4 pages; every page of a row no sequence owns, and page 0, is NaN.
    Rows are zeroed past a sequence's tokens, as PagedKVCache.allocate leaves them."""
    seqs, n_heads, n_kv, head_dim, page, row_pages = ROW_CASES[case], 8, 2, 16, 16, 4
    gen = torch.Generator().manual_seed(200 + case)
    pool = 1 + 6 * row_pages
    k_pages = torch.full((pool, page, n_kv, head_dim), float("nan"))
    v_pages = torch.full((pool, page, n_kv, head_dim), float("nan"))
    ks, vs, tables = [], [], torch.zeros(len(seqs), row_pages, dtype=torch.int32)
    for b, (_, length, row) in enumerate(seqs):
        first = 1 + row * row_pages
        k, v = (torch.randn(length, n_kv, head_dim, generator=gen) for _ in range(2))
        ks.append(k), vs.append(v)
        for pages, x in ((k_pages, k), (v_pages, v)):
            stretch = pages[first : first + row_pages].view(-1, n_kv, head_dim)  # the row, token by token
            stretch.zero_()
            stretch[:length] = x
        tables[b] = torch.arange(first, first + row_pages)
    q_lens, lengths = [n for n, _, _ in seqs], [n for _, n, _ in seqs]
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=gen)
    expected = by_hand(q, ks, vs, q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    rows = torch.tensor([r for _, _, r in seqs])
    in_rows = attention_paged_reference(q, k_pages, v_pages, tables, cu, seq_lens, None, rows, row_pages)
    by_table = attention_paged_reference(q, k_pages, v_pages, tables, cu, seq_lens)
    assert relative_error(in_rows, expected) <= TOL[torch.float32]
    assert relative_error(by_table, expected) <= TOL[torch.float32]
