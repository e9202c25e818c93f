"""What prefix caching saves on prompts that share their first tokens (a system prompt, few-shot examples):
`requests` prompts of one common part of `shared` tokens and an own part of `unique` tokens, `gen` new tokens
each (EOS ignored), all submitted at once and served to completion by the engine (16-token pages), with prefix
caching and without it. The model is bench_model's: the demo parent's shape on the CPU (float32), the
Llama-3.1-8B shape on a GPU (bf16), random weights. `tessera bench prefix`.

The configurations take turns in every round, each round on prompts of its own (drawn from the round's seed:
what one round left cached never serves the next), after an untimed warm-up round. Reported: each
configuration's median wall time over the rounds with its spread (min-max), the tokens it found cached, and
the median over rounds of each round's time ratio to the engine with prefix caching.
"""

from __future__ import annotations

import statistics
import time

import torch

from tessera.devices import synchronize
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.sampling import SamplingParams

from .bench_model import benchmarked
from .harness import random_prompts

ROUNDS = 5
CACHED, UNCACHED = "prefix caching", "no prefix caching"
CONFIGS = {CACHED: dict(), UNCACHED: dict(prefix_caching=False)}
WORKLOADS = {  # device type: (requests, shared, unique, gen)
    "cpu": (16, 512, 32, 32),
    "cuda": (64, 2048, 128, 64),
}


def workload(vocab: int, requests: int, shared: int, unique: int, seed: int) -> list[list[int]]:
    """`requests` prompts: one common part of `shared` tokens, then `unique` tokens of their own each."""
    common = random_prompts(1, shared, vocab, seed=2 * seed)[0]
    return [common + own for own in random_prompts(requests, unique, vocab, seed=2 * seed + 1)]


def _serve(engine: Engine, prompts: list[list[int]], params: SamplingParams, device: torch.device) -> tuple[float, int]:
    """Seconds to serve `prompts` to completion, and the prompt tokens found cached."""
    hits = engine.prefix_hits
    synchronize(device)
    start = time.perf_counter()
    engine.generate(prompts, params)
    synchronize(device)
    return time.perf_counter() - start, engine.prefix_hits - hits


def run(device: torch.device, rounds: int | None = None) -> dict:
    rounds = rounds or ROUNDS
    model, _, what = benchmarked(device)  # the demo parent's shape on the CPU, the 8B shape on a GPU
    requests, shared, unique, gen = WORKLOADS[device.type]
    length = shared + unique + gen
    engines = {
        name: Engine(model, None, EngineConfig(max_batch=requests, max_model_len=length, **config))
        for name, config in CONFIGS.items()
    }
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    vocab = model.arch.vocab_size
    with torch.inference_mode():
        for engine in engines.values():  # warm-up: first calls, kernel compilation
            _serve(engine, workload(vocab, requests, shared, unique, seed=1000), params, device)
        times: dict[str, list[float]] = {name: [] for name in engines}
        hits: dict[str, list[int]] = {name: [] for name in engines}
        for r in range(rounds):
            prompts = workload(vocab, requests, shared, unique, seed=r)
            for name, engine in engines.items():
                seconds, cached = _serve(engine, prompts, params, device)
                times[name].append(seconds)
                hits[name].append(cached)
    rows = []
    for name, engine in engines.items():
        ratios = [t / c for t, c in zip(times[name], times[CACHED])]
        rows.append(
            {
                "config": name,
                "page_size": engine.cache.page_size,
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "rounds_s": times[name],
                "cached_tokens": statistics.median(hits[name]),
                "time_vs_prefix_caching": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return {
        "model": what,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "requests": requests,
        "shared_tokens": shared,
        "unique_tokens": unique,
        "gen_tokens": gen,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def table(result: dict) -> str:
    head = (
        f"{result['requests']} requests at once, each {result['shared_tokens']} shared + {result['unique_tokens']} "
        f"own prompt tokens and {result['gen_tokens']} new tokens; {result['model']}, {result['dtype']}, "
        f"{result['rounds']} rounds (fresh prompts each), {result['threads']} threads.\n\n"
        "| engine | page | wall s, median (min-max) | prompt tokens cached | time / prefix caching's, median "
        "(min-max) |\n|---|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['config']} | {r['page_size']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | "
        f"{r['cached_tokens']:,.0f} | {r['time_vs_prefix_caching']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"
