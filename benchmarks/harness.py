"""Shared benchmark harness: timing, the measured copy bandwidth, kernel cases against their baselines, and
where results go with what they record (device, date, commit, versions).

Every result file holds the baseline measured in the same run as the thing compared with it, so a ratio
never mixes machines or sessions. On CUDA, times are `triton.testing.do_bench` medians (it flushes the L2
before each call) of a CUDA-graph replay of the call, so the few-µs kernels are timed without the Python
launch cost that a served model (which replays graphs) does not pay either. On CPU the kernels' ops run
their references: those runs are sanity checks of the suite, not kernel measurements.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from triton.runtime import jit

from tessera.devices import device_name, device_slug, median_ms, synchronize
from tessera.files import atomic_write_text

# A run writes under runs/bench/ of the checkout (git-ignored) unless told otherwise (`tessera bench --results DIR`,
# or TESSERA_BENCH_RESULTS for `make bench`): benchmarks/results/ holds the committed runs the README cites, and a
# sanity run on a laptop must not rewrite them. Pass that folder to update them on purpose.
RESULTS_ENV = "TESSERA_BENCH_RESULTS"
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "runs" / "bench"


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


COMMIT_ENV = "TESSERA_COMMIT"  # the measured commit, where the checkout's git metadata cannot say (a device copy)


CHECKOUT = Path(__file__).resolve().parents[1]  # the repository this code runs from (an editable install)


def commit() -> str:
    """The measured code's commit (TESSERA_COMMIT when set): the checkout's, wherever the command runs, "-dirty" with
    uncommitted changes; "unknown" outside a git checkout (an installed copy) rather than an enclosing repository's."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != CHECKOUT:
            return "unknown"
        # Results files rewritten by an earlier run do not make the measured code dirty.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    import transformers

    env = {
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _json_safe(value):
    """`value` with every NaN or infinite float (a tiling that failed, a mean of nothing) as None: JSON has no NaN,
    and strict readers (jq, JavaScript, Python's own with parse_constant raising) refuse the token."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def compiling_only(compiled: Callable[[object, object], None] | None = None) -> Iterator[None]:
    """While active, a Triton launch compiles its kernel (into the on-disk cache) and returns it without running it
    (Triton's warmup mode), then calls `compiled(jit_function, kernel)`: the GPU suite's compile workers (tune_gemm)
    and the compile check without a GPU (compile_check). Under the interpreter nothing compiles: kernels run."""
    run = jit.JITFunction.run

    def compile_only(fn, *args, grid, warmup, **kwargs):
        kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
        if compiled is not None:
            compiled(fn, kernel)
        return kernel

    jit.JITFunction.run = compile_only
    try:
        yield
    finally:
        jit.JITFunction.run = run


def write_results(name: str, results: dict, markdown: str, out: Path | None = None) -> Path:
    """<out>/<name>.json and .md (out: `results_dir()` by default); each written beside and renamed into place.
    Non-finite numbers are written as null (`_json_safe`); the markdown keeps them as "nan"."""
    out = Path(out) if out is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_text(path, json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / f"{name}.md", markdown + "\n")
    return path


def hf_generate(hf, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy `generate` of exactly `new_tokens` tokens per row (EOS ignored): the baseline every
    end-to-end benchmark compares tessera with."""
    return hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def random_prompts(n: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, input_len), generator=gen).tolist()


def decoding_engine(model, batch: int, prompt_len: int, steps: int, **config) -> object:
    """An engine with `batch` requests of random `prompt_len`-token prompts past their prefill, every one decoding
    (EOS ignored) with room for `steps` more steps: what a decode-step benchmark times. config: EngineConfig's."""
    from tessera.runtime.engine import Engine, EngineConfig
    from tessera.runtime.sampling import SamplingParams

    engine = Engine(model, None, EngineConfig(max_batch=batch, **config))
    for prompt in random_prompts(batch, prompt_len, model.vocab_size):
        engine.add_request(prompt, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    while engine.waiting or any(r.computed < r.prompt_len for r in engine.running):
        engine.step()
    return engine


def wait_healthy(base: str, timeout: float, proc=None) -> None:
    """Until `base`/health answers 200 (a server starting); raises if `proc` (its process) exits first or the
    timeout passes."""
    import httpx

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tessera serve exited: {(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{base}/health did not answer within {timeout} s")


def time_ms(
    fn: Callable[[], object], device: torch.device, graph: bool = True, rep_ms: int = 100, cpu_budget_s: float = 0.5
) -> tuple[float, str]:
    """Median milliseconds per call of fn, and how it was timed. fn must already have run once (compiled). rep_ms:
    how long do_bench repeats it on a GPU (a sweep of many variants times each for less); cpu_budget_s: how long
    the CPU's timer repeats it."""
    if device.type == "cuda":
        from triton.testing import do_bench

        torch.cuda.synchronize(device)
        if graph:
            try:
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    fn()
                ms = do_bench(cuda_graph.replay, warmup=rep_ms // 4, rep=rep_ms, return_mode="median")
                return ms, "do_bench median of CUDA-graph replays"
            except RuntimeError:  # e.g. a host sync inside fn: not capturable, time it eagerly
                torch.cuda.synchronize(device)
        return do_bench(fn, warmup=rep_ms // 4, rep=rep_ms, return_mode="median"), "do_bench median, eager"
    return median_ms(fn, device, budget_s=cpu_budget_s), "median wall time (CPU)"  # the timer the cost model uses


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate, bytes read plus bytes written: the ceiling for memory-bound kernels."""
    n_bytes = 2**30 if device.type == "cuda" else 2**27  # far past the L2 (H200: 60 MB)
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, graph=False)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


class Spread(NamedTuple):
    """A figure and the range it came from: the median of several rounds, their min and max."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


class InTurns:
    """Sides of a comparison measured in interleaved rounds: each round measures every side once, the order
    reversed every other round, so a machine whose speed drifts (a VM's neighbours, a CPU's clock) moves both
    sides of a round alike and neither always runs first. Compare two sides by the median of the rounds' ratios
    (`ratio`), reported with its range: a ratio of two medians taken one side after the other mixes machine
    states (the same code read 1.0x and 1.8x that way on a shared VM).

    sides: name -> a callable that runs that side once and returns its measurement (ms, s: the caller's unit);
    `round(*args)` passes its arguments to each, say a round's fresh prompts."""

    def __init__(self, sides: dict[str, Callable[..., float]]) -> None:
        self.sides = sides
        self.times: dict[str, list[float]] = {name: [] for name in sides}

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times.values()), []))

    def round(self, *args) -> None:
        names = list(self.sides)
        for name in names if self.rounds % 2 == 0 else reversed(names):
            self.times[name].append(self.sides[name](*args))

    def run(self, rounds: int) -> InTurns:
        for _ in range(rounds):
            self.round()
        return self

    def spread(self, name: str) -> Spread:
        """`name`'s median measurement over the rounds, with their min and max."""
        return Spread.of(self.times[name])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """numerator / denominator round by round: their median, min and max."""
        return Spread.of([a / b for a, b in zip(self.times[numerator], self.times[denominator], strict=True)])


def wall_s(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of fn takes, the device's queued work included."""
    synchronize(torch.device(device))
    start = time.perf_counter()
    fn()
    synchronize(torch.device(device))
    return time.perf_counter() - start


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (NaN when either holds a NaN)."""
    diff = (actual.double() - expected.double()).abs().max()
    return (diff / expected.double().abs().max().clamp_min(1e-30)).item()


@dataclass
class KernelCase:
    """One shape of one op: tessera's op and the torch baseline on the same inputs, with its work counted."""

    op: str
    shape: dict
    candidate: Callable[[], torch.Tensor]
    baseline: Callable[[], torch.Tensor]
    flops: float  # useful floating-point operations per call
    bytes: float  # fewest bytes a call must move through memory (inputs read once, outputs written once)
    tolerance: float  # on the relative error between the two outputs
    baseline_name: str  # what the baseline is, in words (recorded with each result)


KERNEL_ROUNDS = 3  # interleaved rounds a kernel case's two sides are timed in (InTurns), each a third as long


def time_in_turns(
    sides: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int = KERNEL_ROUNDS,
    graph: bool = True,
    round_ms: int | None = None,
) -> tuple[InTurns, dict[str, str]]:
    """Each side's `time_ms` in `rounds` interleaved rounds (InTurns): the rounds (their spreads and ratios), and how
    each side was timed. A round repeats a side for `round_ms` on a GPU (default: a `rounds`-th of one `time_ms`'s
    100 ms), 5 times as long on the CPU. graph: captured into a CUDA graph (False: a side replays its own); a side
    that a graph cannot capture is timed eagerly from its first round on."""
    methods: dict[str, str] = {}
    round_ms = round_ms or 100 // rounds

    def side(name: str, fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            captured = graph and not methods.get(name, "").endswith("eager")
            ms, methods[name] = time_ms(fn, device, captured, rep_ms=round_ms, cpu_budget_s=5 * round_ms / 1e3)
            return ms

        return run

    return InTurns({name: side(name, fn) for name, fn in sides.items()}).run(rounds), methods


def measure_cases(
    cases: Iterable[KernelCase],
    device: torch.device,
    copy_gbps: float,
    written: Callable[[list[dict]], object] | None = None,
) -> list[dict]:
    """Check each case's output against its baseline, then time both in KERNEL_ROUNDS interleaved rounds: times are
    the rounds' medians, the speedup the median of the rounds' ratios with their min and max. Cases are built lazily
    (a generator), so each one's tensors are freed before the next is allocated. A case that raises (a kernel that
    does not compile for this GPU, say) is recorded as an error row and the next one runs; `written(rows)` after
    each case, so a suite cut short by a time limit keeps what it measured."""
    rows = []
    for case in cases:
        try:
            error = relative_error(case.candidate(), case.baseline())
            turns, methods = time_in_turns({"tessera": case.candidate, "baseline": case.baseline}, device)
            ours_ms, base_ms = turns.spread("tessera").median, turns.spread("baseline").median
            speedup = turns.ratio("baseline", "tessera")
            method, base_method = methods["tessera"], methods["baseline"]
        except Exception as e:
            rows.append({"op": case.op, **case.shape, "error": f"{type(e).__name__}: {e}"})
            print(f"{case.op} [{', '.join(f'{k}={v}' for k, v in case.shape.items())}]: FAILED {rows[-1]['error']}")
            if written is not None:
                written(rows)
            continue
        row = {
            "op": case.op,
            **case.shape,
            "tessera_ms": ours_ms,
            "baseline_ms": base_ms,
            "speedup": speedup.median,
            "speedup_min": speedup.low,
            "speedup_max": speedup.high,
            "rounds": KERNEL_ROUNDS,
            "tessera_tflops": case.flops / (ours_ms * 1e-3) / 1e12,
            "baseline_tflops": case.flops / (base_ms * 1e-3) / 1e12,
            "tessera_gbps": case.bytes / (ours_ms * 1e-3) / 1e9,
            "tessera_pct_copy_bandwidth": 100 * case.bytes / (ours_ms * 1e-3) / 1e9 / copy_gbps,
            "flop_per_byte": case.flops / case.bytes,
            "relative_error": error,
            "correct": error <= case.tolerance,
            "timing": method if method == base_method else f"{method} / baseline: {base_method}",
            "baseline": case.baseline_name,
        }
        rows.append(row)
        print(_row_line(row), flush=True)
        if written is not None:
            written(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _shape_keys(row: dict) -> list[str]:
    return [k for k in row if k not in _METRICS]


def _row_line(row: dict) -> str:
    shape = ", ".join(f"{k}={row[k]}" for k in _shape_keys(row))
    flag = "" if row["correct"] else f"  WRONG (relative error {row['relative_error']:.2e})"
    times = f"{row['tessera_ms']:.4f} ms vs {row['baseline_ms']:.4f} ms"
    speedup = f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
    return f"{row['op']} [{shape}]: {times} = {speedup}{flag}"


_METRICS = {
    "op",
    "error",
    "tessera_ms",
    "baseline_ms",
    "speedup",
    "speedup_min",
    "speedup_max",
    "rounds",
    "tessera_tflops",
    "baseline_tflops",
    "tessera_gbps",
    "tessera_pct_copy_bandwidth",
    "flop_per_byte",
    "relative_error",
    "correct",
    "timing",
    "baseline",
}


def kernel_table(rows: list[dict]) -> str:
    """Markdown: shape columns, both times (medians of the rounds), the speedup (the median of the rounds' ratios,
    with their range), TFLOP/s and GB/s (% of the copy bandwidth)."""
    shape_keys = _shape_keys(next((r for r in rows if "error" not in r), rows[0]))
    head = ["op", *shape_keys, "tessera ms", "baseline ms", "speedup", "TFLOP/s", "GB/s (% copy)", "rel. error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:  # a case that raised: its error in place of the numbers
            lines.append("| " + " | ".join([r["op"], *(str(r.get(k, "")) for k in shape_keys), r["error"]]) + " |")
            continue
        speed = f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})" if r["correct"] else "WRONG"
        cells = [
            r["op"],
            *(str(r[k]) for k in shape_keys),
            f"{r['tessera_ms']:.4f}",
            f"{r['baseline_ms']:.4f}",
            speed,
            f"{r['tessera_tflops']:.1f}",
            f"{r['tessera_gbps']:.0f} ({r['tessera_pct_copy_bandwidth']:.0f} %)",
            f"{r['relative_error']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_name(device: torch.device, suite: str) -> str:
    """<device>_<suite>: e.g. nvidia-h200_kernels_ffn, cpu_kernels_ffn."""
    return f"{device_slug(device)}_{suite}"
