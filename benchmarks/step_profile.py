"""Where a decode step's time goes: its kernels, by kind, and the device's idle time between them.

The decode-step benchmark (bench_model) says how far a step is from its bandwidth floor, not why. This profiles the
same step (torch.profiler: CUPTI's kernel records on a GPU, replays of the engine's CUDA graph included; the
operators on the CPU) over a few steps and splits each step into:
- busy: the time some kernel runs (the union of their intervals: kernels on two streams count once);
- idle: the rest of the step's span, first kernel start to last kernel end over the steps profiled: launch gaps
  and kernels' ramp-up and drain between them, what fusing launches away would win, apart from the part between
  one step's last kernel and the next step's first (`between_steps_us`: the host launching the next step);
- per kind (`KINDS`: Triton's kernels by their function names, cuBLAS's by its families, everything else as
  "other") and per kernel: launches and microseconds per step.
The trace is read from the profiler's Chrome-trace export, a documented format that has stayed put across torch
releases, rather than from its Python event API.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

# (pattern, kind), first match wins: tessera's Triton kernels by their @triton.jit function names (kernels/), then
# cuBLAS / cuBLASLt's kernel families, then the CPU operators' names for the CPU sanity pass.
KINDS = [
    (r"_gate_up_kernel", "FFN gate/up GEMM (Triton)"),
    (r"_matmul_kernel", "GEMM (Triton: FFN down, FP8 linears)"),
    (r"_rms_norm_kernel|aten::rms_norm", "RMSNorm (+ residual, + FP8 quantize)"),
    (r"_rope_kernel", "RoPE + KV-cache store"),
    (r"_paged_kernel|_prefill_kernel|scaled_dot_product", "attention"),
    (r"_merge_kernel", "attention split merge"),
    (r"_quantize_rows_kernel", "FP8 row quantization"),
    (r"nvjet|gemm|gemv|xmma|cutlass|splitk|scaled_mm|aten::(addmm|mm|linear|bmm)|mkldnn", "GEMM (cuBLAS / torch)"),
    (r"^memcpy|^memset", "memory copy / set"),
]
_KIND_PATTERNS = [(re.compile(p, re.IGNORECASE), kind) for p, kind in KINDS]
OTHER = "other (torch ops: embedding, elementwise, copies of the step's inputs)"


def kind_of(name: str) -> str:
    return next((kind for pattern, kind in _KIND_PATTERNS if pattern.search(name)), OTHER)


# The Chrome-trace categories of what runs on each device: a GPU's kernels and copies, the CPU's operators.
DEVICE_WORK = {"cuda": ("kernel", "gpu_memcpy", "gpu_memset"), "cpu": ("cpu_op",)}


def trace_events(trace: dict, categories: tuple[str, ...]) -> list[tuple[str, float, float, object]]:
    """(name, start µs, duration µs, track) of the complete events of the given categories of a Chrome trace
    (`DEVICE_WORK`). The track (stream or thread) tells nesting apart."""
    events = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in categories and "dur" in e:
            events.append((e["name"], float(e["ts"]), float(e["dur"]), (e.get("pid"), e.get("tid"))))
    return events


def outermost(events: list[tuple[str, float, float, object]]) -> list[tuple[str, float, float, object]]:
    """The events no other event of their track encloses: a CPU operator's nested calls (aten::linear's addmm)
    would count its time twice. GPU kernels on one stream never nest; they all stay."""
    kept, open_until = [], {}
    # Tracks sort by their repr: a trace may name one by an int and another by a string.
    for name, start, dur, track in sorted(events, key=lambda e: (repr(e[3]), e[1], -e[2])):
        if start + dur <= open_until.get(track, float("-inf")):
            continue
        kept.append((name, start, dur, track))
        open_until[track] = start + dur
    return kept


def union_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, duration) intervals."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(intervals):
        if start + dur > end:
            total += start + dur - max(start, end)
            end = start + dur
    return total


def breakdown(events: list[tuple[str, float, float, object]], steps: int) -> dict:
    """Per step: the span, busy and idle microseconds, and each kind's and kernel's launches and microseconds
    (`events`: outermost ones, over `steps` steps)."""
    if not events:
        return {"steps": steps, "events": 0}
    first = min(start for _, start, _, _ in events)
    last = max(start + dur for _, start, dur, _ in events)
    busy = union_us([(start, dur) for _, start, dur, _ in events])
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, _, dur, _ in events:
        per_kernel[name][0] += 1
        per_kernel[name][1] += dur
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (count, dur) in per_kernel.items():
        kind = per_kind[kind_of(name)]
        kind[0] += count
        kind[1] += dur

    def rows(table: dict[str, list[float]], key: str) -> list[dict]:
        ranked = sorted(table.items(), key=lambda item: -item[1][1])
        return [{key: k, "launches": count / steps, "us": dur / steps} for k, (count, dur) in ranked]

    return {
        "steps": steps,
        "events": len(events),
        "span_us": (last - first) / steps,
        "busy_us": busy / steps,
        "idle_us": (last - first - busy) / steps,
        "between_steps_us": _between_steps(events, steps),
        "launches": len(events) / steps,
        "kinds": rows(per_kind, "kind"),
        "kernels": rows(per_kernel, "kernel"),
    }


def _between_steps(events: list[tuple[str, float, float, object]], steps: int) -> float | None:
    """The idle time per step between one step's last kernel and the next one's first (the host's launch of the
    next step: its graph replay and input copies), part of `idle_us`: what fusing kernels inside a step cannot win.
    Steps are told apart by their launch count, so only when every step launched the same number (else None)."""
    if steps < 2 or len(events) % steps:
        return None
    ordered, n = sorted(events, key=lambda e: e[1]), len(events) // steps
    ends = [max(start + dur for _, start, dur, _ in ordered[i * n : (i + 1) * n]) for i in range(steps)]
    starts = [ordered[i * n][1] for i in range(steps)]
    return sum(max(0.0, starts[i + 1] - ends[i]) for i in range(steps - 1)) / steps


def profile(step: Callable[[], object], device: torch.device, steps: int = 10) -> dict:
    """`step` (warm: compiled, its graph captured) run `steps` times under the profiler; `breakdown` of what ran. On a
    GPU its kernels (replays of a CUDA graph included, as CUPTI records each node); on the CPU its operators."""
    from torch.profiler import ProfilerActivity

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]  # only what runs on the device counts
    step()
    if on_gpu:
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = outermost(trace_events(trace, DEVICE_WORK[device.type]))
    return breakdown(events, steps)


def short(name: str, width: int = 70) -> str:
    """A kernel's name for a table cell: cuBLAS's and CUTLASS's run to hundreds of characters of template."""
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"
