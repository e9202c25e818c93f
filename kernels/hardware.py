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


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (TRITON_INTERPRET, set before import): CPU tensors can take them."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
