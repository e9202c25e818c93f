"""What every launcher decides the same way: the device's size (read once per device) and the tl.dot precision."""

import functools
import os

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors, to size split-K grids. Under the CPU interpreter: an H200's 132, so the
    tests exercise the same split logic the GPU runs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 operands get exact fp32 products, as F.linear and SDPA give them (torch
    leaves TF32 off for matmuls by default); for fp16/bf16 operands the setting does not apply."""
    return "ieee" if dtype == torch.float32 else "tf32"


_compile_only = False


def compile_only(on: bool) -> None:
    """Launches compile kernels for a GPU that is not here instead of running them (benchmarks/compile_check.py,
    which aims Triton at the target): the launchers then take CPU tensors, as under the interpreter."""
    global _compile_only
    _compile_only = on


def cpu_launches() -> bool:
    """Whether Triton launches take CPU tensors: under the interpreter (TRITON_INTERPRET, set before import), which
    runs them, or in `compile_only` mode."""
    return _compile_only or os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
