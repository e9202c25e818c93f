"""What prefix caching saves on prompts that share their first tokens (a system prompt, few-shot examples):
`requests` prompts of one common part of `shared` tokens and an own part of `unique` tokens, `gen` new tokens
each (EOS ignored), all submitted at once and served to completion by the engine (16-token pages), with prefix
caching and without it. The model is bench_model's: the demo parent's shape on the CPU (float32), the
Llama-3.1-8B shape on a GPU (bf16), random weights. `tessera bench prefix`.

The configurations take turns in every round (harness.InTurns: the order reversed every other round), each
round on prompts of its own (drawn from the round's seed: what one round left cached never serves the next),
after an untimed warm-up round. Reported: each configuration's median wall time over the rounds with its
spread (min-max), the tokens it found cached, and the median over rounds of each round's time ratio to the
engine with prefix caching.
"""

from __future__ import annotations

import statistics

import torch

from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.sampling import SamplingParams

from .bench_model import benchmarked
from .harness import InTurns, random_prompts, wall_s

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


class _Served:
    """One engine's side of a round (InTurns): seconds to serve the round's prompts to completion, the prompt
    tokens it found cached recorded beside."""

    def __init__(self, engine: Engine, params: SamplingParams, device: torch.device) -> None:
        self.engine, self.params, self.device = engine, params, device
        self.cached: list[int] = []

    def __call__(self, prompts: list[list[int]]) -> float:
        hits = self.engine.prefix_hits
        seconds = wall_s(lambda: self.engine.generate(prompts, self.params), self.device)
        self.cached.append(self.engine.prefix_hits - hits)
        return seconds


def run(device: torch.device, rounds: int | None = None) -> dict:
    rounds = rounds or ROUNDS
    model, _, what = benchmarked(device)  # the demo parent's shape on the CPU, the 8B shape on a GPU
    requests, shared, unique, gen = WORKLOADS[device.type]
    length = shared + unique + gen
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    served = {
        name: _Served(
            Engine(model, None, EngineConfig(max_batch=requests, max_model_len=length, **config)), params, device
        )
        for name, config in CONFIGS.items()
    }
    vocab = model.arch.vocab_size
    turns = InTurns(served)
    with torch.inference_mode():
        for side in served.values():  # warm-up: first calls, kernel compilation
            side(workload(vocab, requests, shared, unique, seed=1000))
            side.cached.clear()
        for r in range(rounds):
            turns.round(workload(vocab, requests, shared, unique, seed=r))
    rows = []
    for name, side in served.items():
        wall, ratio = turns.spread(name), turns.ratio(name, CACHED)
        rows.append(
            {
                "config": name,
                "page_size": side.engine.cache.page_size,
                "median_s": wall.median,
                "min_s": wall.low,
                "max_s": wall.high,
                "rounds_s": turns.times[name],
                "cached_tokens": statistics.median(side.cached),
                "time_vs_prefix_caching": ratio.median,
                "ratio_min": ratio.low,
                "ratio_max": ratio.high,
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
