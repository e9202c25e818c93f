"""Prefix caching (runtime/cache.py): page hashes against a brute-force prefix comparison, the pool's bookkeeping
(shared pages, registered pages freed and evicted tail first), and the engine computing only what follows a
cached prefix while every request keeps the tokens of an engine without the cache.

References: greedy decoding by a whole uncached forward per token (test_engine.greedy_by_full_forward: no KV
cache at all), and an engine with prefix caching off for seeded sampling and preemption.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from tessera.benchmarks.bench_prefix import windowed
from tessera.demo import PARENT_DIR
from tessera.runtime.cache import PagedKVCache, page_hashes
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.loader import load_model
from tessera.runtime.sampling import SamplingParams, load_tokenizer

from .test_engine import greedy_by_full_forward, prompts_of, served_under_pressure

PAGE = 4


@pytest.fixture(scope="module")
def demo():
    return load_model(PARENT_DIR), load_tokenizer(PARENT_DIR)


def forwarded_tokens(engine: Engine, monkeypatch) -> list[int]:
    """Record how many tokens each forward pass of `engine` computes (until the test ends)."""
    counts, forward = [], engine.model.forward_packed

    def counting(tokens, batch):
        counts.append(tokens.shape[0])
        return forward(tokens, batch)

    monkeypatch.setattr(engine.model, "forward_packed", counting)
    return counts


def test_page_hashes_are_equal_exactly_where_the_prefixes_are() -> None:
    """Page i's hash stands for every token up to its end: brute force over random pairs of sequences sharing
    a random number of first tokens, including pairs whose page i is the same but an earlier page differs."""
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        shared = rng.randrange(len(a) + 1)
        b = a[:shared] + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.3 and len(b) > PAGE:  # only the first page differs
            b[0] = (b[0] + 1) % 50
        ha = page_hashes(a, PAGE, [], len(a) // PAGE)
        hb = page_hashes(b, PAGE, [], len(b) // PAGE)
        for i in range(min(len(ha), len(hb))):
            assert (ha[i] == hb[i]) == (a[: (i + 1) * PAGE] == b[: (i + 1) * PAGE])
    # Extending the known hashes gives those computed at once.
    tokens = list(range(30))
    assert page_hashes(tokens, PAGE, page_hashes(tokens, PAGE, [], 3), 7) == page_hashes(tokens, PAGE, [], 7)


def test_the_pool_shares_registered_pages_and_evicts_the_tail_first(demo) -> None:
    model, _ = demo
    cache = PagedKVCache(model.arch, 9, PAGE, prefix_caching=True)  # 8 usable pages
    tokens = list(range(100, 120))  # 5 full pages
    hashes = page_hashes(tokens, PAGE, [], 5)
    a = cache.allocate(20)
    for page, h in zip(a[0], hashes):
        cache.register(0, page, h)
    b = [[]]
    cache.share(b, cache.lookup([*hashes[:3], b"not cached", *hashes[4:]]))  # the prefix up to the first miss
    assert b[0] == a[0][:3] and cache.free_pages == 3
    cache.release(a, 20)
    assert cache.free_pages == 5  # the 2 pages only `a` held are free, registered; b's 3 are still owned
    cache.release(b, 12)
    assert cache.free_pages == 8 and cache.lookup(hashes) == a
    # 3 free pages without K/V worth keeping first, then registered ones: `a`'s last pages go first.
    c = cache.allocate(4 * PAGE)
    assert set(c[0][:3]).isdisjoint(a[0]) and c[0][3] == a[0][4]
    assert cache.lookup(hashes) == [a[0][:4]]
    cache.extend(c, 6 * PAGE)
    assert cache.lookup(hashes) == [a[0][:2]] and cache.free_pages == 2
    # A registered page handed out again loses its K/V (zeroed before the step reads it).
    layer = next(i for i, k in enumerate(cache.k) if k is not None)
    cache.k[layer][a[0][1]] = float("nan")
    d = cache.allocate(2 * PAGE)
    assert d[0] == [a[0][1], a[0][0]] and not cache.k[layer][a[0][1]].isnan().any()
    assert cache.lookup(hashes) == [[]] and cache.free_pages == 0


def test_a_shared_prefix_is_computed_once(demo, monkeypatch) -> None:
    """Two prompts with the same 37 first tokens: the second computes only its tokens past the 9 pages of 4
    they share, and both get the greedy tokens of a forward without any cache; its usage reports them cached."""
    model, tok = demo
    system = prompts_of([37], 8192, seed=1)[0]
    first, second = (system + p for p in prompts_of([5, 11], 8192, seed=2))
    engine = Engine(model, tok, EngineConfig(max_batch=4, page_size=PAGE))
    counts = forwarded_tokens(engine, monkeypatch)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    [a] = engine.generate([first], params)
    counts.clear()
    request = engine.add_request(second, params)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert counts[0] == len(second) - 36 and engine.prefix_hits == 36
    assert outputs[-1].request_id == request and outputs[-1].cached_tokens == 36
    tokens = [t for out in outputs for t in out.token_ids]
    assert a.tokens == greedy_by_full_forward(model, first, 6)
    assert tokens == greedy_by_full_forward(model, second, 6)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_prompt_cached_whole_computes_its_last_token(request, sampling, monkeypatch) -> None:
    """The same prompt of 8 pages again: 7 pages come from the cache, the last is computed for its logits, and
    the tokens are those of an engine without prefix caching (greedy in float32; seeded in float64, as the cached
    and uncached prefills round differently and a seeded draw of this test's lies 2.8e-6 from a CDF boundary)."""
    model, tok = request.getfixturevalue("demo" if sampling == "greedy" else "demo_float64")
    prompt = prompts_of([8 * PAGE], 8192, seed=3)[0]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=0.0 if sampling == "greedy" else 1.0, seed=5)
    config = EngineConfig(max_batch=2, page_size=PAGE)
    expected = Engine(model, tok, replace(config, prefix_caching=False)).generate([prompt], params)[0].tokens
    engine = Engine(model, tok, config)
    counts = forwarded_tokens(engine, monkeypatch)
    assert engine.generate([prompt], params)[0].tokens == expected
    counts.clear()
    assert engine.generate([prompt], params)[0].tokens == expected
    assert counts[0] == PAGE and engine.prefix_hits == 7 * PAGE


