"""Triton RMSNorm, SwiGLU FFN and RoPE kernels against their plain-torch references.

On a machine without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest),
in float32 and float16 (conftest's KERNEL_DTYPES). Every buffer the launchers allocate is NaN-poisoned first
and guarded by NaN canaries (the `poisoned` fixture), so an unwritten tile or an out-of-bounds write fails.
Shapes are explicit and awkward on purpose: M = 1, 3, 63, 130; widths that no block size divides.

Tolerances, relative to the largest reference value, and their reasons: conftest's TOLERANCES.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from tessera import kernels
from tessera.kernels import ffn, gemm
from tessera.kernels.ffn import swiglu_ffn_reference
from tessera.kernels.fp8 import FP8, quantize_kv_reference, quantize_rows_reference
from tessera.kernels.norm import rms_norm_reference
from tessera.kernels.rope import apply_rope_reference, rope_and_cache_reference

from .conftest import DTYPE_IDS, KERNEL_DEVICE, KERNEL_DTYPES, TOLERANCES, Poison, dtypes, randn, relative_error


@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (63, 257), (130, 1000), (2, 5, 4096)])
@dtypes("rms_norm")
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(poisoned, shape: tuple[int, ...], dtype: torch.dtype, tol: float, with_residual: bool) -> None:
    x, weight = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1) * 0.3 + 1
    residual = randn(*shape, dtype=dtype, scale=4.0, seed=2) if with_residual else None
    out = kernels.rms_norm(x, weight, 1e-5, residual)
    expected = rms_norm_reference(x, weight, 1e-5, residual)
    if with_residual:
        (out, new_residual), (expected, expected_residual) = out, expected
        # One addition rounded once to the activation dtype on both sides: bit-identical.
        torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, expected) <= tol


def test_rms_norm_rejects_wrong_shapes(poisoned) -> None:
    x = randn(3, 64)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rms_norm(x, randn(32), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        kernels.rms_norm(x, randn(64), 1e-5, residual=randn(3, 32))


def _ffn_inputs(m: int, hidden: int, inter: int, dtype: torch.dtype):
    # Scaled so pre-activations are O(1): silu is then exercised on both sides of 0, not saturated.
    x = randn(m, hidden, dtype=dtype)
    w_gate_up = randn(2 * inter, hidden, dtype=dtype, scale=hidden**-0.5, seed=1)
    w_down = randn(hidden, inter, dtype=dtype, scale=inter**-0.5, seed=2)
    return x, w_gate_up, w_down, randn(m, hidden, dtype=dtype, seed=3)


def _check_ffn(m: int, hidden: int, inter: int, dtype: torch.dtype, tol: float, with_residual: bool) -> None:
    x, w_gate_up, w_down, residual = _ffn_inputs(m, hidden, inter, dtype)
    residual = residual if with_residual else None
    out = kernels.swiglu_ffn(x, w_gate_up, w_down, residual)
    up = [t.float() if t is not None else None for t in (x, w_gate_up, w_down, residual)]
    expected = swiglu_ffn_reference(*up)
    assert out.dtype == dtype and out.shape == (m, hidden)
    assert relative_error(out, expected) <= tol


# (M, hidden, intermediate): decode and prefill row counts (each of the four block-shape ranges), widths no
# block size divides.
FFN_SHAPES = [(1, 64, 200), (3, 48, 130), (63, 64, 300), (130, 96, 200), (17, 40, 1000), (257, 32, 130)]


@pytest.mark.parametrize("shape", FFN_SHAPES, ids=str)
@dtypes("swiglu_ffn")
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_swiglu_ffn(poisoned, shape: tuple[int, int, int], dtype: torch.dtype, tol: float, with_residual: bool) -> None:
    _check_ffn(*shape, dtype, tol, with_residual)


@dtypes("swiglu_ffn", only=(torch.float16,))
def test_swiglu_ffn_fused_group_width(poisoned, dtype: torch.dtype, tol: float) -> None:
    """An FFN-Fusion group is wider than 65,536 (where Liger's SwiGLU stops); at M = 1 the down GEMM splits
    its 70,000-long reduction across programs (split-K) and sums the partials with the residual."""
    _check_ffn(1, 32, 70_001, dtype, tol, with_residual=True)


@pytest.mark.slow
@pytest.mark.parametrize("m", [3, 130])
@dtypes("swiglu_ffn")
def test_swiglu_ffn_fused_group_width_more_rows(poisoned, m: int, dtype: torch.dtype, tol: float) -> None:
    _check_ffn(m, 32, 70_001, dtype, tol, with_residual=m == 3)


class _Launches:
    """Counts a Triton kernel's launches (kernel[grid](...)) while passing them on."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _spy_persistent(monkeypatch) -> tuple[_Launches, _Launches]:
    """Spies on both persistent kernels, launched with at most 3 programs: each walks several tiles (and split-K
    slices), as on a GPU whose SMs are fewer than the work items."""
    gate_up, down = _Launches(ffn._persistent_gate_up_kernel), _Launches(gemm._persistent_matmul_kernel)
    monkeypatch.setattr(ffn, "_persistent_gate_up_kernel", gate_up)
    monkeypatch.setattr(gemm, "_persistent_matmul_kernel", down)
    for module in (ffn, gemm):
        monkeypatch.setattr(module, "persistent_programs", lambda work, device: min(work, 3))
    return gate_up, down


# (M, hidden, intermediate) with 16-byte aligned rows in fp16 (what tensor descriptors need): each block-shape
# range, an intermediate no gate tile divides (gate tiles reach into the up rows), a long reduction split over K.
PERSISTENT_SHAPES = [(1, 64, 200), (17, 48, 136), (70, 64, 296), (300, 32, 136), (1, 64, 4096)]


@pytest.mark.parametrize("shape", PERSISTENT_SHAPES, ids=str)
@dtypes("swiglu_ffn")
def test_persistent_tma_schedule_computes_the_same_ffn(poisoned, monkeypatch, shape, dtype, tol) -> None:
    """Both GEMMs on the persistent schedule (tensor descriptors, SM-count programs walking the tiles) against the
    reference, with the residual; the spies show the persistent kernels ran, not the portable ones."""
    gate_up, down = _spy_persistent(monkeypatch)
    x, w_gate_up, w_down, residual = _ffn_inputs(*shape, dtype)
    out = ffn.swiglu_ffn_triton(x, w_gate_up, w_down, residual, persistent=True)
    expected = swiglu_ffn_reference(*(t.float() for t in (x, w_gate_up, w_down, residual)))
    assert out.dtype == dtype and relative_error(out, expected) <= tol
    assert gate_up.grids == [(3,)] and len(down.grids) == 1  # gate/up has >= 3 tiles: some programs take several


def test_persistent_schedule_falls_back_where_descriptors_cannot_go(poisoned, monkeypatch) -> None:
    """Rows of 130 fp16 values (260 bytes) are not 16-byte aligned: the portable kernels run, with the same result."""
    gate_up, down = _spy_persistent(monkeypatch)
    x, w_gate_up, w_down, residual = _ffn_inputs(5, 64, 130, torch.float16)
    out = ffn.swiglu_ffn_triton(x, w_gate_up, w_down, residual, persistent=True)
    expected = swiglu_ffn_reference(*(t.float() for t in (x, w_gate_up, w_down, residual)))
    assert relative_error(out, expected) <= TOLERANCES["swiglu_ffn"][torch.float16]
    assert len(gate_up.grids) == 1 and down.grids == []  # gate/up's rows are 64 wide: aligned; down's are not


@pytest.mark.parametrize("m", [1, 40])
def test_persistent_schedule_with_fp8_weights_bias_and_split_k(poisoned, monkeypatch, m: int) -> None:
    """FP8 operands through descriptors, the token and channel scales, bias and residual in the shared epilogue,
    and (M = 1, K = 4000) split-K partials summed after, the last slice short: against the float64 product of the
    same FP8 values."""
    _, down = _spy_persistent(monkeypatch)
    k, n = 4000, 96
    a, a_scale = quantize_rows_reference(randn(m, k))
    w, w_scale = kernels.quantize_weight(randn(n, k, seed=1))
    bias, residual = randn(n, seed=2), randn(m, n, seed=3)
    out = gemm.matmul_triton(a, w, torch.float32, a_scale, w_scale, bias, residual, persistent=True)
    expected = (a.double() * a_scale.double()[:, None]) @ (w.double() * w_scale.double()[:, None]).T
    # The products are exact and summed in fp32 (observed <= 3e-7 here). On Hopper a 64-row tile multiplies on FP8
    # tensor cores, which accumulate in a float of ~13 mantissa bits between promotions to fp32 (every K tile).
    tol = 1e-3 if KERNEL_DEVICE == "cuda" and m > 16 else 1e-5
    assert relative_error(out.double(), expected + bias.double() + residual.double()) <= tol
    assert down.grids == [(3,)]


def test_split_k_sums_in_split_order_whoever_arrives_last_and_leaves_the_counters_at_zero(
    poisoned, monkeypatch
) -> None:
    """Split-K's sum is made by whichever split finishes its tile last (gemm.arrived_last), always in split order.
    (M = 1, K = 4096, N = 96): 2 tiles of 4 splits of 1,024. Under the interpreter the portable schedule's programs
    run in grid order, the highest split last; on the persistent one 3 programs walk the 8 items and tile 0's
    splits arrive 0, 3, 2, 1 (on a GPU, in any order). Each split's partial is exact (one nonzero product: 2^24, 1,
    1, -2^24), their fp32 sum is not: in split order ((2^24 + 1) + 1) - 2^24 rounds to 0 (2^24 + 1 ties to 2^24), in
    tile 0's interpreted arrival order it is 2. Every counter is back at 0 after (a CUDA graph replays them with no
    reset)."""
    down = _spy_persistent(monkeypatch)[1]
    a, w = torch.ones(1, 4096), torch.zeros(96, 4096)
    for split, value in enumerate([2.0**24, 1.0, 1.0, -(2.0**24)]):
        w[:, split * 1024 + 5] = value
    a, w = a.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE)
    for persistent in (False, True):
        out = gemm.matmul_triton(a, w, torch.float32, persistent=persistent)
        assert out.tolist() == [[0.0] * 96], persistent
    assert down.grids == [(3,)]
    assert not gemm.arrival_counters(a.device, 2).any()


