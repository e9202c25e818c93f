"""The FFN's measured GEMM tilings per GPU, and at which rows its Triton kernels beat cuBLAS there.

`benchmarks/tune_gemm.py` sweeps the SwiGLU FFN's two GEMM tilings on a GPU against cuBLAS (bf16) or
`torch._scaled_mm` (FP8) in the same run and writes its winners as a table, `<device>_ffn_tilings.json` (the device's
name as torch gives it, lower-case, spaces as dashes). Committed as it is into `kernels/configs/`, the table steers
`kernels.swiglu_ffn` on that GPU, as vLLM's committed per-device configs steer its fused-MoE kernels:
- an M-row FFN takes the plan of the table's entry of its precision nearest M on a log scale, among the entries of
  its regime: decode (M <= DECODE_ROWS, 16-row tiles streaming the weights) or past it. Decode entries never steer
  more rows (a 32-row batch with 16-row tiles was never measured), nor prefill entries fewer;
- the plan's gate/up and down tilings and schedule (portable or persistent) replace the built-in ones
  (`ffn.gate_up_blocks`, `gemm.gemm_blocks`), which serve where no plan is;
- Triton runs the rows only where the table measured it at least as fast as the baseline: at the entry's own rows
  by its speedup, between two entries only if both measured it so (the rows between were not measured); elsewhere
  cuBLAS (or `_scaled_mm`) runs them. Past 16 rows that can be Triton too (without a table, cuBLAS from 17 rows:
  `ffn.TRITON_MAX_ROWS`). A regime without entries keeps the built-in rule.
The entries were measured on the sweep's shapes (the 8B FFN's width at every M); they steer every width, from a
pruned child's narrow FFN to an FFN-Fusion group's. A plan is a lookup on the host, the same for every call of a
shape: nothing is tuned while a CUDA graph captures. `TESSERA_FFN_TILINGS=<path>` makes another table (a sweep's
fresh output) steer every device, the GPU suite's way of measuring a sweep's plans in the same call; an empty value
turns the tables off. A table is read once per path and process.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from tessera.devices import device_slug

from .gemm import DECODE_ROWS, GemmTiling

TABLE_ENV = "TESSERA_FFN_TILINGS"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRECISIONS = ("bf16", "fp8")  # bf16 entries serve fp16 too: tiles of 2-byte operands


@dataclass(frozen=True)
class FfnPlan:
    """How an FFN of some rows runs on a GPU with a table: its GEMMs' tilings and schedule (from the entry nearest
    its rows), and whether Triton runs it at all (`triton`, module doc)."""

    gate_up: GemmTiling
    down: GemmTiling
    persistent: bool
    speedup: float  # the entry's, measured against cuBLAS / `_scaled_mm` at `rows`
    rows: int  # the rows the entry was measured at
    triton: bool  # Triton runs these rows: measured at least as fast as the baseline (module doc)


def table_name(device: torch.device) -> str:
    """A device's table file, named as its benchmark results are (benchmarks/harness.results_name): an "NVIDIA H200"
    reads "nvidia-h200_ffn_tilings.json", which tune_gemm writes there ("cpu_..." on the CPU: its test's)."""
    return f"{device_slug(device)}_ffn_tilings.json"


def table_path(device: torch.device) -> Path | None:
    """The table that steers FFNs on `device`: TESSERA_FFN_TILINGS's, or the committed one of this GPU (None when
    there is none, on the CPU without the variable, or when the variable is empty)."""
    override = os.environ.get(TABLE_ENV)
    if override is not None:
        return Path(override) if override else None
    return _committed(device) if device.type == "cuda" else None


@functools.cache
def _committed(device: torch.device) -> Path | None:
    path = CONFIG_DIR / table_name(device)
    return path if path.is_file() else None


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _tiling(entry: dict, key: str, where: str) -> GemmTiling:
    """An entry's tiling, checked as Triton needs it: power-of-two tile sizes and warps, at least one stage."""
    spec = entry.get(key)
    names = {f.name for f in fields(GemmTiling)}
    if not isinstance(spec, dict) or not names - {"group_m"} <= spec.keys() or spec.keys() - names:
        raise ValueError(f"{where}: {key!r} must be a tiling with {sorted(names)}, got {spec!r}")
    if not all(_positive_int(v) for v in spec.values()):
        raise ValueError(f"{where}: {key!r} must hold positive integers, got {spec!r}")
    powers = ("block_m", "block_n", "block_k", "num_warps")
    if any(spec[name] & (spec[name] - 1) for name in powers):
        raise ValueError(f"{where}: {key!r}'s {', '.join(powers)} must be powers of two, got {spec!r}")
    return GemmTiling(**spec)


@functools.cache
def load_table(path: Path) -> dict[str, list[FfnPlan]]:
    """A table's entries as plans by precision, in rows order (each plan's `triton` its own entry's); a ValueError
    naming the file and the field on a malformed one. Read once per path: a table rewritten later in the same
    process is not read again."""
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable FFN tiling table ({e})") from None
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected an object with a non-empty list 'entries'")
    plans: dict[str, list[FfnPlan]] = {p: [] for p in PRECISIONS}
    for i, entry in enumerate(entries):
        where = f"{path}: entries[{i}]"
        if not isinstance(entry, dict) or entry.get("precision") not in PRECISIONS:
            raise ValueError(f"{where}: 'precision' must be one of {PRECISIONS}, got {entry!r}")
        rows, speedup = entry.get("rows"), entry.get("speedup")
        if not _positive_int(rows):
            raise ValueError(f"{where}: 'rows' must be a positive integer, got {rows!r}")
        if isinstance(speedup, bool) or not isinstance(speedup, int | float) or not speedup > 0:
            raise ValueError(f"{where}: 'speedup' must be a positive number, got {speedup!r}")
        persistent = entry.get("persistent", False)
        if not isinstance(persistent, bool):
            raise ValueError(f"{where}: 'persistent' must be true or false, got {persistent!r}")
        gate_up, down = _tiling(entry, "gate_up", where), _tiling(entry, "down", where)
        plans[entry["precision"]].append(FfnPlan(gate_up, down, persistent, float(speedup), rows, speedup >= 1))
    for precision, listed in plans.items():
        listed.sort(key=lambda plan: plan.rows)
        if len({plan.rows for plan in listed}) != len(listed):
            raise ValueError(f"{path}: two {precision} entries for the same rows")
    return plans


def plan(rows: int, precision: str, device: torch.device) -> FfnPlan | None:
    """The plan of an FFN of `rows` rows in `precision` ("bf16" or "fp8") on `device` (module doc); None without a
    table, or without entries of that precision in the rows' regime."""
    path = table_path(device)
    return None if path is None else _plan(path, precision, max(rows, 1))


@functools.cache
def _plan(path: Path, precision: str, rows: int) -> FfnPlan | None:
    decode = rows <= DECODE_ROWS
    listed = [p for p in load_table(path)[precision] if (p.rows <= DECODE_ROWS) == decode]
    if not listed:
        return None
    nearest = min(listed, key=lambda p: (abs(math.log(rows / p.rows)), p.rows))
    below = [p for p in listed if p.rows < rows]
    above = [p for p in listed if p.rows > rows]
    if nearest.rows != rows and below and above:  # between two measured rows: Triton only if both said so
        return replace(nearest, triton=below[-1].triton and above[0].triton)
    return nearest
