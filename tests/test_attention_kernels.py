"""Triton prefill and decode attention against the plain-torch references (SDPA with GQA heads repeated).

Run on the GPU when there is one, else under the Triton interpreter, float32 and float16, with every
buffer the launchers allocate NaN-poisoned first. The cases sweep G = Hq / Hkv over 1, 3, 8 and 64 (each
G is its own compilation; G <= 4 takes the decode kernel's no-tl.dot path), head dims 16, 24 (not a power
of two) and 64, sequence lengths that no block divides, empty sequences, and decode contexts 1, 17 and
1000 in caches larger than the live context, so that most decode splits are empty.

Tolerances (relative to the largest reference value): float32 1e-5 (observed <= 1e-6; online softmax sums
in another order); float16 2e-3: the kernel rounds P to fp16 for the P·V product and the output once,
against an fp32 reference on the same fp16 inputs (observed <= 5e-4).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tessera import kernels
from tessera.kernels.attention import attention_prefill_reference
from tessera.kernels.attention_decode import attention_decode_reference

from .conftest import KERNEL_DEVICE, relative_error

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=KERNEL_DEVICE, dtype=dtype)


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_prefill(poisoned, case, dtype: torch.dtype, causal: bool) -> None:
    lengths, n_heads, n_kv, head_dim = case
    tokens = sum(lengths)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=KERNEL_DEVICE)
    q = randn(tokens, n_heads, head_dim, dtype=dtype, seed=0)
    k, v = randn(tokens, n_kv, head_dim, dtype=dtype, seed=1), randn(tokens, n_kv, head_dim, dtype=dtype, seed=2)
    out = kernels.attention_prefill(q, k, v, cu_seqlens, causal=causal)
    expected = attention_prefill_reference(q.float(), k.float(), v.float(), cu_seqlens, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert relative_error(out, expected) <= TOL[dtype]


def test_attention_prefill_given_max_seqlen_matches(poisoned) -> None:
    lengths = [5, 70, 12]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=KERNEL_DEVICE)
    q, k, v = (randn(87, h, 16, dtype=torch.float32, seed=s) for s, h in enumerate((8, 2, 2)))
    with_hint = kernels.attention_prefill(q, k, v, cu_seqlens, max_seqlen=70)
    torch.testing.assert_close(with_hint, kernels.attention_prefill(q, k, v, cu_seqlens), rtol=0, atol=0)


# (live lengths per sequence, query heads, KV heads, cache capacity S, head dim)
DECODE_CASES = [
    ([1], 4, 4, 1, 16),
    ([1, 1000], 4, 4, 1000, 16),
    ([17, 5, 0], 9, 3, 17, 24),
    ([999], 64, 1, 1000, 32),
    ([40, 3], 8, 1, 64, 64),
    ([250, 1, 17], 16, 8, 300, 16),
    ([1000, 500], 16, 2, 1024, 16),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode(poisoned, case, dtype: torch.dtype) -> None:
    lengths, n_heads, n_kv, capacity, head_dim = case
    batch = len(lengths)
    q = randn(batch, n_heads, head_dim, dtype=dtype, seed=0)
    k_cache = randn(batch, n_kv, capacity, head_dim, dtype=dtype, seed=1)
    v_cache = randn(batch, n_kv, capacity, head_dim, dtype=dtype, seed=2)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)
    out = kernels.attention_decode(q, k_cache, v_cache, seq_lens)
    expected = attention_decode_reference(q.float(), k_cache.float(), v_cache.float(), seq_lens)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any(), "empty splits or an empty sequence produced NaN"
    assert relative_error(out, expected) <= TOL[dtype]
    # An empty sequence attends to nothing: zeros, from both paths.
    for b in (b for b, n in enumerate(lengths) if n == 0):
        assert not out[b].any() and not expected[b].any()


def test_attention_decode_reads_only_live_positions(poisoned) -> None:
    """Cache entries past a sequence's length hold garbage (here NaN and huge values): they must not leak in."""
    q = randn(2, 8, 16, dtype=torch.float32, seed=0)
    k_cache, v_cache = (
        randn(2, 2, 200, 16, dtype=torch.float32, seed=1),
        randn(2, 2, 200, 16, dtype=torch.float32, seed=2),
    )
    seq_lens = torch.tensor([130, 7], dtype=torch.int32, device=KERNEL_DEVICE)
    expected = attention_decode_reference(q, k_cache, v_cache, seq_lens)
    k_cache[0, :, 130:], v_cache[0, :, 130:] = float("nan"), 1e30
    k_cache[1, :, 7:], v_cache[1, :, 7:] = 1e30, float("nan")
    assert relative_error(kernels.attention_decode(q, k_cache, v_cache, seq_lens), expected) <= TOL[torch.float32]


@pytest.mark.slow
def test_attention_decode_128k_context(poisoned) -> None:
    """The longest context the issue names (128k): 64 splits of 2,048 keys, merged."""
    capacity = 131_072
    q = randn(1, 8, 16, dtype=torch.float16, seed=0)
    k_cache, v_cache = (randn(1, 1, capacity, 16, dtype=torch.float16, seed=s) for s in (1, 2))
    seq_lens = torch.tensor([capacity], dtype=torch.int32, device=KERNEL_DEVICE)
    out = kernels.attention_decode(q, k_cache, v_cache, seq_lens)
    expected = attention_decode_reference(q.float(), k_cache.float(), v_cache.float(), seq_lens)
    assert relative_error(out, expected) <= TOL[torch.float16]


def test_attention_rejects_bad_head_counts(poisoned) -> None:
    q, kv = randn(5, 6, 16, dtype=torch.float32, seed=0), randn(5, 4, 16, dtype=torch.float32, seed=1)
    cu_seqlens = torch.tensor([0, 5], dtype=torch.int32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        kernels.attention_prefill(q, kv, kv, cu_seqlens)
    cache = randn(1, 4, 8, 16, dtype=torch.float32, seed=2)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        kernels.attention_decode(q[:1], cache, cache, torch.tensor([3], dtype=torch.int32, device=KERNEL_DEVICE))