def test_gate_up_splits_k_sums_in_split_order_and_leaves_the_counters_at_zero(poisoned, monkeypatch) -> None:
    """A narrow FFN at one row (I = 96: 2 gate tiles) splits the gate/up GEMM's K = 4,096 in 4 splits of 1,024, as the
    down GEMM splits. The gate's four splits hold exact partials 2^24, 1, 1, -2^24 (up is 1): summed in split order
    the gate is 0, so h = silu(0)·1 = 0 and the output (a sum of h) is exactly 0; summed in any other order (or
    each split's silu taken before the sum) it is not. Unsplit, K's order gives the same 0. Counters end at 0."""
    launches = _Launches(ffn._gate_up_kernel)
    monkeypatch.setattr(ffn, "_gate_up_kernel", launches)
    hidden, inter = 4096, 96
    x, w_gate_up, w_down = torch.ones(1, hidden), torch.zeros(2 * inter, hidden), torch.ones(hidden, inter)
    for split, value in enumerate([2.0**24, 1.0, 1.0, -(2.0**24)]):
        w_gate_up[:inter, split * 1024 + 5] = value
    w_gate_up[inter:, 5] = 1.0
    x, w_gate_up, w_down = x.to(KERNEL_DEVICE), w_gate_up.to(KERNEL_DEVICE), w_down.to(KERNEL_DEVICE)
    for split_k in (True, False):
        out = ffn.swiglu_ffn_triton(x, w_gate_up, w_down, split_k=split_k)
        assert out.tolist() == [[0.0] * hidden], split_k
    assert launches.grids == [(2, 4), (2, 1)]
    assert not gemm.arrival_counters(x.device, 2).any()


