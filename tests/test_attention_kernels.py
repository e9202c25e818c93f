"""Triton varlen prefill attention (the uncached forward: training, scoring) against the plain-torch reference
(SDPA with GQA heads repeated). The paged attention that serving runs is tested in test_paged_attention.py.

Run on the GPU when there is one, else under the Triton interpreter, float32 and float16, with every
buffer the launcher allocates NaN-poisoned first and guarded by NaN canaries (`poisoned`). The cases sweep
G = Hq / Hkv over 1, 3, 8 and 64 (each G is its own compilation), head dims 16, 24 (not a power of two) and
64, sequence lengths that no block divides, and empty sequences.

Tolerances, relative to the largest reference value, and their reasons: conftest's TOLERANCES.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tessera import kernels
from tessera.kernels.attention import attention_prefill_reference

from .conftest import KERNEL_DEVICE, dtypes, randn, relative_error

# (sequence lengths, query heads, KV heads, head dim)
PREFILL_CASES = [
    ([1], 4, 4, 16),
    ([17, 1, 5], 4, 4, 16),
    ([63, 130], 9, 3, 24),
    ([100, 7], 8, 1, 64),
    ([17, 40], 64, 1, 16),
    ([0, 33, 0], 8, 2, 16),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
@dtypes("attention_prefill")
@pytest.mark.parametrize(("causal", "window"), [(True, None), (False, None), (True, 5), (True, 70)], ids=str)
def test_attention_prefill(poisoned, case, dtype: torch.dtype, tol: float, causal: bool, window) -> None:
    """window 5: shorter than most sequences and than a tile (every tile masked, keys before the first row's
    window skipped); 70: longer than some sequences, shorter than one."""
    lengths, n_heads, n_kv, head_dim = case
    tokens = sum(lengths)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=KERNEL_DEVICE)
    q = randn(tokens, n_heads, head_dim, dtype=dtype, seed=0)
    k, v = randn(tokens, n_kv, head_dim, dtype=dtype, seed=1), randn(tokens, n_kv, head_dim, dtype=dtype, seed=2)
    out = kernels.attention_prefill(q, k, v, cu_seqlens, causal=causal, window=window)
    expected = attention_prefill_reference(q.float(), k.float(), v.float(), cu_seqlens, causal, window)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, expected) <= tol


def test_attention_prefill_given_max_seqlen_matches(poisoned) -> None:
    lengths = [5, 70, 12]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=KERNEL_DEVICE)
    q, k, v = (randn(87, h, 16, dtype=torch.float32, seed=s) for s, h in enumerate((8, 2, 2)))
    with_hint = kernels.attention_prefill(q, k, v, cu_seqlens, max_seqlen=70)
    torch.testing.assert_close(with_hint, kernels.attention_prefill(q, k, v, cu_seqlens), rtol=0, atol=0)


def test_inputs_of_any_strides_give_the_contiguous_result(poisoned) -> None:
    """q, k and v whose head dimension is not contiguous (transposed views) give what their contiguous copies do:
    the kernel steps through that dimension one element at a time (the launcher copies them; before, it read
    other elements)."""
    lengths = [5, 40]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=KERNEL_DEVICE)
    q, k, v = (randn(45, h, 16, dtype=torch.float32, seed=s) for s, h in enumerate((8, 2, 2)))
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert all(t.stride(-1) != 1 for t in strided)
    expected = kernels.attention_prefill(q, k, v, cu_seqlens)
    torch.testing.assert_close(kernels.attention_prefill(*strided, cu_seqlens), expected, rtol=0, atol=0)


def test_window_reference_is_a_banded_causal_softmax() -> None:
    """The reference's window against softmax written out: query i of a sequence sees keys i - W + 1 .. i."""
    q, k, v = (randn(12, 2, 8, dtype=torch.float32, seed=s).cpu().double() for s in range(3))
    out = attention_prefill_reference(q, k, v, torch.tensor([0, 12], dtype=torch.int32), window=4)
    for i in range(12):
        keys = slice(max(0, i - 3), i + 1)
        for h in range(2):
            weights = torch.softmax(k[keys, h] @ q[i, h] / 8**0.5, dim=0)
            torch.testing.assert_close(out[i, h], weights @ v[keys, h])


def test_attention_rejects_bad_head_counts(poisoned) -> None:
    q, kv = randn(5, 6, 16, dtype=torch.float32, seed=0), randn(5, 4, 16, dtype=torch.float32, seed=1)
    cu_seqlens = torch.tensor([0, 5], dtype=torch.int32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        kernels.attention_prefill(q, kv, kv, cu_seqlens)
