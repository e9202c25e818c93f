"""The FFN's measured GEMM tilings per GPU, and at which rows its Triton kernels beat cuBLAS there.

`benchmarks/tune_gemm.py` sweeps the SwiGLU FFN's two GEMM tilings on a GPU against cuBLAS (bf16) or
`torch._scaled_mm` (FP8) in the same run and writes its winners as a table, `<device>_ffn_tilings.json`. Committed as
`kernels/configs/ffn_<device>.json` (the device's name as torch gives it, lower-case, spaces as dashes), the table
steers `kernels.swiglu_ffn` on that GPU, as vLLM's committed per-device configs steer its fused-MoE kernels:
- an M-row FFN takes the plan of the table's entry of its precision whose rows are nearest M on a log scale
  (an 8-row step the 16-row entry's, a 700-row prefill the 128-row or 2,048-row one, whichever is nearer);
- the plan's gate/up and down tilings and schedule (portable or persistent) replace the built-in ones
  (`ffn.gate_up_blocks`, `gemm.gemm_blocks`), which serve where no table is;
- where the entry measured the Triton FFN slower than the baseline by more than CROSSOVER_MARGIN, cuBLAS serves
  those rows; elsewhere Triton does, past 16 rows too (without a table, cuBLAS from 17 rows: `ffn.TRITON_MAX_ROWS`).
A plan is a lookup on the host, the same for every call of a shape: nothing is tuned while a CUDA graph captures.
`TESSERA_FFN_TILINGS=<path>` makes another table (a sweep's fresh output) steer every device, the GPU suite's way of
measuring a sweep's plans in the same call; an empty value turns the tables off.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .gemm import GemmTiling

TABLE_ENV = "TESSERA_FFN_TILINGS"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRECISIONS = ("bf16", "fp8")  # bf16 entries serve fp16 too: tiles of 2-byte operands
CROSSOVER_MARGIN = 0.02  # Triton serves rows whose entry measured it at least 0.98x the baseline


@dataclass(frozen=True)
class FfnPlan:
    """How an FFN of some rows runs on a GPU with a table: its GEMMs' tilings and schedule, and whether Triton runs
    it at all (`triton`: the entry measured it at least 1 - CROSSOVER_MARGIN times the baseline)."""

    gate_up: GemmTiling
    down: GemmTiling
    persistent: bool
    speedup: float  # the entry's, measured against cuBLAS / `_scaled_mm` at `rows`
    rows: int  # the rows the entry was measured at

    @property
    def triton(self) -> bool:
        return self.speedup >= 1 - CROSSOVER_MARGIN


def device_slug(name: str) -> str:
    """A device's name as a file name: "NVIDIA H200" -> "nvidia-h200"."""
    return name.lower().replace(" ", "-")


def table_path(device: torch.device) -> Path | None:
    """The table that steers FFNs on `device`: TESSERA_FFN_TILINGS's, or the committed one of this GPU (None when
    there is none, on the CPU without the variable, or when the variable is empty)."""
    override = os.environ.get(TABLE_ENV)
    if override is not None:
        return Path(override) if override else None
    return _committed(device) if device.type == "cuda" else None


@functools.cache
def _committed(device: torch.device) -> Path | None:
    path = CONFIG_DIR / f"ffn_{device_slug(torch.cuda.get_device_name(device))}.json"
    return path if path.is_file() else None


def _tiling(entry: dict, key: str, where: str) -> GemmTiling:
    spec = entry.get(key)
    names = {f.name for f in fields(GemmTiling)}
    if not isinstance(spec, dict) or not {n for n in names if n != "group_m"} <= spec.keys() or spec.keys() - names:
        raise ValueError(f"{where}: {key!r} must be a tiling with {sorted(names)}, got {spec!r}")
    if not all(isinstance(v, int) and v > 0 for v in spec.values()):
        raise ValueError(f"{where}: {key!r} must hold positive integers, got {spec!r}")
    return GemmTiling(**spec)


@functools.cache
def load_table(path: Path) -> dict[str, list[FfnPlan]]:
    """A table's plans by precision, in rows order; a ValueError naming the file and the field on a malformed one."""
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
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"{where}: 'rows' must be a positive integer, got {rows!r}")
        if not isinstance(speedup, int | float) or not speedup > 0:
            raise ValueError(f"{where}: 'speedup' must be a positive number, got {speedup!r}")
        persistent = entry.get("persistent", False)
        if not isinstance(persistent, bool):
            raise ValueError(f"{where}: 'persistent' must be true or false, got {persistent!r}")
        gate_up, down = _tiling(entry, "gate_up", where), _tiling(entry, "down", where)
        plans[entry["precision"]].append(FfnPlan(gate_up, down, persistent, float(speedup), rows))
    for precision, listed in plans.items():
        listed.sort(key=lambda plan: plan.rows)
        if len({plan.rows for plan in listed}) != len(listed):
            raise ValueError(f"{path}: two {precision} entries for the same rows")
    return plans


def plan(rows: int, precision: str, device: torch.device) -> FfnPlan | None:
    """The plan of an FFN of `rows` rows in `precision` ("bf16" or "fp8") on `device`: its table's entry nearest in
    log(rows); None without a table or an entry of that precision."""
    path = table_path(device)
    if path is None:
        return None
    listed = load_table(path)[precision]
    if not listed:
        return None
    return min(listed, key=lambda p: (abs(math.log(max(rows, 1) / p.rows)), p.rows))


def table_from_sweep(result: dict) -> dict:
    """benchmarks/tune_gemm.py's result as a table: for each precision and rows swept, the fastest checked pair
    (on the 8B shape where several shapes share the rows: the shape every entry is measured on) with its speedup."""
    entries: dict[tuple[str, int], dict] = {}
    for shape in result["shapes"]:
        key = (shape["precision"], shape["rows"])
        if key in entries and shape["model"] != "llama-3.1-8b":
            continue
        best = shape["best"]
        entries[key] = {
            "precision": shape["precision"],
            "rows": shape["rows"],
            "shape": [shape["hidden"], shape["intermediate"]],
            "gate_up": best["gate_up"],
            "down": best["down"],
            "persistent": best["persistent"],
            "speedup": best["speedup"],
            "baseline": shape["baseline"],
        }
    return {
        "device": result["device"],
        "measured": f"benchmarks/tune_gemm.py at commit {result['commit']}, {result['date']}",
        "entries": [entries[key] for key in sorted(entries)],
    }
