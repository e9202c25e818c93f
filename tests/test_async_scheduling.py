"""Async scheduling (`Engine._run_ahead`): each decode step planned and issued before the step before it has
given its tokens to the host, so on a GPU the device goes from step to step while the host turns tokens into text.

Reference: the same engine without it (`async_scheduling=False`), whose steps are planned with every token known.
On the CPU a step runs as it is issued, so these tests check the planning: which steps run ahead, that the outputs,
step by step, are the synchronous engine's, and that a request a step's tokens end (EOS, a stop string, an abort,
a failed draw) leaves nothing behind in the step planned for it. That issuing a step never waits for the GPU is
tested on CUDA (the last test).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tessera.demo import PARENT_DIR
from tessera.runtime.cache import PagedKVCache
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.loader import load_model
from tessera.runtime.sampling import SamplingParams, load_tokenizer

from .test_engine import prompts_of, run_to_end, served_under_pressure


@pytest.fixture(scope="module")
def demo():
    return load_model(PARENT_DIR), load_tokenizer(PARENT_DIR)


def engines(model, tok, **config) -> tuple[Engine, Engine]:
    """(with async scheduling, without) of the same configuration."""
    return tuple(Engine(model, tok, EngineConfig(async_scheduling=a, **config)) for a in (True, False))


def step_by_step(engine: Engine, requests: list[tuple[str | list[int], SamplingParams]]) -> tuple[list, list]:
    """Every step's outputs (what a client is sent) until idle, and the engine's `steps_ahead` after each step."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, f"r{i}")
    steps, ahead = [], []
    while engine.has_work():
        out = engine.step()
        steps.append(
            [(o.request_id, o.token_ids, o.text, o.finish_reason, o.error, o.logprobs, o.prompt_logprobs) for o in out]
        )
        ahead.append(engine.steps_ahead)
    return steps, ahead


def tokens_by_request(outputs: dict[str, list]) -> dict[str, list[int]]:
    return {request_id: [t for out in outs for t in out.token_ids] for request_id, outs in outputs.items()}


def ending_requests(engine: Engine) -> list[tuple[str, SamplingParams]]:
    """Requests that end on their own mid-run, each at a token a free run of it gives (so the ending is certain):
    an EOS id, a stop string, a budget; beside a long greedy one, seeded sampling and a top-k/top-p one."""
    free = engine.generate(["def fibonacci(n):"], SamplingParams(max_new_tokens=30))[0]
    return [
        ("def fibonacci(n):", SamplingParams(max_new_tokens=30, stop_token_ids=(free.tokens[6],))),
        ("def fibonacci(n):", SamplingParams(max_new_tokens=30, stop=(free.text[12:16],))),
        ("import os\n", SamplingParams(max_new_tokens=40)),
        ("class Node:", SamplingParams(max_new_tokens=11, temperature=0.9, seed=5)),
        ("x = [", SamplingParams(max_new_tokens=25, temperature=0.8, top_k=40, top_p=0.9, seed=6)),
        ("for i in", SamplingParams(max_new_tokens=3)),
    ]


def test_steps_planned_ahead_send_what_the_synchronous_engine_sends(demo) -> None:
    """Step for step the same outputs (tokens, text, finish reasons), with requests ending by EOS, a stop string
    and their budgets while a step was planned ahead for them; almost every decode step ran ahead."""
    model, tok = demo
    fast, sync = engines(model, tok, max_batch=8, page_size=16)
    requests = ending_requests(sync)
    expected, _ = step_by_step(sync, requests)
    got, _ = step_by_step(fast, requests)
    assert got == expected
    reasons = [o[3] for step in got for o in step if o[3] is not None]
    assert reasons.count("stop") == 2 and reasons.count("length") == 4
    # Every step plans the next one ahead (the first too: it holds every prompt whole, so all of them sample) but
    # the last, whose requests all end by their budgets.
    assert sync.steps_ahead == 0 and fast.steps_ahead == len(got) - 1
    assert fast.cache.free_pages == fast.cache.usable_pages


