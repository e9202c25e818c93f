"""Device and dtype helpers, one home for each: a `--device` flag as a torch.device, a device's name as results
and cost tables record it, a torch dtype's name as config.json ("torch_dtype"), cost tables and results spell
it (and back from a `--dtype` flag), the wall-clock timer the cost model and the CPU benchmarks share, and the
cache scrub a cost-model timing can start from.

Bytes per dtype name belong to the cost formulas: `tessera.config.dtype_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tessera.errors import UserError

# The dtypes a model runs in (`--dtype`); a checkpoint may store more (tessera.config.DTYPE_BYTES).
# "fp8": E4M3 projection weights with per-channel scales, bf16 activations (kernels/fp8.py).
RUN_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory, or the host's MemAvailable (free
    memory plus the page cache it can reclaim, large right after a checkpoint was read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free memory only: a lower bound


def _proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  123 kB" line of a Linux /proc file, in bytes; None where there is no such file or field."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cpu or cuda")
    return torch.device(name)


def check_fp8(device: torch.device | str, what: str) -> None:
    """Refuse FP8 (`what`: the flag that asked) on a GPU without E4M3 tensor-core support (compute capability
    below 8.9, e.g. an A100), where Triton would fail to compile the FP8 types with an unclear error. The CPU runs
    the dequantizing references."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"{what}: {name} has no FP8 (E4M3) support (compute capability 8.9 or newer: Ada, Hopper)")


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model with its cores and the threads torch uses: what a timing ran on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device | str) -> str:
    """A device's name in file names: its GPU's, lower-case with dashes ("nvidia-h200"), or "cpu" (a CPU's results
    name the CPU in their contents)."""
    device = torch.device(device)
    return device_name(device).lower().replace(" ", "-") if device.type == "cuda" else "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    """The name config.json, cost tables and results record: torch.bfloat16 is "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """A run dtype from its name (a `--dtype` flag); a UserError naming the choices otherwise."""
    if name not in RUN_DTYPES:
        raise UserError(f"dtype {name!r}: expected one of {', '.join(RUN_DTYPES)}")
    return RUN_DTYPES[name]


def serving_dtype(device: torch.device | str, name: str | None = None) -> torch.dtype:
    """The precision named (a `--timing-dtype` flag), or by default the one a model is served and timed in on
    `device`: bfloat16 on CUDA, float32 on the CPU (where bf16 GEMMs are slower, not faster). FP8 on a GPU
    without it is refused (`check_fp8`)."""
    dtype = parse_dtype(name or ("bfloat16" if torch.device(device).type == "cuda" else "float32"))
    if dtype == RUN_DTYPES["fp8"]:
        check_fp8(device, "--timing-dtype fp8")
    return dtype


def upload(data: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device`, without waiting for the device. A plain copy
    to a GPU from pageable memory synchronizes the stream: the host would wait for every step queued before it.
    On CUDA the values go through pinned memory, copied asynchronously (torch's caching host allocator keeps the
    pinned buffer until the copy has run), so the engine can plan a step while the GPU runs the one before."""
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall time covers it (CPU work is already done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, budget_s: float = 0.3) -> float:
    """Median wall milliseconds of fn (after one warm-up call), repeated until min_reps and budget_s are met."""
    fn()
    synchronize(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 200:
            break
    return statistics.median(times)


SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
FALLBACK_CACHE_BYTES = 32 * 2**20  # where the CPU's caches cannot be read: a server's last level is ~32 MiB
MAX_SCRUB_BYTES = 512 * 2**20


def last_level_cache_bytes(device: torch.device, caches: Path = SYSFS_CACHES) -> int:
    """The largest cache the device's data passes through: the GPU's L2, or the CPU's last level as Linux lists
    it under `caches` (index*/level and size, "32768K"); FALLBACK_CACHE_BYTES where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    best = (0, 0)  # (level, bytes)
    for index in caches.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        best = max(best, (level, size))
    return best[1] or FALLBACK_CACHE_BYTES


def _size_bytes(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes; ValueError for anything else."""
    text = text.strip()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def cache_scrubber(device: torch.device, caches: Path = SYSFS_CACHES) -> Callable[[], object]:
    """A call that evicts what earlier work left in the device's last-level cache, by streaming twice its size
    (at most MAX_SCRUB_BYTES) through it: the GPU by writing (as `triton.testing.do_bench` clears L2), the CPU
    by reading (every thread's share passes through its own core's caches too). Timings taken after it start
    from a cold cache whatever ran before them."""
    size = min(2 * last_level_cache_bytes(device, caches), MAX_SCRUB_BYTES)
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
    if device.type == "cuda":
        return buffer.zero_
    return buffer.sum


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_bytes`: the GPU allocator's, or this process's resident set (Linux
    resets VmHWM on writing 5 to /proc/self/clear_refs; elsewhere the peak stays the process's whole life)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory held since `reset_peak_memory`: allocated on the GPU, or resident on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource  # POSIX only, and its unit differs by platform: used where /proc is not

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
