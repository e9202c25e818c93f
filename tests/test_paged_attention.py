"""Paged attention (every cached attention of an engine step: prefill chunks and decode tokens) against attention
written out by hand.

The independent reference lays each sequence's keys out contiguously and computes softmax(q·kᵀ/√D) with the
causal diagonal shifted by the keys cached before the step, in float64, one query and one query head at a time
(query head h reads KV head h // G). Both the Triton kernel (GPU, else the interpreter) and the plain-torch path
the CPU serves with are checked against it. Pages are handed out in a shuffled order, so a kernel that ignored
the block table would read another sequence's keys; pages no sequence owns are NaN, and table entries past a
sequence's own pages are out of range, so reading a page it does not own shows up as NaN or an index error.
The unwritten tail of a sequence's last page is zero, as PagedKVCache.allocate leaves it. Every buffer the
Triton launcher allocates (output, split partials, log-sum-exps) starts as NaN between NaN canaries (`poisoned`).

Cases: G = 1, 2, 4, 8, 16 and 64; head dims 16, 24 (not a power of two) and 128 (64-key tiles); pages of 4, 8,
16, 32 and a whole context; decode tokens of contexts 0 (an idle sequence), 1, on and either side of page
and split boundaries (128-key shares: 128, 129, 255, 256, 257), up to 1,000 and, marked slow, 131,072; whole
prompts, later chunks of a long prompt and decode tokens mixed in one step (decodes ahead of a chunk of more
than one query tile in a split launch of their own); the context split over the SMs (the default plan) and not
split at all.

Tolerances, relative to the largest reference value, and their reasons: conftest's TOLERANCES.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tessera import kernels
from tessera.kernels.attention_paged import PagedAttentionMetadata
from tessera.kernels.attention_paged_reference import attention_paged_reference
from tessera.kernels.fp8 import FP8, quantize_kv_reference

from .conftest import KERNEL_DEVICE, TOLERANCES, dtypes, relative_error

paged = importlib.import_module("tessera.kernels.attention_paged")  # the module: `kernels.attention_paged` is the op

# (query tokens this step, cached tokens in all after it) per sequence; query heads; KV heads; head dim; page
CASES = [
    ([(1, 1), (0, 0), (1, 16), (1, 17), (1, 128), (1, 129), (1, 300)], 4, 4, 16, 16),  # G 1, decode, boundaries
    ([(1, 255), (1, 256), (1, 257), (1, 2)], 8, 4, 16, 32),  # G 2, split boundaries
    ([(1, 40), (1, 1000)], 32, 8, 128, 16),  # G 4 at Llama-3.1-8B's heads and head dim
    ([(1, 33), (5, 5), (1, 64), (20, 53)], 16, 2, 24, 16),  # G 8: a prompt, a chunk and decodes
    ([(37, 37), (1, 100), (3, 70), (0, 0)], 16, 1, 16, 4),  # G 16: several query tiles, no split
    ([(1, 1), (1, 130), (2, 2)], 64, 1, 16, 8),  # G 64: 64 and 128 rows per tile, split
    ([(64, 64), (1, 33)], 4, 1, 16, 32),  # G 4: a 64-token prompt beside a decode
    # G 4: decodes (across split boundaries) ahead of a 2-tile chunk get a split launch of their own; one after it
    ([(1, 300), (1, 129), (1, 1000), (1, 1), (40, 90), (1, 17)], 8, 2, 16, 16),
]
MIXED = len(CASES) - 1


def paged_layout(
    lengths: list[int],
    n_kv: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    seed: int,
    pages: list[list[int]] | None = None,
):
    """Contiguous per-sequence K/V, the same K/V on pages (shuffled, or the given ones), and the block tables."""
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // page) for n in lengths]
    if pages is None:
        order = torch.randperm(sum(n_pages) + 3, generator=gen).tolist()  # 3 pages that no sequence owns
        pages = [[order.pop() for _ in range(n)] for n in n_pages]
    total = max((p for own in pages for p in own), default=0) + 2
    k_pages = torch.full((total, page, n_kv, head_dim), float("nan"))
    v_pages = torch.full((total, page, n_kv, head_dim), float("nan"))
    tables = torch.full((len(lengths), max(n_pages) + 2), 10**6, dtype=torch.int32)  # out-of-range filler
    ks, vs = [], []
    for b, n in enumerate(lengths):
        k, v = (torch.randn(n, n_kv, head_dim, generator=gen) for _ in range(2))
        ks.append(k), vs.append(v)
        for i, p in enumerate(pages[b]):
            tables[b, i] = p
            k_pages[p], v_pages[p] = 0.0, 0.0
            k_pages[p, : min(page, n - i * page)] = k[i * page : (i + 1) * page]
            v_pages[p, : min(page, n - i * page)] = v[i * page : (i + 1) * page]
    dev = dict(device=KERNEL_DEVICE)
    return ks, vs, k_pages.to(dtype=dtype, **dev), v_pages.to(dtype=dtype, **dev), tables.to(**dev)


def by_hand(
    q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], q_lens: list[int], window: int | None = None
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    n_heads, head_dim = q.shape[1:]
    start = 0
    for k, v, n in zip(ks, vs, q_lens):
        group = n_heads // k.shape[1]
        length = k.shape[0]
        for i in range(n):
            pos = length - n + i
            seen = slice(0 if window is None else max(0, pos - window + 1), pos + 1)
            for h in range(n_heads):
                keys, values = k[seen, h // group].double(), v[seen, h // group].double()
                weights = torch.softmax(keys @ q[start + i, h].double() / head_dim**0.5, dim=0)
                out[start + i, h] = weights @ values
        start += n
    return out


def metadata(
    q_lens: list[int], lengths: list[int], tables: torch.Tensor, device: str = KERNEL_DEVICE
) -> PagedAttentionMetadata:
    """As the engine builds it (decode_prefix: the leading one-query sequences)."""
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    return PagedAttentionMetadata(tables, cu, seq_lens, max(q_lens), decodes)


def check_case(
    seqs, n_heads, n_kv, head_dim, page, dtype, tol, seed, pages=None, window=None, fp8=None, strided=False
) -> PagedAttentionMetadata:
    """fp8: (k_scale, v_scale) for an FP8 cache: the pages quantized with them (NaN stays NaN), the hand
    reference given the dequantized values. strided: q a view whose head dimension is not contiguous. Returns
    the metadata the Triton kernel ran with."""
    q_lens, lengths = [n for n, _ in seqs], [n for _, n in seqs]
    ks, vs, k_pages, v_pages, tables = paged_layout(lengths, n_kv, head_dim, page, dtype, seed, pages)
    scales = {}
    if fp8 is not None:
        k_scale, v_scale = (torch.tensor([s], device=KERNEL_DEVICE) for s in fp8)
        k_pages, v_pages = quantize_kv_reference(k_pages, k_scale), quantize_kv_reference(v_pages, v_scale)
        # Quantized from the values the pages held (in dtype), as the pages were.
        ks = [quantize_kv_reference(k.to(dtype), k_scale.cpu()).double() * fp8[0] for k in ks]
        vs = [quantize_kv_reference(v.to(dtype), v_scale.cpu()).double() * fp8[1] for v in vs]
        scales = {"k_scale": k_scale, "v_scale": v_scale}
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=torch.Generator().manual_seed(100 + seed))
    # The hand reference sees the same rounded values the kernels read.
    expected = by_hand(
        q.to(dtype).float(), [k.to(dtype).float() for k in ks], [v.to(dtype).float() for v in vs], q_lens, window
    )
    qd = q.to(device=KERNEL_DEVICE, dtype=dtype)
    if strided:  # the same values, stepping n_heads elements from one to the next along the head dimension
        qd = qd.transpose(1, 2).contiguous().transpose(1, 2)
    if window is not None:  # neither op may read a page that lies wholly before every query's window
        for b, (n, length) in enumerate(zip(q_lens, lengths)):
            first_seen = max(0, length - n - window + 1)
            for i in range(first_seen // page):
                k_pages[tables[b, i]], v_pages[tables[b, i]] = float("nan"), float("nan")
    torch_out = attention_paged_reference(qd, k_pages, v_pages, metadata(q_lens, lengths, tables), window, **scales)
    meta = metadata(q_lens, lengths, tables)
    triton_out = kernels.attention_paged(qd, k_pages, v_pages, meta, window, **scales)  # poisoned
    for out in (triton_out, torch_out):
        assert out.shape == q.shape and out.dtype == dtype
        assert relative_error(out.cpu(), expected) <= tol
    return meta


@pytest.mark.parametrize("splits", ["split", "one"])
@dtypes("attention_paged")
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_matches_hand_written(poisoned, monkeypatch, case: int, dtype, tol, splits: str) -> None:
    if splits == "one":  # a GPU with enough (sequence, KV head) programs already: the output is written directly
        monkeypatch.setattr(paged, "sm_count", lambda device: 0)
    check_case(*CASES[case], dtype, tol, seed=case)


@pytest.mark.parametrize("splits", ["split", "one"])
def test_mixed_step_splits_its_decodes(poisoned, monkeypatch, splits: str) -> None:
    """The 4 decode tokens ahead of a chunk of 40 queries (2 query tiles at G 4, so that launch is not split) get
    a launch of their own whose split partials (4 rows) the merge combines; without SMs to fill, none."""
    if splits == "one":
        monkeypatch.setattr(paged, "sm_count", lambda device: 0)
    tol = TOLERANCES["attention_paged"][torch.float32]
    meta = check_case(*CASES[MIXED], torch.float32, tol, seed=MIXED)
    assert meta.decode_prefix == 4
    split_rows = [key[1] for key in meta._derived if key[0] == "splits"]
    assert split_rows == ([4] if splits == "split" else [])
    *shape, window = WINDOW_CASES[-1]  # under a window of 200 (201 keys to share: 2 tiles)
    meta = check_case(*shape, torch.float32, tol, seed=MIXED, window=window)
    assert [key[1] for key in meta._derived if key[0] == "splits"] == ([2] if splits == "split" else [])


def test_decode_prefix_must_count_leading_one_query_sequences() -> None:
    """Its split launch sizes buffers by it: a count past the one-query sequences is refused where cu_seqlens is on
    the host, not written past (a sequence of 5 queries counted as a decode, a count past the batch). All on the
    host, where the check runs (on a GPU it would need a sync)."""
    q, pages = torch.zeros(46, 8, 16), torch.zeros(20, 16, 2, 16)
    tables = torch.arange(1, 19, dtype=torch.int32).view(3, 6)
    for count in (2, 4, -1):
        meta = metadata([1, 5, 40], [80, 60, 90], tables, device="cpu")
        meta.decode_prefix = count
        with pytest.raises(ValueError, match=f"decode_prefix {count} is not a count of leading one-query sequences"):
            kernels.attention_paged(q, pages, pages, meta)


# Windowed cases: (sequences, query heads, KV heads, head dim, page, window)
WINDOW_CASES = [
    ([(1, 1), (1, 16), (1, 17), (1, 300), (1, 129)], 4, 4, 16, 16, 16),  # decode at and past the window
    ([(1, 1000), (1, 40), (1, 257)], 32, 8, 128, 16, 100),  # G 4, windows across pages and splits
    ([(20, 53), (5, 5), (1, 64), (37, 37)], 16, 2, 24, 4, 9),  # chunks and a prompt longer than the window
    ([(1, 130), (2, 2), (64, 64)], 64, 1, 16, 8, 128),  # a window longer than some contexts
    ([(1, 300), (1, 40), (40, 90)], 8, 2, 16, 16, 200),  # decodes' own split launch (2 tiles) ahead of a 2-tile chunk
]


@pytest.mark.parametrize("splits", ["split", "one"])
@dtypes("attention_paged")
@pytest.mark.parametrize("case", range(len(WINDOW_CASES)))
def test_windowed_paged_attention_matches_hand_written(poisoned, monkeypatch, case: int, dtype, tol, splits) -> None:
    """A window bounds the keys each query sees (pages wholly before it are NaN for the Triton kernel)."""
    if splits == "one":
        monkeypatch.setattr(paged, "sm_count", lambda device: 0)
    *shape, window = WINDOW_CASES[case]
    check_case(*shape, dtype, tol, seed=case, window=window)


@pytest.mark.parametrize("splits", ["split", "one"])
@dtypes("attention_paged")
@pytest.mark.parametrize("case", [0, 2, 3, 5])
def test_fp8_cache_matches_hand_written(poisoned, monkeypatch, case: int, dtype, tol, splits: str) -> None:
    """An FP8 KV cache (E4M3 pages, one K and one V scale for the layer): the kernel and the reference read the
    pages' values times their scales. The scales (0.004, 0.01) put the unit-normal keys near E4M3's top, so a
    kernel that dropped or swapped a scale would be off by 2.5x or more. The hand reference gets the same
    quantized values, so the tolerance is the unquantized one."""
    if splits == "one":
        monkeypatch.setattr(paged, "sm_count", lambda device: 0)
    check_case(*CASES[case], dtype, tol, seed=case, fp8=(0.004, 0.01))
    if case == 2:  # the windowed G = 4 case at Llama-8B's heads, once
        *shape, window = WINDOW_CASES[1]
        check_case(*shape, dtype, tol, seed=case, window=window, fp8=(0.004, 0.01))


class LaunchRecorder:
    """Stands in for `paged._paged_kernel`: records each launch's constexpr `name`, then launches the kernel."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel, self.name, self.seen = kernel, name, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs[self.name])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("splits", ["split", "one"])
