"""What prefix caching saves on prompts that share their first tokens (a system prompt, few-shot examples):
`requests` prompts of one common part of `shared` tokens and an own part of `unique` tokens, `gen` new tokens
each (EOS ignored), all submitted at once and served to completion by the engine (16-token pages), with prefix
caching and without it. The model is bench_model's: the demo parent's shape on the CPU (float32), the
Llama-3.1-8B shape on a GPU (bf16), random weights; and the same with a window of a quarter of the shared
tokens on every other layer and steps as long (its sequences give windowed pages back as they go; its cached
prefixes hold only the windowed layers' last pages).
`tessera bench prefix`.

The configurations take turns in every round (harness.InTurns: the order reversed every other round), each
round on prompts of its own (drawn from the round's seed: what one round left cached never serves the next),
after an untimed warm-up round. Reported: each configuration's median wall time over the rounds with its
spread (min-max), the tokens it found cached, and the median over rounds of each round's time ratio to the
engine with prefix caching. On the CPU also the data-parallel server's routing (`data_parallel_routing`): two
engine processes, requests over several prefixes routed by cached prefix (runtime/routing.py) and by load.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.model import Model
from tessera.runtime.sampling import SamplingParams

from .bench_model import benchmarked
from .harness import InTurns, random_prompts, wall_s

ROUNDS = {"cpu": 5, "cuda": 3}  # the GPU's within the suite's 90 s step (64 requests with 5 rounds took over 90 s)
CACHED, UNCACHED = "prefix caching", "no prefix caching"
CONFIGS = {CACHED: dict(), UNCACHED: dict(prefix_caching=False)}
WINDOWED = ", windowed"  # the same model with a window on every other layer (Mistral's, Gemma's kind of layout)
WORKLOADS = {  # device type: (requests, shared, unique, gen)
    "cpu": (16, 512, 32, 32),
    "cuda": (32, 2048, 64, 32),
}


def workload(vocab: int, requests: int, shared: int, unique: int, seed: int, prefixes: int = 1) -> list[list[int]]:
    """`requests` prompts over `prefixes` common parts of `shared` tokens (as many of each as the count allows, in
    an order drawn from `seed`), each with `unique` tokens of its own after it."""
    commons = random_prompts(prefixes, shared, vocab, seed=2 * seed)
    owns = random_prompts(requests, unique, vocab, seed=2 * seed + 1)
    order = torch.randperm(requests, generator=torch.Generator().manual_seed(seed)).tolist()
    return [commons[order[i] % prefixes] + own for i, own in enumerate(owns)]


class _Side:
    """One side of a round (InTurns): `serve(prompts)` gives (seconds to serve them all, prompt tokens found
    cached); the seconds are the measurement, the tokens recorded beside."""

    def __init__(self, serve: Callable[[list[list[int]]], tuple[float, int]]) -> None:
        self.serve = serve
        self.cached: list[int] = []

    def __call__(self, prompts: list[list[int]]) -> float:
        seconds, cached = self.serve(prompts)
        self.cached.append(cached)
        return seconds


def _rows(turns: InTurns, sides: dict[str, _Side], baseline: Callable[[str], str], ratio: str) -> list[dict]:
    """Each side's wall time over the rounds, the tokens it found cached, and as `ratio` the median (min-max) of
    its rounds' time ratios to side `baseline(name)`'s."""
    rows = []
    for name, side in sides.items():
        wall, ratios = turns.spread(name), turns.ratio(name, baseline(name))
        rows.append(
            {
                "median_s": wall.median,
                "min_s": wall.low,
                "max_s": wall.high,
                "rounds_s": turns.times[name],
                "cached_tokens": statistics.median(side.cached),
                ratio: ratios.median,
                "ratio_min": ratios.low,
                "ratio_max": ratios.high,
            }
        )
    return rows


def _run_rounds(sides: dict[str, _Side], rounds: int, prompts: Callable[[int], list[list[int]]]) -> InTurns:
    """A warm-up call of each side (first calls, kernel compilation), then `rounds` rounds in turns, round r on
    `prompts(r)`."""
    for side in sides.values():
        side(prompts(1000))
        side.cached.clear()
    turns = InTurns(sides)
    for r in range(rounds):
        turns.round(prompts(r))
    return turns


def _engine_serve(engine: Engine, params: SamplingParams, device: torch.device):
    def serve(prompts: list[list[int]]) -> tuple[float, int]:
        hits = engine.prefix_hits
        return wall_s(lambda: engine.generate(prompts, params), device), engine.prefix_hits - hits

    return serve


def windowed(model: Model, window: int, layers: Iterable[int] | None = None) -> Model:
    """`model` (its weights copied) with a window of `window` keys on `layers` (every other one from the second by
    default)."""
    blocks = list(model.arch.blocks)
    for i in range(1, len(blocks), 2) if layers is None else layers:
        blocks[i] = replace(blocks[i], attention=replace(blocks[i].attention, window=window))
    twin = Model.empty(model.arch.with_blocks(blocks), model.embed_tokens.weight.device, model.run_dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def run(device: torch.device, rounds: int | None = None) -> dict:
    rounds = rounds or ROUNDS[device.type]
    model, _, what = benchmarked(device)  # the demo parent's shape on the CPU, the 8B shape on a GPU
    requests, shared, unique, gen = WORKLOADS[device.type]
    length = shared + unique + gen
    window = shared // 4  # the prefix is 4 windows long
    models = {"": model, WINDOWED: windowed(model, window)}
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    # The windowed model's steps are a window long, so its sequences hold fewer pages than their prompts fill and
    # give pages back as they go (at 512-token steps, the CPU's prompts would fit in what a sequence holds).
    steps = {"": {}, WINDOWED: dict(max_step_tokens=window)}
    engines = {
        name + kind: Engine(m, None, EngineConfig(max_batch=requests, max_model_len=length, **config, **steps[kind]))
        for kind, m in models.items()
        for name, config in CONFIGS.items()
    }
    sides = {name: _Side(_engine_serve(engine, params, device)) for name, engine in engines.items()}
    vocab = model.arch.vocab_size
    with torch.inference_mode():
        turns = _run_rounds(sides, rounds, lambda seed: workload(vocab, requests, shared, unique, seed))
    rows = _rows(turns, sides, lambda name: CACHED + WINDOWED * name.endswith(WINDOWED), "time_vs_prefix_caching")
    for row, (name, engine) in zip(rows, engines.items()):
        row.update(config=name, page_size=engine.cache.page_size)
    return {
        "model": what,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "requests": requests,
        "shared_tokens": shared,
        "unique_tokens": unique,
        "gen_tokens": gen,
        "window": window,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "rows": rows,
        # Several engine processes serve on the CPU only (one engine per GPU on CUDA).
        "data_parallel": data_parallel_routing(rounds) if device.type == "cpu" else None,
    }


# Data parallel on the CPU (`tessera serve --data-parallel-size 2`): requests, distinct prefixes, prefix tokens,
# own tokens, new tokens. Eight system prompts of four requests each, all at once.
ROUTING_WORKLOAD = (32, 8, 256, 16, 16)
ROUTES = {"by cached prefix": True, "by load": False}
_request_ids = itertools.count()


def _async_serve(engine, params: SamplingParams):
    """An AsyncEngine's `serve` for a _Side: the prompts all submitted at once."""

    async def final(stream):
        async for out in stream:
            if out.finished:
                return out

    async def serve_all(prompts: list[list[int]]) -> tuple[float, int]:
        start = time.perf_counter()
        requests = [engine.admit(f"r{next(_request_ids)}", p, params) for p in prompts]
        finals = await asyncio.gather(*(final(engine.submit(r)) for r in requests))
        seconds = time.perf_counter() - start
        if errors := [o.error for o in finals if o.finish_reason == "error"]:
            raise RuntimeError(f"data-parallel routing benchmark: {errors[0]}")
        return seconds, sum(o.cached_tokens for o in finals)

    return lambda prompts: asyncio.run(serve_all(prompts))


