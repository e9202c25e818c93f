"""What the launchers need to know about the device, read once per device."""

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors, to size split-K grids. Under the CPU interpreter: an H200's 132, so the
    tests exercise the same split logic the GPU runs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
