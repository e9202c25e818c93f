"""benchmarks/compile_check.py: every Triton kernel of tessera.kernels compiles for the H100/H200 (sm_90), here,
without a GPU. The kernel tests run under the interpreter, which never sees what the GPU compiler sees (FP8 dot
types, tensor descriptors, shared memory and registers per block); this is the check that would have failed
before a GPU session spent its minutes finding out. It runs in a subprocess: this one has TRITON_INTERPRET set,
under which @triton.jit makes interpreted functions that cannot compile."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import tessera.kernels

ROOT = Path(__file__).resolve().parent.parent


def _launched_kernels() -> set[str]:
    """Every kernel tessera.kernels defines to launch (the `_*_kernel` jit functions; helpers called from them
    compile inside them)."""
    names = set()
    for module in pkgutil.iter_modules(tessera.kernels.__path__):
        for name, obj in vars(importlib.import_module(f"tessera.kernels.{module.name}")).items():
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                names.add(name)
    return names


def test_every_kernel_compiles_for_hopper_within_its_limits(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report_path = tmp_path / "compile_check.json"
    run = subprocess.run(
        [sys.executable, "-m", "tessera.benchmarks.compile_check", "--arch", "90", "--json", str(report_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == [] and report["target"].startswith("sm_90")
    compiled = {row["kernel"] for row in report["kernels"]}
    defined = _launched_kernels()
    assert len(defined) >= 10, defined  # the scan found the kernels (a rename would empty it)
    assert defined <= compiled, f"kernels no workload launches: {sorted(defined - compiled)}"
    # The served path's FP8 variants and the persistent TMA schedules are among them.
    constexprs = " | ".join(row["constexprs"] for row in report["kernels"])
    assert "FP8_CACHE=True" in constexprs and "SCALED=True" in constexprs
    assert {"_persistent_gate_up_kernel", "_persistent_matmul_kernel"} <= compiled
    for row in report["kernels"]:
        assert row["shared_bytes"] + row["static_shared_bytes"] <= 227 * 1024, row
        assert row["registers"] * 32 * row["num_warps"] <= 65536, row
