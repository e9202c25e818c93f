"""The FFN's measured tiling tables (kernels/ffn_tilings.py): reading one (and refusing a malformed one by file and
field), the plan an FFN of some rows takes, how `kernels.swiglu_ffn` routes it by that plan (Triton with its
tilings, or cuBLAS where the table measured cuBLAS faster), and the plan's tilings in the launches."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import triton

from tessera import kernels
from tessera.kernels import ffn, ffn_tilings, gemm
from tessera.kernels.ffn import swiglu_ffn_reference
from tessera.kernels.fp8 import Fp8Rows
from tessera.kernels.gemm import GemmTiling

from .conftest import KERNEL_DEVICE, TOLERANCES, kernel_backend, relative_error
from .test_kernels import _ffn_inputs, _Launches, _spy_persistent

DECODE_GATE_UP, DECODE_DOWN = GemmTiling(16, 32, 64, 4, 2), GemmTiling(16, 32, 64, 4, 3, group_m=4)
PREFILL = GemmTiling(32, 32, 32, 4, 2)  # no built-in tiling's tiles: the launches tell it apart


def entry(precision: str, rows: int, speedup: float, gate_up: GemmTiling, down: GemmTiling, persistent=False):
    return {
        "precision": precision,
        "rows": rows,
        "gate_up": asdict(gate_up),
        "down": asdict(down),
        "persistent": persistent,
        "speedup": speedup,
    }


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A table steering every device (TESSERA_FFN_TILINGS): bf16 faster than cuBLAS at 1, 16, 2,048 and 4,096 rows
    and slower at 128; FP8 faster at 1 row, slower at 2,048."""
    path = tmp_path / "ffn_tilings.json"
    entries = [
        entry("bf16", 1, 1.08, DECODE_GATE_UP, DECODE_DOWN),
        entry("bf16", 16, 1.10, DECODE_GATE_UP, DECODE_DOWN, persistent=True),
        entry("bf16", 128, 0.80, PREFILL, PREFILL),
        entry("bf16", 2048, 1.05, PREFILL, PREFILL, persistent=True),
        entry("bf16", 4096, 1.00, PREFILL, PREFILL),
        entry("fp8", 1, 1.30, DECODE_GATE_UP, DECODE_DOWN),
        entry("fp8", 2048, 0.70, PREFILL, PREFILL),
    ]
    path.write_text(json.dumps({"device": "test", "entries": entries}))
    monkeypatch.setenv(ffn_tilings.TABLE_ENV, str(path))
    return path


@pytest.mark.parametrize(
    ("rows", "precision", "plan_rows", "triton"),
    [(1, "bf16", 1, True), (8, "bf16", 16, True), (16, "bf16", 16, True), (17, "bf16", 128, False),
     (32, "bf16", 128, False), (700, "bf16", 2048, False), (2048, "bf16", 2048, True), (3000, "bf16", 4096, True),
     (9000, "bf16", 4096, True), (1, "fp8", 1, True), (40, "fp8", 2048, False)],
)  # fmt: skip
def test_an_ffn_takes_the_plan_nearest_its_rows_within_its_regime(table, rows, precision, plan_rows, triton) -> None:
    """Log distances: 8 rows are 2.1 from the 1-row entry and 0.7 from the 16-row one; 3,000 rows 0.38 from 2,048
    and 0.31 from 4,096. A decode entry (<= 16 rows) never steers 17 or 32 rows (16-row tiles were measured at 16),
    nor a prefill entry decode rows. Between two entries Triton runs only if both measured it as fast as the
    baseline: 700 rows lie between 128 (0.8x) and 2,048 (1.05x), so cuBLAS runs them with 2,048's tilings unused;
    past the last entry its own measurement says."""
    plan = ffn_tilings.plan(rows, precision, torch.device("cpu"))
    assert (plan.rows, plan.triton) == (plan_rows, triton)


def test_no_table_no_plan(table, tmp_path, monkeypatch) -> None:
    """The CPU has no committed table; an empty TESSERA_FFN_TILINGS turns every table off; a table without entries of
    a precision, or of a regime, has no plan there."""
    monkeypatch.delenv(ffn_tilings.TABLE_ENV)
    assert ffn_tilings.plan(1, "bf16", torch.device("cpu")) is None
    monkeypatch.setenv(ffn_tilings.TABLE_ENV, "")
    assert ffn_tilings.plan(1, "bf16", torch.device("cpu")) is None
    decode_only = tmp_path / "decode_only.json"
    decode_only.write_text(json.dumps({"entries": [entry("bf16", 1, 1.1, DECODE_GATE_UP, DECODE_DOWN)]}))
    monkeypatch.setenv(ffn_tilings.TABLE_ENV, str(decode_only))
    assert ffn_tilings.plan(1, "fp8", torch.device("cpu")) is None
    assert (
        ffn_tilings.plan(100, "bf16", torch.device("cpu")) is None
        and ffn_tilings.plan(9, "bf16", torch.device("cpu")).rows == 1
    )