@pytest.mark.parametrize("shape", [(1, 4096, 200), (3, 2048, 130), (16, 2064, 70)], ids=str)
@dtypes("swiglu_ffn")
def test_swiglu_ffn_with_the_gate_up_split_over_k(poisoned, shape, dtype: torch.dtype, tol: float) -> None:
    """Decode rows of narrow FFNs over long reductions, each splitting the gate/up GEMM over K (4, 2 and 2 splits;
    2,064 = 16 K tiles of 128 and 16 columns: splits of 9 tiles and of 7 and 16 columns), against the float
    reference."""
    _check_ffn(*shape, dtype, tol, with_residual=True)
    x, w_gate_up, w_down, _ = _ffn_inputs(3, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="expected w_gate_up"):
        kernels.swiglu_ffn(x, w_gate_up[:150], w_down)
    with pytest.raises(ValueError, match="differ"):
        kernels.swiglu_ffn(x.half(), w_gate_up, w_down)


# (precision, M, hidden, intermediate): decode rows whose gate/up GEMM splits K (a 4,096 reduction over few
# columns), decode rows whose down GEMM splits (a 4,096-wide intermediate), prefill rows, FP8 at both.
SWEEP_CASES = [
    ("bf16", 1, 4096, 72),
    ("bf16", 1, 96, 4096),
    ("bf16", 130, 96, 200),
    ("fp8", 3, 96, 200),
    ("fp8", 70, 96, 200),
]