def test_fp8_cache_read_in_fp16_for_bf16_queries(poisoned, monkeypatch, splits: str) -> None:
    """`kernels.fp8_in_f16()`: bf16 queries over an FP8 cache run in fp16 (every launch says so): decodes, chunks and a
    windowed case against the hand reference. bf16's rounding of the output (2^-8 of the largest value) and of the
    plain-torch reference's P·V bound the error: 1e-2 (observed 6.1e-3). Under the interpreter a bf16 tl.dot is
    computed wrongly, so a launch left in bf16 fails here too. A query past fp16's range is clamped into it: finite
    outputs; a NaN query stays NaN."""
    if splits == "one":
        monkeypatch.setattr(paged, "sm_count", lambda device: 0)
    recorder = LaunchRecorder(paged._paged_kernel, "FP8_F16")
    monkeypatch.setattr(paged, "_paged_kernel", recorder)
    with kernels.fp8_in_f16():
        for case in (0, 2, 3):
            check_case(*CASES[case], torch.bfloat16, 1e-2, seed=case, fp8=(0.004, 0.01))
        *shape, window = WINDOW_CASES[1]
        check_case(*shape, torch.bfloat16, 1e-2, seed=1, window=window, fp8=(0.004, 0.01))
    assert recorder.seen and all(recorder.seen)
    monkeypatch.setattr(paged, "_fp8_f16", True)  # the rest runs in fp16 too (restored after the test)
    pages = quantize_kv_reference(torch.randn(3, 16, 2, 16, device=KERNEL_DEVICE), torch.ones(1, device=KERNEL_DEVICE))
    q = torch.randn(2, 8, 16, device=KERNEL_DEVICE).to(torch.bfloat16)
    q[0, 3, 5], q[1, 6, 2] = 1e6, float("nan")
    tables = torch.tensor([[1, 2], [2, 1]], dtype=torch.int32, device=KERNEL_DEVICE)
    ones = torch.ones(1, device=KERNEL_DEVICE)
    out = kernels.attention_paged(q, pages, pages, metadata([1, 1], [20, 32], tables), k_scale=ones, v_scale=ones)
    assert out[0].isfinite().all()
    # A NaN query stays NaN through the clamp (the engine ends a request whose logits hold one), and reaches only
    # the rows of its own head.
    assert out[1, 6].isnan().all() and out[1, :6].isfinite().all() and out[1, 7:].isfinite().all()


