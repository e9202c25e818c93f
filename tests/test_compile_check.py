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

import pytest

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


@pytest.mark.parametrize("arch", [90, 89], ids=["sm_90-h200", "sm_89-l40s"])
def test_every_kernel_compiles_within_the_gpus_shared_memory(tmp_path, arch: int) -> None:
    """sm_90 (H100/H200, what the GPU suite runs on) with the persistent TMA schedules; sm_89 (L4, L40S, RTX 4090:
    FP8 but 99 KB of shared memory a block, where the 16-row gate/up GEMM's 4 stages took 108 KB until the
    launchers fitted their stages to the device)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report_path = tmp_path / "compile_check.json"
    run = subprocess.run(
        [sys.executable, "-m", "tessera.benchmarks.compile_check", "--arch", str(arch), "--json", str(report_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == [] and report["target"].startswith(f"sm_{arch}")
    compiled = {row["kernel"] for row in report["kernels"]}
    defined = _launched_kernels()
    assert len(defined) >= 10, defined  # the scan found the kernels (a rename would empty it)
    persistent = {"_persistent_gate_up_kernel", "_persistent_matmul_kernel"}  # tensor descriptors: sm_90 and up
    expected = defined if arch >= 90 else defined - persistent
    assert expected <= compiled, f"kernels no workload launches: {sorted(expected - compiled)}"
    assert arch >= 90 or not compiled & persistent
    constexprs = " | ".join(row["constexprs"] for row in report["kernels"])
    assert "FP8_CACHE=True" in constexprs and "SCALED=True" in constexprs  # FP8 weights and KV cache
    # Programmatic dependent launch (sm_90 only): each kernel of a decode step has a variant that waits on the
    # kernel before it (griddepcontrol.wait in its PTX), and no other variant does.
    waiting = {row["kernel"] for row in report["kernels"] if "PDL=True" in row["constexprs"]}
    for row in report["kernels"]:
        assert ("+gdc" in row["instructions"]) == ("PDL=True" in row["constexprs"]), row
    if arch >= 90:
        served = {"_rms_norm_kernel", "_rope_kernel", "_paged_kernel", "_merge_kernel", "_prefill_kernel"}
        assert served | {"_gate_up_kernel", "_matmul_kernel"} <= waiting, waiting
    else:
        assert not waiting
    limit = 227 * 1024 if arch == 90 else 99 * 1024
    for row in report["kernels"]:
        assert row["shared_bytes"] + row["static_shared_bytes"] <= limit, row
        if arch == 90:  # the H200's kernels keep their registers (none spilled on 2026-11-29, triton 3.6 and 3.9)
            assert row["local_bytes"] == 0, row


def test_each_committed_ffn_table_is_compiled_under_its_plans(tmp_path) -> None:
    """A tiling table committed in kernels/configs/ launches variants the built-in tilings do not: the check adds
    the 8B shape's engine steps and decode graphs under each table, bf16 and FP8, with TESSERA_FFN_TILINGS naming
    that table while they run and restored after. (In a subprocess: the module refuses the interpreter.)"""
    script = f"""
import os
from pathlib import Path
from tessera.benchmarks import compile_check
from tessera.kernels import ffn_tilings

configs = Path({str(tmp_path)!r})
ffn_tilings.CONFIG_DIR = configs
assert compile_check.table_workloads() == {{}}
(configs / "nvidia-h200_ffn_tilings.json").write_text("{{}}")
(configs / "notes.json").write_text("{{}}")  # not a table's name
workloads = compile_check.table_workloads()
assert sorted(workloads) == [
    f"engine and CUDA-graph decode, llama-3.1-8b shape, {{p}}, FFN table nvidia-h200_ffn_tilings.json"
    for p in ("bf16", "fp8")
], workloads
seen = []
env = ffn_tilings.TABLE_ENV
compile_check.served_path = lambda *a: seen.append(("steps", a[1], os.environ.get(env)))
compile_check.graph_decode = lambda *a: seen.append(("graphs", a[1], os.environ.get(env)))
os.environ[env] = "before"
for run in workloads.values():
    run()
table = str(configs / "nvidia-h200_ffn_tilings.json")
assert seen == [("steps", False, table), ("graphs", False, table), ("steps", True, table), ("graphs", True, table)]
assert os.environ[env] == "before"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-3000:] + run.stderr[-3000:]