@pytest.mark.parametrize(("precision", "m", "hidden", "inter"), SWEEP_CASES, ids=str)
def test_every_tiling_the_gemm_sweep_tries_computes_the_ffn(
    poisoned, monkeypatch, precision: str, m: int, hidden: int, inter: int
) -> None:
    """benchmarks/tune_gemm.py times each (gate/up, down) tiling pair on a GPU and ranks only those matching cuBLAS;
    here each pair, in the sweep's decode (m <= 16) or prefill list, runs through the launches it names (the grids
    follow its tiles, and split K where the case says) and computes the reference's FFN (fp16 stands in for bf16
    under the interpreter; FP8 codes as served); past 16 rows in bf16 on the persistent schedule too (the sweep
    times its best pair so). Widths no tile divides."""
    if KERNEL_DEVICE == "cuda":  # ~200 more kernels to compile in the GPU suite's test step, whose limit is 140 s
        pytest.skip("on a GPU the sweep checks each candidate against cuBLAS before it times it")
    tune_gemm = pytest.importorskip("tessera.benchmarks.tune_gemm")
    gate_up_launches, down_launches = _Launches(ffn._gate_up_kernel), _Launches(gemm._matmul_kernel)
    monkeypatch.setattr(ffn, "_gate_up_kernel", gate_up_launches)
    monkeypatch.setattr(gemm, "_matmul_kernel", down_launches)
    x, w_gate_up, w_down, residual = _ffn_inputs(m, hidden, inter, torch.float16)
    scales = ()
    if precision == "fp8":
        (w_gate_up, gate_up_scale), (w_down, down_scale) = map(kernels.quantize_weight, (w_gate_up, w_down))
        scales = gate_up_scale, down_scale
    if scales:  # the reference rounds h to x's dtype before quantizing it, as the kernels do (test_fp8's test)
        expected, tol = swiglu_ffn_reference(x, w_gate_up, w_down, residual, *scales).float(), 2e-3
    else:
        expected = swiglu_ffn_reference(x.float(), w_gate_up.float(), w_down.float(), residual.float())
        tol = TOLERANCES["swiglu_ffn"][torch.float16]
    pairs = tune_gemm._pairs(precision, m)
    size = 1 if scales else 2
    assert len(pairs) >= 15 and pairs[0] == (ffn.gate_up_blocks(m, size), gemm.gemm_blocks(m, size))
    schedules = (False, True) if precision == "bf16" and m > gemm.DECODE_ROWS else (False,)
    for (gate_up, down), persistent in itertools.product(pairs, schedules):
        tilings = {"gate_up_tiling": gate_up, "down_tiling": down, "persistent": persistent}
        out = ffn.swiglu_ffn_triton(x, w_gate_up, w_down, residual, *scales, **tilings)
        assert relative_error(out, expected) <= tol, (gate_up, down, persistent)
        if persistent:
            continue
        (gate_tiles, gate_splits), (down_tiles, down_splits) = gate_up_launches.grids[-1], down_launches.grids[-1]
        assert gate_tiles == triton.cdiv(m, gate_up.block_m) * triton.cdiv(inter, gate_up.block_n)
        assert down_tiles == triton.cdiv(m, down.block_m) * triton.cdiv(hidden, down.block_n)
        assert (gate_splits > 1) == (hidden == 4096) and (down_splits > 1) == (inter == 4096), (gate_up, down)