@pytest.mark.parametrize("sampling", ["greedy", "seeded", "penalized"])
def test_steps_are_planned_ahead_only_while_the_pool_has_the_pages(request, sampling) -> None:
    """The pool of `test_engine`'s preemption test (6 pages of 16 tokens, 5 requests of 3 pages): where a step
    needs a page the pool lacks, it is planned with the tokens known and preempts the newest request, as without
    async scheduling. Every request's tokens equal those of an engine with pages to spare."""
    # Sampled draws compared across rounding paths in float64 (conftest's `demo_float64`); greedy in the served float32.
    model, tok = request.getfixturevalue("demo" if sampling == "greedy" else "demo_float64")
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, model.embed_tokens.weight.dtype)
    penalties = {"frequency_penalty": 0.7, "repetition_penalty": 1.3} if sampling == "penalized" else {}
    params = SamplingParams(30, temperature=0.0 if sampling == "greedy" else 1.0, seed=7, ignore_eos=True, **penalties)
    prompts = prompts_of([10] * 5, 8192, seed=2)
    expected = [c.tokens for c in Engine(model, tok, EngineConfig(max_batch=8, page_size=16)).generate(prompts, params)]
    engine = Engine(
        model, tok, EngineConfig(max_batch=8, kv_cache_bytes=6 * page_bytes, page_size=16, async_scheduling=True)
    )
    tokens, most_running = served_under_pressure(engine, prompts, params)
    assert tokens == expected and most_running == 3 and engine.preemptions > 0
    assert engine.steps_ahead > 0 and engine.cache.free_pages == 6


def test_arrivals_and_aborts_between_steps_planned_ahead(demo) -> None:
    """Requests that arrive while a step runs ahead start at the step after it (one step later than without async
    scheduling), with their own tokens; a request aborted while a step runs ahead for it sends nothing more, and
    its pages go back at once."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    texts = ["def main(argv):\n", "import os\n", "class Node:\n", "for i in range(", "x = 1"]
    alone = {t: Engine(model, tok).generate([t], params)[0].tokens for t in texts}
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_step_tokens=8, page_size=4, async_scheduling=True))
    ids, tokens, aborted = {}, {}, None
    for step in range(1000):
        if step % 4 == 0 and len(ids) < len(texts):
            t = texts[len(ids)]
            ids[engine.add_request(t, params)] = t
        if step == 9:
            aborted = next(i for i in ids if i in engine._requests and engine._requests[i].done is False)
            free = engine.cache.free_pages
            held = len(engine._requests[aborted].pages[0])
            assert engine.abort(aborted).finish_reason == "abort"
            assert engine.cache.free_pages == free + held
        for out in engine.step():
            assert out.request_id != aborted
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if len(ids) == len(texts) and not engine.has_work():
            break
    assert engine.steps_ahead > 0
    for request_id, t in ids.items():
        if request_id == aborted:
            assert tokens[request_id] == alone[t][: len(tokens[request_id])]
        else:
            assert tokens[request_id] == alone[t]
    assert engine.cache.free_pages == engine.cache.usable_pages


def test_penalties_and_logprobs_run_ahead_and_prompt_logprobs_wait_for_their_first_output(demo) -> None:
    """Penalties count each draw on the device and log-probabilities are computed there, so steps of requests asking
    for them run ahead, each draw seeing the token the step before drew. A prompt's log-probabilities go with its
    first output: the step after its prompt is planned once that is sent. The outputs, log-probabilities included,
    equal the synchronous engine's, and the penalties change them (the same requests without give other tokens)."""
    model, tok = demo
    penalized = SamplingParams(max_new_tokens=30, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)
    requests = [
        ("import os\n", SamplingParams(max_new_tokens=24, prompt_logprobs=2)),
        ("def f(", SamplingParams(max_new_tokens=12, logprobs=2, temperature=0.7, seed=1)),
        ("class A", penalized),
        ("x = [", replace(penalized, temperature=0.9, seed=3, logprobs=0)),
    ]
    fast, sync = engines(model, tok, max_batch=4)
    expected, _ = step_by_step(sync, requests)
    got, ahead = step_by_step(fast, requests)
    assert got == expected
    assert sum(o[5] is not None for step in got for o in step) == 12 + 30  # every token of r1 and r3 has its entry
    assert [o[6] is not None for step in got for o in step if o[0] == "r0"][:2] == [True, False]
    # The first step (every prompt, whole) plans none ahead: r0's prompt log-probabilities are sent with its output.
    # Every step after plans the next, but the last.
    assert ahead[0] == 0 and ahead[-1] == len(got) - 2
    plain = [
        (prompt, replace(p, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0))
        for prompt, p in requests
    ]
    unpenalized, _ = step_by_step(Engine(model, tok, EngineConfig(max_batch=4)), plain)
    tokens = [[t for step in run for o in step if o[0] == "r2" for t in o[1]] for run in (got, unpenalized)]
    assert tokens[0] != tokens[1]