def test_fp8_cache_needs_its_scales() -> None:
    q = torch.zeros(1, 4, 16)
    pages = torch.zeros(3, 16, 2, 16, dtype=FP8)
    meta = PagedAttentionMetadata(
        torch.ones(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1]), 1
    )
    one = torch.ones(1)
    with pytest.raises(ValueError, match=r"FP8 KV cache needs v_scale as fp32 \[1\]"):
        attention_paged_reference(q, pages, pages, meta, k_scale=one)
    with pytest.raises(ValueError, match=r"not a torch\.float32 one"):
        attention_paged_reference(q, pages.float(), pages.float(), meta, k_scale=one, v_scale=one)
    with pytest.raises(ValueError, match="must both be in q's dtype"):
        attention_paged_reference(q, pages, pages.float(), meta, k_scale=one, v_scale=one)


@pytest.mark.parametrize(
    "tiling",
    [
        paged.Tiling(block_n=32, num_warps=4, num_stages=2, waves=1),
        paged.Tiling(block_n=128, num_warps=8, num_stages=4, waves=8),
    ],
    ids=["32-keys-1-wave", "128-keys-8-waves"],
)
@dtypes("attention_paged")
def test_other_tilings_are_exact_too(poisoned, monkeypatch, tiling, dtype, tol) -> None:
    """The tilings benchmarks/tune_attention.py tries on a GPU compute the same attention as the default one (the
    case mixes decodes at split and page boundaries with a prompt and a chunk). `poisoned` forces the Triton
    kernel: on CPU tensors the dispatch would otherwise run the reference, which never reads a tiling."""
    monkeypatch.setattr(paged, "default_tiling", lambda block_m, block_d, programs, device: tiling)
    check_case(*CASES[3], dtype, tol, seed=3)
    check_case(*CASES[1], dtype, tol, seed=1)