@pytest.mark.parametrize("n_tokens", [1, 3, 63])
@dtypes("rope")
def test_apply_rope_on_packed_qkv_view(poisoned, n_tokens: int, dtype: torch.dtype, tol: float) -> None:
    """q and k are rotated together as a strided view of the packed qkv projection, as the runtime does."""
    n_q, n_kv, head_dim = 6, 2, 24
    qkv = randn(n_tokens, (n_q + 2 * n_kv) * head_dim, dtype=dtype)
    qk = qkv[:, : (n_q + n_kv) * head_dim].view(n_tokens, n_q + n_kv, head_dim)
    angles = torch.rand(n_tokens, head_dim // 2, generator=torch.Generator().manual_seed(1)) * 100
    cos, sin = angles.cos().to(KERNEL_DEVICE), angles.sin().to(KERNEL_DEVICE)
    out = kernels.apply_rope(qk, cos, sin)
    assert relative_error(out, apply_rope_reference(qk, cos, sin)) <= tol


N_Q, N_KV, HEAD_DIM, N_SLOTS = 6, 2, 24, 80  # the rope_and_cache tests' layer


def _engine_step_qkv(n_tokens: int, dtype: torch.dtype):
    """q/k and v as views of one packed qkv output (as an engine step has them), RoPE tables of large angles, and
    scattered slots of an N_SLOTS-slot cache: (qk, v, cos, sin, slots)."""
    qkv = randn(n_tokens, (N_Q + 2 * N_KV) * HEAD_DIM, dtype=dtype)
    qk = qkv[:, : (N_Q + N_KV) * HEAD_DIM].view(n_tokens, N_Q + N_KV, HEAD_DIM)
    v = qkv[:, (N_Q + N_KV) * HEAD_DIM :].view(n_tokens, N_KV, HEAD_DIM)
    angles = torch.rand(n_tokens, HEAD_DIM // 2, generator=torch.Generator().manual_seed(1)) * 100
    cos, sin = angles.cos().to(KERNEL_DEVICE), angles.sin().to(KERNEL_DEVICE)
    slots = torch.randperm(N_SLOTS, generator=torch.Generator().manual_seed(2))[:n_tokens].to(KERNEL_DEVICE)
    return qk, v, cos, sin, slots


@pytest.mark.parametrize("n_tokens", [1, 3, 63])
@dtypes("rope")
def test_rope_and_cache_rotates_and_stores_in_one_kernel(poisoned, n_tokens: int, dtype: torch.dtype, tol: float):
    """`rope_and_cache` on the packed qkv view, as an engine step calls it: the queries and keys it returns and the
    keys it stores are the reference's rotation (within the RoPE tolerance), the values land in the cache bit for bit,
    at the given slots (scattered, not in order) and nowhere else; the pools are canary-guarded."""
    qk, v, cos, sin, slots = _engine_step_qkv(n_tokens, dtype)
    pools = [torch.empty(N_SLOTS, N_KV, HEAD_DIM, dtype=dtype, device=KERNEL_DEVICE).fill_(7.0) for _ in range(2)]
    expected_pools = [pool.clone() for pool in pools]
    rotated = kernels.rope_and_cache(qk, v, cos, sin, *pools, slots)
    expected = rope_and_cache_reference(qk, v, cos, sin, *expected_pools, slots)
    assert rotated.shape == qk.shape and relative_error(rotated, expected) <= tol
    # The keys it returns are the keys it stored, bit for bit.
    torch.testing.assert_close(pools[0][slots], rotated[:, N_Q:], rtol=0, atol=0)
    assert relative_error(pools[0][slots], expected_pools[0][slots]) <= tol
    torch.testing.assert_close(pools[1], expected_pools[1], rtol=0, atol=0)
    others = torch.ones(N_SLOTS, dtype=torch.bool, device=KERNEL_DEVICE)
    others[slots] = False
    assert (pools[0][others] == 7.0).all()
    with pytest.raises(ValueError, match="rope_and_cache: qk"):
        kernels.rope_and_cache(qk, v, cos, sin, *pools, slots[:0])
    with pytest.raises(ValueError, match="share one layout"):
        kernels.rope_and_cache(qk, v, cos, sin, pools[0], pools[1].transpose(0, 1).contiguous().transpose(0, 1), slots)
    # Slots as a strided view (every other entry of a longer tensor) land where their values say.
    spread = torch.stack([slots, torch.zeros_like(slots)], dim=1)[:, 0]
    expected_pools = [pool.clone() for pool in pools]
    kernels.rope_and_cache(qk, v, cos, sin, *pools, spread)
    rope_and_cache_reference(qk, v, cos, sin, *expected_pools, slots)
    torch.testing.assert_close(pools[1], expected_pools[1], rtol=0, atol=0)


@pytest.mark.parametrize("n_tokens", [1, 63])
@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        *(pytest.param(d, TOLERANCES["rope"][d], id=DTYPE_IDS[d]) for d in KERNEL_DTYPES),
        # No tl.dot here, so the interpreter's bf16 is right. Both sides rotate in fp32 and round once to bf16;
        # fp32 results a last bit apart can round to neighbouring bf16 values: one ulp, <= 2^-7 of the largest.
        pytest.param(torch.bfloat16, 8e-3, id="bf16"),
    ],
)
def test_rope_and_cache_into_an_fp8_cache(poisoned, n_tokens: int, dtype: torch.dtype, tol: float) -> None:
    """An FP8 cache stores the rotated keys it returns divided by k_scale, and the values divided by v_scale,
    each rounded to E4M3 exactly as quantize_kv_reference (torch's conversion) rounds it: bit for bit. A value
    scale of 0.002 clamps the values past 0.896 (about 37 % of unit-normal inputs) to ±448."""
    qk, v, cos, sin, slots = _engine_step_qkv(n_tokens, dtype)
    k_scale, v_scale = torch.tensor([0.01], device=KERNEL_DEVICE), torch.tensor([0.002], device=KERNEL_DEVICE)
    pools = [torch.full((N_SLOTS, N_KV, HEAD_DIM), 7.0, device=KERNEL_DEVICE).to(FP8) for _ in range(2)]
    expected_pools = [pool.clone() for pool in pools]
    rotated = kernels.rope_and_cache(qk, v, cos, sin, *pools, slots, k_scale, v_scale)
    expected = rope_and_cache_reference(qk, v, cos, sin, *expected_pools, slots, k_scale, v_scale)
    assert relative_error(rotated, expected) <= tol
    as_bits = lambda t: t.view(torch.uint8)  # noqa: E731 (FP8 has no == on every torch)
    assert torch.equal(as_bits(pools[0][slots]), as_bits(quantize_kv_reference(rotated[:, N_Q:], k_scale)))
    assert torch.equal(as_bits(pools[1]), as_bits(expected_pools[1]))
    assert (pools[1][slots].float().abs() == 448).any()  # the clamp was exercised
    others = torch.ones(N_SLOTS, dtype=torch.bool, device=KERNEL_DEVICE)
    others[slots] = False
    assert (pools[0][others].float() == 7.0).all()
    with pytest.raises(ValueError, match="FP8 KV cache needs k_scale"):
        kernels.rope_and_cache(qk, v, cos, sin, *pools, slots)
    with pytest.raises(ValueError, match="scales are for an FP8 cache"):
        plain = [qk.new_zeros(N_SLOTS, N_KV, HEAD_DIM) for _ in range(2)]
        kernels.rope_and_cache(qk, v, cos, sin, *plain, slots, k_scale, v_scale)