def test_evicted_pages_serve_other_prompts_and_miss_after(demo) -> None:
    """A pool of 8 pages: a prompt's pages stay cached after it ends; a longer other prompt needs them all, so
    they are evicted and zeroed (NaN written there first never reaches it); the first prompt then misses and
    is computed again. Every request keeps its uncached greedy tokens."""
    model, tok = demo
    page_bytes = PagedKVCache.page_bytes(model.arch, PAGE, torch.float32)
    engine = Engine(model, tok, EngineConfig(max_batch=2, page_size=PAGE, kv_cache_bytes=8 * page_bytes))
    short, long = prompts_of([17, 29], 8192, seed=4)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    assert engine.generate([short], params)[0].tokens == greedy_by_full_forward(model, short, 3)
    cached = list(engine.cache.groups[0].evictable)
    assert len(cached) == 4 and engine.cache.free_pages == 8  # 19 computed tokens: 4 full pages, all free
    for pool in (*engine.cache.k, *engine.cache.v):
        if pool is not None:
            pool[cached] = float("nan")
    assert engine.generate([long], params)[0].tokens == greedy_by_full_forward(model, long, 3)
    assert engine.prefix_hits == 0
    assert engine.generate([short], params)[0].tokens == greedy_by_full_forward(model, short, 3)
    assert engine.prefix_hits == 0  # its pages went to the long prompt


def test_a_preempted_request_resumes_from_its_own_cached_pages(demo) -> None:
    """7 pages of 16: a short request and a long one run until the short one needs a page the pool lacks. The
    long one, the newest, is preempted; its last page (not full, so not registered) serves the short one, and
    when it starts again it finds its full pages still cached. Both keep the tokens of a roomy engine."""
    model, tok = demo
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, torch.float32)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = prompts_of([10, 50], 8192, seed=2)
    roomy = Engine(model, tok, EngineConfig(max_batch=8, page_size=16))
    expected = [c.tokens for c in roomy.generate(prompts, params)]
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_cache_bytes=7 * page_bytes, page_size=16))
    tokens, most_running = served_under_pressure(engine, prompts, params)
    assert tokens == expected and most_running == 2 and engine.preemptions == 1
    assert engine.prefix_hits >= 48  # its prompt's 3 full pages at least


def test_cached_tokens_are_those_found_at_the_first_start(demo) -> None:
    """The usage's cached tokens are the prompt tokens a request found cached when it first started: none for a
    fresh prompt, even when a preemption had it find its own pages on restarting."""
    model, tok = demo
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, torch.float32)
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_cache_bytes=7 * page_bytes, page_size=16))
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=40, ignore_eos=True))
        for p in prompts_of([10, 50], 8192, seed=2)
    ]
    finals = {}
    while engine.has_work():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    assert engine.preemptions == 1 and engine.prefix_hits >= 48
    assert [finals[i].cached_tokens for i in ids] == [0, 0]


