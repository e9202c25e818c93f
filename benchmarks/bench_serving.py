"""Online serving benchmark, after vLLM's benchmark_serving: `tessera serve` under load vs transformers.

Load (vLLM's conventions): N requests with random prompts of exactly `input_len` token ids (sent as token ids,
so no re-tokenisation changes their length), each asking for exactly `output_len` tokens (greedy, EOS
ignored), streamed over HTTP from a `tessera serve` subprocess. Arrivals are a Poisson process at the given
request rate (exponential gaps, seeded); `inf` sends them all at once; `max_concurrency` caps the requests in
flight, as vLLM's --max-concurrency does. Per request: TTFT (request sent → first text chunk), ITL (gaps
between later chunks), TPOT ((latency − TTFT) / (output tokens − 1)) and end-to-end latency; over the run:
request and output-token throughput, mean/median/p99 of each latency.

Baseline, measured in the same run on the same machine after the server has stopped: the same prompts,
served one at a time by transformers' `generate` (LlamaForCausalLM, the same checkpoint and dtype, greedy,
exactly `output_len` new tokens each). Its output-token throughput is total tokens / total wall time; its texts
are what every run's streamed texts are compared with (how many are the same is reported).
Goal (issue 6): at 16 concurrent requests, >= 4x the baseline's output-token throughput on CPU with the
demo model.

On CUDA (`gpu_sweep`): a Llama-3.1-8B-shaped model with random bf16 weights, served by the engine in-process
(no HTTP) at batch sizes 1-256: output tokens/s, and the decode step's time against the bandwidth floor
(weights + KV read once, `ArchConfig.decode_step_bytes`, at the measured copy bandwidth); baseline
transformers `generate` at batch 1 on the same weights.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tessera.demo import PARENT_DIR
from tessera.devices import median_ms
from tessera.runtime.sampling import load_tokenizer

from .harness import InTurns, decoding_engine, hf_generate, random_prompts, wait_healthy

GOAL = 4.0  # x transformers' one-at-a-time output-token throughput at 16 concurrent requests


@dataclass(frozen=True)
class Load:
    request_rate: float  # requests/s of the Poisson process; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most (None: no cap)

    @property
    def name(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate {rate}" + (f", concurrency {self.max_concurrency}" if self.max_concurrency else "")


CPU_LOADS = (Load(math.inf, 16), Load(2.0), Load(6.0))
ASYNC_BLOCK = 8  # decode steps of the GPU sweep in a row with async scheduling on, then off (gpu_sweep)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


async def _request(http, url: str, model: str, prompt: list[int], output_len: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, last, itl, tokens, error, text = None, start, [], 0, None, ""
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "error": (await response.aread()).decode()[:200]}
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                error = data["error"]["message"]
                continue
            now = time.perf_counter()
            if data["choices"] and data["choices"][0]["text"]:
                text += data["choices"][0]["text"]
                if ttft is None:
                    ttft = now - start
                else:
                    itl.append(now - last)
                last = now
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    ok = error is None and ttft is not None and tokens == output_len
    return {
        "ok": ok,
        "error": error,
        "ttft": ttft,
        "itl": itl,
        "latency": latency,
        "output_tokens": tokens,
        "text": text,
    }


async def run_load(base: str, model: str, prompts: list[list[int]], output_len: int, load: Load, seed: int) -> dict:
    import httpx

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(load.max_concurrency or len(prompts))
    url = f"{base}/v1/completions"

    async def limited(http, prompt):
        async with limit:
            return await _request(http, url, model, prompt, output_len)

    timeout = httpx.Timeout(None)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as http:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(http, prompt)))
            if not math.isinf(load.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / load.request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    # Each prompt's streamed text (None: failed), in the prompts' order, for the comparison with the baseline's.
    return summarize(records, duration, len(prompts[0])) | {"texts": [r["text"] if r["ok"] else None for r in records]}


def summarize(records: list[dict], duration: float, input_len: int) -> dict:
    done = [r for r in records if r["ok"]]
    output = sum(r["output_tokens"] for r in done)
    tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in done if r["output_tokens"] > 1]
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r["error"] for r in records if not r["ok"] and r.get("error")})[:3],
        "duration_s": duration,
        "total_input_tokens": input_len * len(done),
        "total_output_tokens": output,
        "request_throughput": len(done) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (output + input_len * len(done)) / duration,
        "ttft_ms": percentiles([r["ttft"] for r in done]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in done for x in r["itl"]]),
        "e2el_ms": percentiles([r["latency"] for r in done]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tessera serve` in a subprocess (as vLLM benchmarks a running server: the client's Python does not
    share the server's GIL)."""

    def __init__(
        self,
        model_dir: Path,
        max_batch: int,
        device: str = "cpu",
        dtype: str = "float32",
        data_parallel_size: int = 1,
        flags: tuple[str, ...] = (),
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "tessera.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--device",
            device,
            "--dtype",
            dtype,
            "--data-parallel-size",
            str(data_parallel_size),
            *flags,
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_healthy(self.base, timeout, self.proc)

    def model_name(self) -> str:
        import httpx

        return httpx.get(f"{self.base}/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def transformers_baseline(
    model_dir: Path, prompts: list[list[int]], output_len: int, device: str = "cpu", dtype=torch.float32
) -> dict:
    """The same requests one at a time through transformers' generate; returns throughput and latencies."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    latencies, outputs = [], []
    with torch.inference_mode():
        warm = torch.tensor([prompts[0]], device=device)
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            t0 = time.perf_counter()
            out = hf_generate(hf, ids, output_len)
            latencies.append(time.perf_counter() - t0)
            outputs.append(out[0, len(prompt) :].tolist())
        duration = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {
        "requests": len(prompts),
        "duration_s": duration,
        "total_output_tokens": tokens,
        "output_throughput": tokens / duration,
        "request_throughput": len(prompts) / duration,
        "e2el_ms": percentiles(latencies),
        "outputs": outputs,
    }


def page_layouts(model_dir: Path, batch: int, input_len: int, rounds: int = 7, steps: int = 8) -> dict:
    """The engine's decode step at `batch` requests (their prompts cached), in this process, in 16-token KV pages
    (the default: gathered for a batch's attention) and in whole-context ones (one a request, read in place):
    both engines built first, then timed in interleaved rounds (harness.InTurns; a round: each engine's median of
    `steps` steps after an untimed one, `median_ms`). Each layout's median over the rounds, and the median
    (min-max) of the rounds' ratios, 16-token over whole-context."""
    from tessera.runtime.loader import load_model

    model = load_model(model_dir)
    sizes = {"pages_16": 16, "whole_context_pages": model.arch.max_position_embeddings}
    room = rounds * (steps + 1)  # the steps each engine takes: each round's timed ones and its untimed first
    engines = {name: decoding_engine(model, batch, input_len, room, page_size=size) for name, size in sizes.items()}
    cpu = torch.device("cpu")
    turns = InTurns({name: partial(median_ms, e.step, cpu, min_reps=steps, budget_s=0) for name, e in engines.items()})
    ratio = turns.run(rounds).ratio("pages_16", "whole_context_pages")
    return {
        "batch": batch,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_round": steps,
        **{name: turns.spread(name).median for name in engines},
        "rounds_ms": turns.times,
        "ratio": ratio.median,
        "ratio_range": [ratio.low, ratio.high],
    }


def run_cpu(
    model_dir: Path = PARENT_DIR,
    num_prompts: int = 48,
    input_len: int = 128,
    output_len: int = 128,
    loads: tuple[Load, ...] = CPU_LOADS,
    max_batch: int = 16,
    seed: int = 0,
    data_parallel_sizes: tuple[int, ...] = (1, 2),
) -> dict:
    """The online benchmark on CPU (float32) against transformers one request at a time. The first server
    configuration (the default: one engine process) runs every load; the others only the goal's load."""
    from tessera.config import ArchConfig

    arch = ArchConfig.from_json(model_dir)
    prompts = random_prompts(num_prompts, input_len, arch.vocab_size, seed)
    runs = []
    for n, dp in enumerate(data_parallel_sizes):
        # Every load sends the same prompts: after the first, they would come from the prefix cache, which a
        # stream of distinct prompts (this benchmark's workload, and the baseline's) never does.
        server = ServerProcess(model_dir, max_batch, data_parallel_size=dp, flags=("--no-prefix-caching",))
        try:
            server.wait_ready()
            name = server.model_name()
            asyncio.run(run_load(server.base, name, prompts[: min(4, num_prompts)], 8, Load(math.inf), seed))  # warm
            for load in loads if n == 0 else [x for x in loads if x.max_concurrency == 16]:
                print(f"tessera serve --data-parallel-size {dp}, {load.name} ...", file=sys.stderr)
                result = asyncio.run(run_load(server.base, name, prompts, output_len, load, seed))
                runs.append({"load": asdict(load), "name": load.name, "data_parallel_size": dp, **result})
        finally:
            server.stop()
        started = [line for line in server.proc.stderr.read().splitlines() if line.startswith("tessera serve:")]
        for r in runs:
            if r["data_parallel_size"] == dp:
                r["server"] = started[0] if started else None  # engines, threads, KV pool: as the server reported
    print("transformers generate, one request at a time ...", file=sys.stderr)
    baseline = transformers_baseline(model_dir, prompts, output_len)
    # Greedy on the same float32 weights: every served text should be transformers' (a near-tie between two tokens
    # may go either way, batched sums rounding in other last bits: counted, not asserted).
    tokenizer = load_tokenizer(model_dir)
    expected = [tokenizer.decode(tokens) for tokens in baseline.pop("outputs")]
    for r in runs:
        r["same_text_as_transformers"] = sum(a == b for a, b in zip(r.pop("texts"), expected))
    print("the engine's decode step, KV in 16-token pages and in whole-context pages, in turns ...", file=sys.stderr)
    step_ms = page_layouts(model_dir, 16, input_len)
    goal_run = next((r for r in runs if r["load"]["max_concurrency"] == 16), None)  # the default server's
    ratio = goal_run["output_throughput"] / baseline["output_throughput"] if goal_run else None
    return {
        "model": str(Path(model_dir).name),
        "dtype": "float32",
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "max_batch": max_batch,
        "baseline_threads": torch.get_num_threads(),
        "runs": runs,
        "baseline": {"name": "transformers generate, one request at a time", **baseline},
        "decode_step_ms": step_ms,
        "goal": {
            "concurrency": 16,
            "target_ratio": GOAL,
            "ratio": ratio,
            "met": ratio is not None and ratio >= GOAL,
            "server": f"--data-parallel-size {data_parallel_sizes[0]}",
        },
    }


def _ms(p: dict) -> str:
    return f"{p['mean']:.1f} / {p['median']:.1f} / {p['p99']:.1f}"


def _same(run: dict, requests: int) -> str:
    """How many of a run's requests streamed the baseline's text ("-" for results from before it was compared)."""
    return f"{run['same_text_as_transformers']}/{requests}" if "same_text_as_transformers" in run else "-"


def table(result: dict) -> str:
    b = result["baseline"]
    lines = [
        f"{result['num_prompts']} requests, {result['input_len']} prompt tokens (random ids), exactly "
        f"{result['output_len']} output tokens each (greedy, EOS ignored); {result['model']}, {result['dtype']}; "
        f"max batch {result['max_batch']} per engine. Latencies in ms as mean / median / p99.",
        "",
        "| server | load | req/s | output tok/s | vs baseline | TTFT | TPOT | ITL | E2E latency "
        "| same text as baseline |",
        "|---|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in result["runs"]:
        dp = r.get("data_parallel_size", 1)
        server = "tessera serve" + (f" --data-parallel-size {dp}" if dp > 1 else "")
        lines.append(
            f"| {server} | {r['name']} | {r['request_throughput']:.2f} | {r['output_throughput']:.0f} | "
            f"{r['output_throughput'] / b['output_throughput']:.2f}x | {_ms(r['ttft_ms'])} | {_ms(r['tpot_ms'])} | "
            f"{_ms(r['itl_ms'])} | {_ms(r['e2el_ms'])} | {_same(r, result['num_prompts'])} |"
        )
    lines.append(
        f"| transformers `generate` | one at a time | {b['request_throughput']:.2f} | {b['output_throughput']:.0f} | "
        f"1.00x | - | - | - | {_ms(b['e2el_ms'])} | - |"
    )
    servers = sorted({r["server"] for r in result["runs"] if r.get("server")})
    lines += ["", *(f"Server: `{line}`" for line in servers)]
    d = result.get("decode_step_ms")
    if d:
        lines += [
            "",
            f"The engine's decode step at batch {d['batch']} ({d['threads']} threads, in-process, {d['rounds']} "
            f"interleaved rounds of {d['steps_per_round']} steps): {d['pages_16']:.2f} ms with 16-token KV pages (the "
            f"default, gathered for attention), {d['whole_context_pages']:.2f} ms with a whole-context page per "
            f"request (read in place); 16-token / whole-context {d['ratio']:.2f} "
            f"({d['ratio_range'][0]:.2f}-{d['ratio_range'][1]:.2f}), the median of the rounds' ratios.",
        ]
    g = result.get("goal")
    if g and g["ratio"] is not None:
        verdict = "met" if g["met"] else "NOT met"
        lines += [
            "",
            f"Goal: >= {g['target_ratio']:g}x the baseline's output tokens/s at {g['concurrency']} "
            f"concurrent requests: {g['ratio']:.2f}x ({verdict}).",
        ]
    failed = sum(r["failed"] for r in result["runs"])
    if failed:  # every run's errors (the first run may have had none)
        errors = sorted({e for r in result["runs"] for e in r["errors"]})
        lines.append(f"\n{failed} requests failed: {errors[:3]}")
    return "\n".join(lines)


# GPU: engine throughput vs batch size at Llama-3.1-8B shape


def gpu_sweep(
    device: torch.device,
    copy_gbps: float,
    batches=(1, 8, 32, 64, 128, 256),
    input_len: int = 512,
    output_len: int = 128,
) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tessera.config import ArchConfig
    from tessera.runtime.engine import Engine, EngineConfig
    from tessera.runtime.loader import load_hf_state
    from tessera.runtime.model import Model
    from tessera.runtime.sampling import SamplingParams

    from .bench_model import LLAMA_3_1_8B

    arch = ArchConfig.from_hf_dict(LLAMA_3_1_8B, "Llama-3.1-8B")
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in LLAMA_3_1_8B.items() if k not in ("architectures", "torch_dtype")})
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model = Model.empty(arch, device, torch.bfloat16)
    load_hf_state(model, hf.state_dict())
    prompts = random_prompts(max(batches), input_len, arch.vocab_size)
    warm_prompts = random_prompts(max(batches), input_len, arch.vocab_size, seed=1)
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    rows = []
    for batch in batches:
        engine = Engine(
            model, None, EngineConfig(max_batch=batch, max_model_len=input_len + output_len, max_step_tokens=2048)
        )
        # Warm-up on a whole batch of other prompts: the prefill chunks of the timed run have the same shapes, so
        # Triton compiles them here (with 4 prompts, batches 8 and 128 once paid compilation inside the timed
        # window); the timed prompts themselves would come from the prefix cache.
        engine.generate(warm_prompts[:batch], SamplingParams(max_new_tokens=2, ignore_eos=True))
        for p in prompts[:batch]:
            engine.add_request(p, params)
        start = time.perf_counter()
        step_ms, prefill_s = serve_timed(engine, batch)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        context = input_len + output_len // 2
        floor_ms = 1e3 * arch.decode_step_bytes(batch, context, "bfloat16") / (copy_gbps * 1e9)
        median, sync_median = (float(np.median(step_ms[mode])) for mode in (True, False))
        rows.append(
            {
                "batch": batch,
                "output_throughput": batch * output_len / total,
                "duration_s": total,
                "prefill_steps_s": prefill_s,
                "decode_step_ms": median,
                "decode_step_ms_iqr": [float(q) for q in np.percentile(step_ms[True], [25, 75])],
                "decode_step_ms_sync": sync_median,
                "async_speedup": sync_median / median,
                "floor_ms": floor_ms,
                "floor_pct": 100 * floor_ms / median,
                "graphs": engine.graphs is not None,
            }
        )
        del engine
        torch.cuda.empty_cache()
    baseline = transformers_baseline_model(hf, prompts[:4], output_len, device)
    return {
        "model": "Llama-3.1-8B shape, random weights",
        "dtype": "bfloat16",
        "input_len": input_len,
        "output_len": output_len,
        "copy_bandwidth_gbps": copy_gbps,
        "rows": rows,
        "baseline": {"name": "transformers generate, batch 1", **baseline},
    }


def serve_timed(engine, batch: int) -> tuple[dict[bool, list[float]], float]:
    """Step `engine` until idle: the wall ms of its decode step calls with all `batch` requests running, by whether
    async scheduling was on; and the seconds of the steps holding prompt chunks (with the decodes beside them).

    Each call's wall time, with no synchronization of our own: a call returns once its step's tokens are on the
    host, and with async scheduling the next step is already running then, so a call's time is what a client
    waits between tokens. Decode steps alternate in blocks of ASYNC_BLOCK between async scheduling on (the served
    default on CUDA) and off, so both are measured in the same run; a block's first step, which finishes the other
    mode's, is not counted."""
    step_ms: dict[bool, list[float]] = {True: [], False: []}
    prefill_s, decodes = 0.0, 0
    while engine.has_work():
        decoding = not engine.waiting and all(r.computed >= r.prompt_len for r in engine.running)
        counted = decoding and len(engine.running) == batch
        if counted:
            engine.async_scheduling = (decodes // ASYNC_BLOCK) % 2 == 0
            counted = decodes % ASYNC_BLOCK > 0
            decodes += 1
        t0 = time.perf_counter()
        engine.step()
        if counted:
            step_ms[engine.async_scheduling].append(1e3 * (time.perf_counter() - t0))
        elif not decoding:
            prefill_s += time.perf_counter() - t0
    return step_ms, prefill_s


def transformers_baseline_model(hf, prompts: list[list[int]], output_len: int, device: torch.device) -> dict:
    times = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=device)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf_generate(hf, ids, output_len)
            torch.cuda.synchronize()
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
    return {"output_throughput": output_len * len(times) / sum(times), "requests": len(times)}


def gpu_table(result: dict) -> str:
    b = result["baseline"]
    lines = [
        f"{result['model']}, {result['dtype']}; prompts {result['input_len']}, outputs {result['output_len']} tokens; "
        f"engine in-process; floor = weights + KV read once at {result['copy_bandwidth_gbps']:.0f} GB/s. Decode step: "
        f"median wall time of a step call (IQR) with async scheduling, and without it in blocks of {ASYNC_BLOCK} "
        "steps alternating with it (the output tok/s are of that mixed run).",
        "",
        "| batch | output tok/s | vs transformers b=1 | prefill steps s | decode step ms (IQR) | without async ms "
        "| async speedup | floor ms | % of floor | CUDA graphs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        prefill = f"{r['prefill_steps_s']:.2f}" if "prefill_steps_s" in r else "-"
        if "decode_step_ms_sync" in r:
            low, high = r["decode_step_ms_iqr"]
            step = f"{r['decode_step_ms']:.2f} ({low:.2f}-{high:.2f}) | {r['decode_step_ms_sync']:.2f} | "
            step += f"{r['async_speedup']:.2f}x"
        else:  # results from before async scheduling
            step = f"{r['decode_step_ms']:.2f} | - | -"
        lines.append(
            f"| {r['batch']} | {r['output_throughput']:.0f} | {r['output_throughput'] / b['output_throughput']:.1f}x | "
            f"{prefill} | {step} | {r['floor_ms']:.2f} | {r['floor_pct']:.0f} % | {r['graphs']} |"
        )
    lines.append(f"\ntransformers generate, batch 1: {b['output_throughput']:.1f} output tok/s")
    return "\n".join(lines)


def test_serving_throughput_vs_transformers() -> None:
    """`make bench`: the CPU run, results written, goal asserted (a benchmark, not part of `make test`)."""
    from .harness import environment, write_results

    result = run_cpu()
    env = environment("cpu")
    write_results(
        "cpu_serving",
        {**env, **result},
        f"Serving on {env['device']} (commit {env['commit']}, {env['date']})\n\n" + table(result),
    )
    assert result["goal"]["met"], table(result)