@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, OVERRUN: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x, mask=offs < n + OVERRUN)  # OVERRUN = 1: the off-by-one mask `offs <= n`


@pytest.mark.parametrize("overrun", [0, 1], ids=["in-bounds", "one-past-the-end"])
def test_poison_canaries_catch_a_kernel_writing_past_the_end(monkeypatch, overrun: int) -> None:
    """The `poisoned` fixture's own test: a copy kernel whose store mask lets one element past the end through
    writes into the canary, and the check names the offset."""
    poison = Poison(monkeypatch)
    x = randn(100)
    out = torch.empty_like(x)
    _copy_kernel[(1,)](x, out, x.numel(), BLOCK=128, OVERRUN=overrun)
    torch.testing.assert_close(out, x, rtol=0, atol=0)  # the region itself is right either way
    if overrun:
        with pytest.raises(AssertionError, match=r"100-element buffer at element offsets \[100\]"):
            poison.check()
    else:
        poison.check()


@pytest.mark.parametrize(
    "allocate",
    [lambda: torch.empty(3, 5), lambda: torch.empty_like(torch.ones(3, 5)), lambda: torch.ones(1).new_empty(3, 5)],
    ids=["empty", "empty_like", "new_empty"],
)
def test_poison_guards_every_allocation(monkeypatch, allocate) -> None:
    """Each allocation the fixture patches comes back NaN, contiguous, and between canaries: a write one element
    before the start fails the check too."""
    poison = Poison(monkeypatch)
    out = allocate()
    assert out.shape == (3, 5) and out.is_contiguous() and out.isnan().all()
    poison.check()
    out.as_strided((1,), (1,), out.storage_offset() - 1).fill_(0.0)
    with pytest.raises(AssertionError, match=r"15-element buffer at element offsets \[-1\]"):
        poison.check()