def test_requests_starting_in_one_step_share_the_pages_it_fills(demo, monkeypatch) -> None:
    """Prompts submitted together with the same 23 first tokens, and the first prompt again (parallel choices):
    the first (29 tokens) fills 7 pages of 4, which the others, in the same step, read as the step writes them:
    the second its 5 shared pages (20 tokens), the copy all 7 but its last token's. Every request gets the
    greedy tokens of an uncached forward."""
    model, tok = demo
    system = prompts_of([23], 8192, seed=6)[0]
    prompts = [system + p for p in prompts_of([6, 9], 8192, seed=7)]
    prompts.append(prompts[0])
    engine = Engine(model, tok, EngineConfig(max_batch=4, page_size=PAGE))
    counts = forwarded_tokens(engine, monkeypatch)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(prompts[0]) == 29 and counts[0] == 29 + (len(prompts[1]) - 20) + 1 and engine.prefix_hits == 20 + 28
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == greedy_by_full_forward(model, prompt, 4)


def test_a_failed_step_leaves_no_page_findable(demo, monkeypatch) -> None:
    """Pages are registered when a step is planned: a step whose forward raises forgets them (their K/V were
    never written), as a request whose sampling fails forgets its own. The same prompt served afterwards finds
    nothing cached and gets the greedy tokens of an uncached forward."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    prompt, params = prompts_of([30], 8192, seed=8)[0], SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = greedy_by_full_forward(model, prompt, 3)
    engine = Engine(model, tok, EngineConfig(max_batch=2, page_size=PAGE))
    forward = model.forward_packed
    monkeypatch.setattr(model, "forward_packed", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):  # offline: the call's requests are aborted
        engine.generate([prompt], params)
    monkeypatch.setattr(model, "forward_packed", forward)
    assert not engine.cache.groups[0].by_hash and engine.cache.free_pages == engine.cache.usable_pages
    assert engine.generate([prompt], params)[0].tokens == expected and engine.prefix_hits == 0
    # NaN logits (a sampled request: greedy rows take their argmax whatever it is): the request ends with an error
    # and its pages are forgotten.
    real_sample = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", lambda logits, p, u: real_sample(logits.fill_(float("nan")), p, u))
    other = prompts_of([30], 8192, seed=9)[0]
    request = engine.add_request(other, SamplingParams(max_new_tokens=3, temperature=0.8, seed=1))
    outputs = [out for out in engine.step() if out.request_id == request]
    assert outputs[0].finish_reason == "error" and engine.cache.lookup(page_hashes(other, PAGE, [], 7)) == [[]]
    assert engine.cache.lookup(page_hashes(prompt, PAGE, [], 7)) != [[]]  # the good prompt's pages stay cached


def test_no_prefix_caching_when_asked(demo) -> None:
    model, tok = demo
    prompt = prompts_of([20], 8192, seed=5)[0]
    engine = Engine(model, tok, EngineConfig(page_size=PAGE, prefix_caching=False))
    engine.generate([prompt, prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert not engine.cache.prefix_caching and engine.prefix_hits == 0


def test_a_window_reads_its_last_pages_from_the_prefix_cache(demo) -> None:
    """Layers of a window of 8 (2 pages of 4) beside full attention: a sequence growing a page at a time holds at
    most its window_pages, 5, of the windowed group, giving the oldest back, registered, as it takes a new one. A
    prefix counts as cached when the full-attention group holds all its pages and the windowed group the pages
    the next query reads; the windowed group's entries before those are 0, nothing shared."""
    model, _ = demo
    cache = PagedKVCache(windowed(model, 8, (0, 3)).arch, 41, PAGE, step_tokens=8, prefix_caching=True)
    full, window = cache.groups
    assert (full.window, window.window, window.window_pages) == (None, 8, 5)
    hashes = page_hashes(list(range(100, 140)), PAGE, [], 10)  # 10 full pages
    a, window_pages = [[], []], []
    for i in range(10):
        assert cache.extend(a, (i + 1) * PAGE)
        assert cache.register(0, a[0][i], hashes[i]) and cache.register(1, a[1][i], hashes[i])
        window_pages.append(a[1][i])
    assert full.held(a[0]) == 10 and window.held(a[1]) == 5 and a[1] == [0] * 5 + window_pages[5:]
    assert window.available == 40 - 5 and list(window.evictable) == window_pages[:5]  # given back, findable
    # 10 pages: the next query (position 40) reads keys 33-40, on pages 8 and 9.
    assert cache.lookup(hashes) == [a[0], [0] * 8 + window_pages[8:]]
    # 6 pages: keys 17-24, on pages 4 and 5: page 4 went back but is still cached.
    hits = cache.lookup(hashes[:6])
    assert hits == [a[0][:6], [0] * 4 + window_pages[4:6]]
    b = [[], []]
    cache.share(b, hits)
    assert b == hits and window.refs[window_pages[4]] == 1 and window_pages[4] not in window.evictable
    # Without page 4 of the windowed group (forgotten, as a failed step forgets its pages), a 6-page prefix is not
    # cached, nor a 5-page one (keys 13-20: pages 3 and 4); a 4-page one is (keys 9-16: pages 2 and 3).
    cache.release(b, 6 * PAGE)
    cache.forget([(1, window_pages[4])])
    assert cache.lookup(hashes[:6]) == [a[0][:4], [0] * 2 + window_pages[2:4]]
    assert cache.lookup(hashes) == [a[0], [0] * 8 + window_pages[8:]]
    # A failed sequence forgets the pages it gave back too, not only those it holds: nothing of it is found.
    cache.forget_unshared(a, hashes)
    assert cache.lookup(hashes) == [[], []] and not window.by_hash and not full.by_hash