def data_parallel_routing(rounds: int | None = None, engines: int = 2) -> dict:
    """The demo parent served by `engines` engine processes of one thread each (AsyncEngine, as `tessera serve
    --data-parallel-size`), float32, prefix caching on in each, requests routed by cached prefix
    (runtime/routing.py) and by load alone: both servers started first, then timed in turns on fresh prompts
    each round (ROUTING_WORKLOAD), after a warm-up round each. CPU only (one engine per GPU on CUDA)."""
    from tessera.demo import PARENT_DIR
    from tessera.runtime.async_engine import AsyncEngine, EngineSpec

    rounds = rounds or ROUNDS["cpu"]
    requests, prefixes, shared, unique, gen = ROUTING_WORKLOAD
    config = EngineConfig(max_batch=requests // engines, max_model_len=shared + unique + gen)
    spec = EngineSpec(str(PARENT_DIR), config=config, threads=1)
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    servers = {name: AsyncEngine(spec, engines, prefix_routing=on) for name, on in ROUTES.items()}
    try:
        sides = {name: _Side(_async_serve(server.start(), params)) for name, server in servers.items()}
        vocab = servers["by load"].limits.vocab_size
        turns = _run_rounds(sides, rounds, lambda seed: workload(vocab, requests, shared, unique, seed, prefixes))
    finally:
        for server in servers.values():
            server.shutdown()
    rows = _rows(turns, sides, lambda name: "by cached prefix", "time_vs_prefix_routing")
    for row, (name, server) in zip(rows, servers.items()):
        row.update(routing=name, requests_per_engine=server.requests_per_engine)
    return {
        "engines": engines,
        "threads_per_engine": 1,
        "requests": requests,
        "prefixes": prefixes,
        "shared_tokens": shared,
        "unique_tokens": unique,
        "gen_tokens": gen,
        "rounds": rounds,
        "rows": rows,
    }


def routing_table(result: dict) -> str:
    head = (
        f"Data parallel: {result['engines']} engine processes of {result['threads_per_engine']} thread, the demo "
        f"parent (float32); {result['requests']} requests at once over {result['prefixes']} prefixes of "
        f"{result['shared_tokens']} tokens, each with {result['unique_tokens']} own prompt tokens and "
        f"{result['gen_tokens']} new tokens; {result['rounds']} rounds (fresh prompts each).\n\n"
        "| routing | wall s, median (min-max) | prompt tokens cached | requests per engine (every round) | "
        "time / by cached prefix's, median (min-max) |\n|---|---:|---:|---|---:|\n"
    )
    lines = [
        f"| {r['routing']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['cached_tokens']:,.0f} | "
        f"{r['requests_per_engine']} | {r['time_vs_prefix_routing']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"


def table(result: dict) -> str:
    head = (
        f"{result['requests']} requests at once, each {result['shared_tokens']} shared + {result['unique_tokens']} "
        f"own prompt tokens and {result['gen_tokens']} new tokens; {result['model']}, {result['dtype']}, "
        f'{result["rounds"]} rounds (fresh prompts each), {result["threads"]} threads. "windowed": the same weights '
        f"with a window of {result['window']} keys on every other layer and steps of {result['window']} tokens, "
        "against prefix caching on that model.\n\n"
        "| engine | page | wall s, median (min-max) | prompt tokens cached | time / prefix caching's, median "
        "(min-max) |\n|---|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['config']} | {r['page_size']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | "
        f"{r['cached_tokens']:,.0f} | {r['time_vs_prefix_caching']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |"
        for r in result["rows"]
    ]
    routed = "\n" + routing_table(result["data_parallel"]) if result.get("data_parallel") else ""
    return head + "\n".join(lines) + "\n" + routed