def test_a_failed_draw_ends_its_request_alone_while_steps_run_ahead(demo, monkeypatch) -> None:
    """A row whose draw fails (NaN logits: token -1) ends its request with an error when its step completes; the
    step planned ahead of that, which read token 0 for it, drops its row. The others finish as they do alone."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    greedy, sampled = SamplingParams(max_new_tokens=12), SamplingParams(12, 0.8, seed=3)
    solo_greedy = Engine(model, tok).generate(["import os"], greedy)[0].tokens
    solo_sampled = Engine(model, tok).generate(["def f("], sampled)[0].tokens
    real_sample, draws = engine_module.sample, []

    def sample(logits, params, uniforms):
        draws.append(len(params))
        if len(draws) == 3:  # the third step's: the seed-4 row
            logits[[p.seed for p in params].index(4)] = float("nan")
        return real_sample(logits, params, uniforms)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine = Engine(model, tok, EngineConfig(max_batch=4, async_scheduling=True))
    ids = [
        engine.add_request("import os", greedy),
        engine.add_request("x = 1", SamplingParams(12, 0.8, seed=4)),
        engine.add_request("def f(", sampled),
    ]
    outputs = run_to_end(engine)
    bad = outputs[ids[1]]
    assert len(bad) == 3 and bad[-1].finish_reason == "error" and "sampling failed" in bad[-1].error
    assert draws[3] == 3  # the step planned ahead of the failure held its row
    assert [t for o in outputs[ids[0]] for t in o.token_ids] == solo_greedy
    assert [t for o in outputs[ids[2]] for t in o.token_ids] == solo_sampled
    assert engine.cache.free_pages == engine.cache.usable_pages


def test_a_step_planned_ahead_that_fails_fails_at_the_next_step(demo, monkeypatch) -> None:
    """A forward pass that raises while a step is issued ahead: the step before it still sends its outputs (the
    synchronous engine's), the next `step` call raises, and `fail_step` ends that step's requests; a request that
    comes after is served as if nothing happened."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    solo = Engine(model, tok).generate(["x = 1"], params)[0].tokens
    fast, sync = engines(model, tok, max_batch=2)
    requests = [("import os", params), ("def f(", params)]
    for engine in (fast, sync):
        for prompt, p in requests:
            engine.add_request(prompt, p)
    expected = [sync.step() for _ in range(3)]
    forward, calls = model.forward_packed, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:  # the fourth forward: issued ahead, in the third step call
            raise RuntimeError("out of memory")
        return forward(*args)

    monkeypatch.setattr(model, "forward_packed", failing)
    got = [fast.step() for _ in range(3)]
    assert got == expected and len(calls) == 4
    with pytest.raises(RuntimeError, match="out of memory"):
        fast.step()
    failed = fast.fail_step("RuntimeError: out of memory")
    assert sorted(o.request_id for o in failed) == ["req-0", "req-1"]
    assert all(o.finish_reason == "error" for o in failed)
    monkeypatch.setattr(model, "forward_packed", forward)
    fast.add_request("x = 1", params, "req-2")
    assert tokens_by_request(run_to_end(fast)) == {"req-2": solo}
    assert fast.cache.free_pages == fast.cache.usable_pages


def test_the_failure_of_a_step_planned_ahead_dies_with_its_requests(demo, monkeypatch) -> None:
    """Requests aborted after the step planned ahead of them failed to issue take that failure with them: the
    next request is served, not failed by it."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    solo = Engine(model, tok).generate(["x = 1"], params)[0].tokens
    engine = Engine(model, tok, EngineConfig(max_batch=2, async_scheduling=True))
    for i, prompt in enumerate(["import os", "def f("]):
        engine.add_request(prompt, params, f"r{i}")
    forward, calls = model.forward_packed, []

    def failing_ahead(*args):
        calls.append(1)
        if len(calls) == 2:  # the first step planned ahead
            raise RuntimeError("out of memory")
        return forward(*args)

    monkeypatch.setattr(model, "forward_packed", failing_ahead)
    assert len(engine.step()) == 2 and engine._ahead_error is not None
    assert engine.abort("r0").finish_reason == engine.abort("r1").finish_reason == "abort"
    assert engine._ahead_error is None
    monkeypatch.setattr(model, "forward_packed", forward)
    engine.add_request("x = 1", params, "r2")
    assert tokens_by_request(run_to_end(engine)) == {"r2": solo}


def test_pages_filled_by_steps_planned_ahead_are_found_by_later_prompts(demo) -> None:
    """A step planned ahead cannot register the page it fills in the prefix cache when it is planned (its token is
    not known yet): the page is registered when the token is. A chat's next turn, its prompt the first turn and
    its answer, then finds as many cached tokens as without async scheduling, and gets the same tokens."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    found = []
    for engine in engines(model, tok, max_batch=4, page_size=4):
        first = engine.generate(["def fibonacci(n):"], params)[0]
        turn = first.prompt_tokens + first.tokens + engine.encode(" return")
        rid = engine.add_request(turn, params)
        outputs = [out for _ in range(30) for out in engine.step() if out.request_id == rid]
        found.append((outputs[-1].cached_tokens, [t for out in outputs for t in out.token_ids]))
    assert found[0] == found[1]
    assert found[0][0] == 4 * ((len(turn) - 1) // 4)  # every full page but the one of its last token


def test_the_slot_a_step_planned_ahead_wrote_is_zeroed_for_the_next_owner(demo) -> None:
    """A request that an EOS ends while a step runs ahead for it had that step write one more token's K/V (the
    EOS's) on its pages. When they are handed out again, that slot is zeroed with the others its owner wrote, so
    no masked read of a later request can meet what it left (as `test_engine`'s stale-NaN test requires)."""
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=4, page_size=16, prefix_caching=False, async_scheduling=True))
    prompt, params = ending_requests(engine)[0]  # alone: no later request takes its pages before the check
    engine.add_request(prompt, params, "r0")
    ended = engine._requests["r0"]  # the first ending_requests(): ended by its EOS id
    while engine.has_work():
        engine.step()
    assert ended.computed == len(ended.tokens) + 1  # the EOS's K/V written by the step planned ahead
    cache = engine.cache
    pages = cache.allocate(cache.free_pages * cache.page_size)
    cache.clear_stale()
    for layer, k in enumerate(cache.k):
        slots = torch.tensor(cache.slots(pages[cache.group_of[layer]], 0, len(pages[0]) * cache.page_size))
        for pool in (k, cache.v[layer]):
            assert not pool.view(-1, *pool.shape[2:])[slots].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_planning_ahead_never_waits_for_the_gpu() -> None:
    """On CUDA (CUDA graphs, greedy and seeded rows, one with top-k, one with penalties and log-probabilities): issuing
    a step ahead synchronizes nothing (torch's sync debug mode raises on any wait for the device), nearly every
    decode step runs ahead, and the tokens equal the synchronous engine's."""
    model, tok = load_model(PARENT_DIR, device="cuda"), load_tokenizer(PARENT_DIR)
    prompts = prompts_of([3, 17, 40, 9, 1], 8192, seed=5)
    params = [SamplingParams(20, temperature=i % 2, seed=i, ignore_eos=True) for i in range(len(prompts))]
    params[3] = replace(params[3], frequency_penalty=0.5, repetition_penalty=1.2, logprobs=2)  # all on the device
    params[1] = replace(params[1], top_k=20)  # a top-k cut (not top-p: its width is read from the logits)
    results = {}
    for async_scheduling in (True, False):
        engine = Engine(model, tok, EngineConfig(max_batch=8, async_scheduling=async_scheduling))
        assert engine.graphs is not None
        run_ahead = engine._run_ahead

        def strict(launched, run_ahead=run_ahead):
            torch.cuda.set_sync_debug_mode("error")
            try:
                run_ahead(launched)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        engine._run_ahead = strict
        ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
        results[async_scheduling] = ([tokens[i] for i in ids], engine.steps_ahead)
    assert results[True][0] == results[False][0]
    assert results[True][1] >= 18 and results[False][1] == 0