def test_prefix_caching_with_a_window_gives_the_uncached_greedy_tokens(demo) -> None:
    """A model with two layers of a window of 8 tokens and 8-token steps (5 window_pages of 4 tokens: a 42-token
    prompt gives pages back as its chunks go): a second prompt sharing the first's 37 first tokens finds their 9
    full pages cached (the windowed layers' last two of them), and both get the greedy tokens of whole uncached
    forwards, as does a rerun of the first, which finds its own 10 pages."""
    model, tok = demo
    m = windowed(model, 8, (1, 4))
    system = prompts_of([37], 8192, seed=20)[0]
    first, second = (system + p for p in prompts_of([5, 11], 8192, seed=21))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = Engine(m, tok, EngineConfig(max_batch=4, page_size=PAGE, max_step_tokens=8))
    assert engine.cache.prefix_caching and engine.cache.groups[1].window_pages == 5
    expected = [greedy_by_full_forward(m, p, 6) for p in (first, second)]
    assert engine.generate([first], params)[0].tokens == expected[0]
    assert engine.generate([second], params)[0].tokens == expected[1] and engine.prefix_hits == 36
    assert engine.generate([first], params)[0].tokens == expected[0] and engine.prefix_hits == 36 + 40


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")],
        ),
    ],
)
def test_prefix_caching_gives_the_uncached_greedy_tokens(device) -> None:
    """Three prompts sharing 40 first tokens, submitted together, then again, in pages of 16 (on CUDA: float32,
    the Triton kernels, decode replayed from CUDA graphs): in the first call the later two read the first's 2 full
    pages as their step writes them; in the second every prompt finds its own pages (all but its last token's).
    Every completion is the greedy one of whole uncached forwards."""
    model, tok = load_model(PARENT_DIR, device=device), load_tokenizer(PARENT_DIR)
    system = prompts_of([40], 8192, seed=10)[0]
    prompts = [system + p for p in prompts_of([3, 17, 9], 8192, seed=11)]  # 43, 57 and 49 tokens
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(max_batch=8, page_size=16))
    expected = [greedy_by_full_forward(model, p, 12) for p in prompts]
    assert [c.tokens for c in engine.generate(prompts, params)] == expected
    assert engine.prefix_hits == 2 * 32
    assert [c.tokens for c in engine.generate(prompts, params)] == expected
    assert engine.prefix_hits == 2 * 32 + 32 + 48 + 48


def test_a_failed_request_leaves_the_pages_it_shares_findable(demo, monkeypatch) -> None:
    """Two requests started together share their first 5 pages; the sampled one fails (NaN logits) while the
    greedy one goes on. Only the pages the failed request held alone are forgotten: the greedy one's pages,
    shared ones included, stay findable, and its tokens are the uncached greedy ones."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    system = prompts_of([20], 8192, seed=12)[0]
    good, bad = (system + p for p in prompts_of([7, 9], 8192, seed=13))
    real_sample = engine_module.sample

    def sample(logits, params, uniforms):
        for row, p in enumerate(params):
            if p.temperature > 0:
                logits[row] = float("nan")
        return real_sample(logits, params, uniforms)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine = Engine(model, tok, EngineConfig(max_batch=2, page_size=PAGE))
    ids = [
        engine.add_request(good, SamplingParams(max_new_tokens=6, ignore_eos=True)),
        engine.add_request(bad, SamplingParams(max_new_tokens=6, temperature=0.8, seed=1)),
    ]
    outputs = {i: [] for i in ids}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert outputs[ids[1]][-1].finish_reason == "error" and engine.prefix_hits == 20
    assert [t for o in outputs[ids[0]] for t in o.token_ids] == greedy_by_full_forward(model, good, 6)
    tokens = good + [t for o in outputs[ids[0]] for t in o.token_ids]
    (found,) = engine.cache.lookup(page_hashes(tokens, PAGE, [], (len(good) + 5) // PAGE))
    assert len(found) == (len(good) + 5) // PAGE
    assert engine.cache.lookup(page_hashes(bad, PAGE, [], len(bad) // PAGE)) == engine.cache.lookup(
        page_hashes(system, PAGE, [], 5)
    )