def test_a_gpu_finds_its_committed_table_by_name(tmp_path, monkeypatch) -> None:
    """Without TESSERA_FFN_TILINGS a GPU reads kernels/configs/<its name>_ffn_tilings.json, the name tune_gemm
    writes: as it is, no renaming. Another GPU's table is not its."""
    monkeypatch.delenv(ffn_tilings.TABLE_ENV, raising=False)
    monkeypatch.setattr(ffn_tilings, "CONFIG_DIR", tmp_path)
    (tmp_path / "nvidia-h200_ffn_tilings.json").write_text(
        json.dumps({"entries": [entry("bf16", 1, 1.2, DECODE_GATE_UP, DECODE_DOWN)]})
    )
    names = {0: "NVIDIA H200", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[torch.device(device).index])
    ffn_tilings._committed.cache_clear()
    try:
        assert ffn_tilings.table_name(torch.device("cuda", 0)) == "nvidia-h200_ffn_tilings.json"
        assert ffn_tilings.plan(1, "bf16", torch.device("cuda", 0)).speedup == 1.2
        assert ffn_tilings.plan(1, "bf16", torch.device("cuda", 1)) is None
    finally:
        ffn_tilings._committed.cache_clear()


def test_the_route_follows_the_table_past_sixteen_rows_and_back_to_cublas(table, monkeypatch) -> None:
    """On a GPU (the backend's choice faked: Triton, not forced), each FFN runs where its plan says: Triton at 1 and
    3,000 rows, cuBLAS at 100 and 700 (the 128-row entry measured 0.8x), FP8 on `_scaled_mm` at 2,048 rows (0.7x),
    its activations quantized already (Fp8Rows, from the norm) or not; fp32 activations and a GPU without a table
    keep the built-in rule (Triton up to 16 rows). Forcing Triton (the tests, TESSERA_KERNELS) overrides the table's
    choice, not its tilings."""
    monkeypatch.setattr(kernels, "backend", lambda *tensors: "triton")
    w_gate_up, w_down = torch.empty(512, 256, dtype=torch.bfloat16), torch.empty(256, 256, dtype=torch.bfloat16)

    def route(rows: int, dtype=torch.bfloat16, fp8: bool = False, quantized: bool = False):
        x = torch.empty(rows, 256, dtype=dtype)
        if quantized:
            x = Fp8Rows(x.to(kernels.FP8), torch.ones(rows), dtype)
        where, plan = kernels.ffn_route(x, w_gate_up, w_down, fp8=fp8)
        return where, None if plan is None else plan.rows

    with kernel_backend(None):
        assert [route(1), route(3000), route(100), route(700)] == [
            ("triton", 1),
            ("triton", 4096),
            ("cublas", 128),
            ("cublas", 2048),
        ]
        assert route(2048, fp8=True) == ("scaled_mm", 2048) == route(2048, fp8=True, quantized=True)
        assert route(1, fp8=True) == ("triton", 1) == route(1, fp8=True, quantized=True)
        assert route(1, torch.float32) == ("triton", None) and route(100, torch.float32) == ("cublas", None)
        monkeypatch.setenv(ffn_tilings.TABLE_ENV, "")
        assert route(700) == ("cublas", None) and route(16) == ("triton", None)
        assert route(2048, fp8=True, quantized=True) == ("scaled_mm", None) and route(1, fp8=True) == ("triton", None)
        monkeypatch.setenv(ffn_tilings.TABLE_ENV, str(table))
    with kernel_backend("triton"):
        assert route(100) == ("triton", 128)


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's launches; on a GPU the suite's ffn_served rows")
@pytest.mark.parametrize("m", [3, 40])
def test_the_served_ffn_launches_its_plans_tilings(table, monkeypatch, m: int) -> None:
    """`kernels.swiglu_ffn` (Triton forced, under the interpreter, fp16 for bf16) launches the tiles of its plan: at 3
    rows the 1-row entry's 16 x 32 gate/up and down tiles (the built-in ones are 16 x 64), at 40 rows the 128-row
    entry's 32 x 32 ones (built-in: 64 x 64); the result is the reference's."""
    gate_up_launches, down_launches = _Launches(ffn._gate_up_kernel), _Launches(gemm._matmul_kernel)
    monkeypatch.setattr(ffn, "_gate_up_kernel", gate_up_launches)
    monkeypatch.setattr(gemm, "_matmul_kernel", down_launches)
    hidden, inter = 64, 200
    x, w_gate_up, w_down, residual = _ffn_inputs(m, hidden, inter, torch.float16)
    with kernel_backend("triton"):
        out = kernels.swiglu_ffn(x, w_gate_up, w_down, residual)
    gate_up, down = (DECODE_GATE_UP, DECODE_DOWN) if m == 3 else (PREFILL, PREFILL)
    builtin_gate_up, builtin_down = ffn.gate_up_blocks(m), gemm.gemm_blocks(m)
    assert (gate_up.block_m, gate_up.block_n) != (builtin_gate_up.block_m, builtin_gate_up.block_n)
    assert (down.block_m, down.block_n) != (builtin_down.block_m, builtin_down.block_n)
    assert gate_up_launches.grids[-1][0] == triton.cdiv(m, gate_up.block_m) * triton.cdiv(inter, gate_up.block_n)
    assert down_launches.grids[-1][0] == triton.cdiv(m, down.block_m) * triton.cdiv(hidden, down.block_n)
    expected = swiglu_ffn_reference(x.float(), w_gate_up.float(), w_down.float(), residual.float())
    assert relative_error(out, expected) <= TOLERANCES["swiglu_ffn"][torch.float16]


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's launches; on a GPU the suite's ffn_served rows")
def test_a_persistent_plan_runs_the_persistent_schedule(table, monkeypatch) -> None:
    """The 16-row entry's plan says persistent: 9 rows (its plan's) run both GEMMs on the persistent TMA schedule
    (the interpreter takes tensor descriptors), with the reference's result."""
    gate_up_launches, down_launches = _spy_persistent(monkeypatch)
    x, w_gate_up, w_down, residual = _ffn_inputs(9, 64, 200, torch.float16)
    with kernel_backend("triton"):
        out = kernels.swiglu_ffn(x, w_gate_up, w_down, residual)
    assert len(gate_up_launches.grids) == 1 and len(down_launches.grids) == 1
    expected = swiglu_ffn_reference(x.float(), w_gate_up.float(), w_down.float(), residual.float())
    assert relative_error(out, expected) <= TOLERANCES["swiglu_ffn"][torch.float16]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a readable FFN tiling table"),
        ('{"entries": []}', "a non-empty list 'entries'"),
        ('[{"rows": 1}]', "a non-empty list 'entries'"),
        ('{"entries": [{"precision": "int4", "rows": 1}]}', r"entries\[0\]: 'precision' must be one of"),
        ('{"entries": [{"precision": "bf16", "rows": 0, "speedup": 1}]}', "'rows' must be a positive integer"),
        ('{"entries": [{"precision": "bf16", "rows": true, "speedup": 1}]}', "'rows' must be a positive integer"),
        ('{"entries": [{"precision": "bf16", "rows": 1, "speedup": "fast"}]}', "'speedup' must be a positive"),
        ('{"entries": [{"precision": "bf16", "rows": 1, "speedup": 1, "persistent": 1}]}', "'persistent' must be"),
        ('{"entries": [{"precision": "bf16", "rows": 1, "speedup": 1, "gate_up": {"block_m": 16}}]}', "'gate_up' must"),
    ],
)
def test_a_malformed_table_is_refused_by_file_and_field(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        ffn_tilings.load_table(path)
    assert str(path) in str(e.value)


def test_a_table_with_two_entries_for_the_same_rows_is_refused(tmp_path) -> None:
    path = tmp_path / "twice.json"
    twice = [entry("bf16", 16, 1.0, DECODE_GATE_UP, DECODE_DOWN), entry("bf16", 16, 1.2, PREFILL, PREFILL)]
    path.write_text(json.dumps({"entries": twice}))
    with pytest.raises(ValueError, match="two bf16 entries for the same rows"):
        ffn_tilings.load_table(path)
    bad_tile = entry("bf16", 16, 1.0, DECODE_GATE_UP, DECODE_DOWN) | {"down": {**asdict(DECODE_DOWN), "block_k": 0}}
    zero = tmp_path / "zero.json"  # (tables are read once per path)
    zero.write_text(json.dumps({"entries": [bad_tile]}))
    with pytest.raises(ValueError, match="'down' must hold positive integers"):
        ffn_tilings.load_table(zero)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"entries": [entry("bf16", 16, 1.0, GemmTiling(16, 48, 64, 4, 2), DECODE_DOWN)]}))
    with pytest.raises(ValueError, match="'gate_up''s block_m, block_n, block_k, num_warps must be powers of two"):
        ffn_tilings.load_table(odd)