def test_the_split_plan_covers_the_gpu_and_follows_the_capacity(monkeypatch) -> None:
    """Few (sequence, KV head) programs: split until they cover the SMs `waves` times; never more splits than the
    table has tiles, nor than MAX_SPLITS; many programs: none."""
    monkeypatch.setattr(paged, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    tiling = paged.Tiling(block_n=64, num_warps=4, num_stages=3, waves=4)
    assert paged.split_count(8, 8192, tiling, cpu) == 64  # batch 1 x 8 KV heads at 8k: 528 / 8 = 66, capped
    assert paged.split_count(128, 8192, tiling, cpu) == 5  # batch 16
    assert paged.split_count(512, 8192, tiling, cpu) == 2  # batch 64
    assert paged.split_count(8, 100, tiling, cpu) == 2  # a 100-key table holds 2 tiles
    assert paged.split_count(4096, 8192, tiling, cpu) == 1
    one_wave = paged.Tiling(block_n=128, num_warps=4, num_stages=3, waves=1)
    assert paged.split_count(8, 8192, one_wave, cpu) == 17  # 132 / 8 = 16.5 -> 17
    assert paged.split_count(8, 1000, one_wave, cpu) == 8  # 1000 keys hold 8 tiles of 128


def test_the_default_tiling_splits_tall_tiles_more_where_the_pairs_are_few(monkeypatch) -> None:
    """default_tiling's waves, the rule its docstring argues from the H200 runs: 16-row tiles (G <= 16) cover the
    SMs twice; 32- and 64-row ones (G = 32, 64) once where the (sequence, KV head) pairs fill a quarter of the SMs
    (batch 64 x 1 KV head), 4 times below that (batch 16, batch 1); a prefill tile takes 8 warps."""
    monkeypatch.setattr(paged, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert [paged.default_tiling(16, 128, pairs, cpu).waves for pairs in (8, 128, 512)] == [2, 2, 2]
    assert [paged.default_tiling(64, 128, pairs, cpu).waves for pairs in (1, 16, 32, 33, 64)] == [4, 4, 4, 1, 1]
    assert paged.default_tiling(32, 128, 128, cpu).waves == 1
    assert paged.default_tiling(128, 128, 1, cpu) == paged.Tiling(64, num_warps=8, num_stages=2)


@dtypes("attention_paged")
@pytest.mark.parametrize(
    "pages", [[[1], [2], [3]], [[4], [1], [3]], [[9], [1], [5]]], ids=["in-order", "holes", "far-apart"]
)
def test_one_page_per_sequence(poisoned, dtype, tol, pages) -> None:
    """Each sequence in one page of a whole context (`--page-size` at the context). Decode tokens in consecutive
    pages are read in place; with a page between them that no sequence owns (NaN), and in another order, too;
    pages far apart are copied out."""
    check_case([(1, 90), (1, 7), (1, 128)], 8, 2, 16, 128, dtype, tol, seed=20, pages=pages)
    check_case([(1, 90), (30, 30), (1, 128)], 8, 2, 16, 128, dtype, tol, seed=21, pages=pages)  # a prompt among them


@dtypes("attention_paged")
@pytest.mark.parametrize(
    ("pages", "in_place"), [([[3, 4, 5, 6]], True), ([[3, 4, 6, 5]], False)], ids=["in-a-row", "out-of-order"]
)
def test_lone_decode_sequence(poisoned, dtype, tol, pages, in_place) -> None:
    """One sequence decoding alone (a lone request's pages are usually in a row, from the lowest free ones): the
    plain-torch path reads pages in a row in place, between pages no sequence owns (2 and 7, NaN), and gathers
    them otherwise; both equal the hand reference."""
    check_case([(1, 50)], 8, 2, 16, 16, dtype, tol, seed=22, pages=pages)
    tables = torch.tensor([pages[0] + [10**6]], dtype=torch.int32, device=KERNEL_DEVICE)
    meta = metadata([1], [50], tables)
    q = torch.zeros(1, 8, 16, device=KERNEL_DEVICE, dtype=dtype)
    kv = torch.zeros(8, 16, 2, 16, device=KERNEL_DEVICE, dtype=dtype)
    attention_paged_reference(q, kv, kv, meta)
    (plan,) = [v for k, v in meta._derived.items() if k[0] == "torch plan"]
    assert (plan.run == (3, 7)) if in_place else (plan.run is None and plan.keys.tolist() == [pages[0]])


@dtypes("attention_paged")
def test_queries_of_any_strides(poisoned, dtype, tol) -> None:
    """A q whose head dimension is not contiguous gives the attention of its values (the kernel steps through it
    one element at a time: the launcher makes such a q contiguous; before, the output was garbage)."""
    check_case(*CASES[3], dtype, tol, seed=3, strided=True)


@pytest.mark.slow
def test_paged_attention_128k_context(poisoned) -> None:
    """The longest context the issue names (128k): one decode token over 8,192 pages, 64 splits of 2,048 keys."""
    check_case([(1, 131_072)], 8, 1, 16, 16, torch.float16, TOLERANCES["attention_paged"][torch.float16], seed=30)


def test_paged_attention_rejects_mismatched_shapes() -> None:
    q = torch.zeros(3, 8, 16)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    pages = torch.zeros(4, 16, 3, 16)  # 3 KV heads do not divide 8 query heads
    meta = PagedAttentionMetadata(tables, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        attention_paged_reference(q, pages, pages, meta)
    half = torch.zeros(4, 16, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="must both be in q's dtype"):
        attention_paged_reference(q, half, half, meta)
    meta = PagedAttentionMetadata(tables, torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([3]), 2)
    with pytest.raises(ValueError, match="disagree on the batch"):
        attention_paged_reference(q, torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16), meta)
