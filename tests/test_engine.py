"""The continuous-batching engine: paged chunked prefill against transformers, batch invariance, sampling,
stop handling, admission control and the KV pool, abort, and the padded decode step of the CUDA graphs.

References: transformers' LlamaForCausalLM (logits of the whole sequence in one forward, no cache) for the
paged forward; greedy decoding by a whole uncached forward per token (tessera's training/scoring forward: the
varlen prefill attention, no KV cache) for the heterogeneous nemotron-nas model transformers cannot load.
The pool's layouts are both tested: 16-token (or smaller) pages, as on the GPU, and one page of a whole
context per request, the CPU default.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tessera.demo import PARENT_DIR
from tessera.errors import UserError
from tessera.kernels import cpu_layout
from tessera.runtime.cache import PagedKVCache
from tessera.runtime.engine import CapacityError, DecodeGraphs, Engine, EngineConfig
from tessera.runtime.loader import load_model
from tessera.runtime.sampling import ContextLengthError, SamplingParams, TextStream, load_tokenizer

from .conftest import PAGE_SIZES, relative_error, tokens_per_page


@pytest.fixture(scope="module")
def demo():
    return load_model(PARENT_DIR), load_tokenizer(PARENT_DIR)


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a whole forward of everything so far (no KV cache at all)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(model(torch.tensor([tokens], device=model.embed_tokens.weight.device))[0, -1].argmax().item())
    return tokens[len(prompt) :]


@pytest.mark.parametrize(
    ("page_size", "layout"),
    [
        *(pytest.param(*p.values, None, id=p.id) for p in PAGE_SIZES),
        pytest.param(4, cpu_layout.Layout(True, False), id="pages-transposed-weights"),
        pytest.param(4, cpu_layout.Layout(False, True), id="pages-packed-weights"),
    ],
)
def test_paged_chunked_prefill_and_decode_match_transformers(llama_untied, monkeypatch, page_size, layout) -> None:
    """Every logits row the engine samples from equals transformers' logits at that position, for prompts
    prefilled in chunks of 7 tokens across steps while others decode (fp32, within 1e-5). Pages of 4 tokens
    (gathered) and a whole-context page per request (read in place) alike; and with every matrix the engine lays
    out (kernels/cpu_layout.py) stored transposed, or multiplied through oneDNN-packed twins, as a CPU whose BLAS
    reads those layouts faster gets them."""
    from transformers import LlamaForCausalLM

    if layout is not None and layout.packed and not cpu_layout.packing_works(torch.float32):
        pytest.skip("this torch build or CPU cannot pack float32 matrices (oneDNN)")
    hf = LlamaForCausalLM.from_pretrained(llama_untied, dtype=torch.float32).eval()
    model = load_model(llama_untied)
    if layout is not None:  # the test model's matrices are too small to be measured: force the choice
        monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: layout)
    engine = Engine(
        model, config=EngineConfig(max_batch=3, max_step_tokens=7, page_size=tokens_per_page(page_size, model))
    )
    assert engine.cache.page_size == (4 if page_size == 4 else engine.max_model_len)
    matrices = [getattr(m, n) for m in model.modules() for n in getattr(m, "matrices", ())]
    transposed, packed = layout or (False, False)
    assert all(cpu_layout.is_transposed(w) == transposed for w in [*matrices, model.lm_head_weight])
    assert engine.cpu_twins == (len(matrices) + 1 if packed else 0)
    dense = []  # F.linear calls inside the engine's steps: none where every matrix has a packed twin
    f_linear = cpu_layout.F.linear
    monkeypatch.setattr(cpu_layout.F, "linear", lambda *a: dense.append(1) or f_linear(*a))
    recorded: list[torch.Tensor] = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: recorded.append(out := logits(h)) or out)
    prompts = prompts_of([19, 3, 30, 1], 97)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert (len(dense) == 0) == packed  # the steps multiplied through the twins alone
    rows = torch.cat(recorded)
    assert rows.shape[0] == 4 * 6  # one row per sampled token
    # Rebuild which row belongs to which sequence position by replaying the tokens through transformers.
    expected = {}
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            full = torch.tensor([p + c.tokens])
            hf_logits = hf(full).logits[0]
            for i in range(len(c.tokens)):
                expected[(tuple(p), i)] = hf_logits[len(p) - 1 + i]
    # Each sampled token is the argmax of its row; match rows to (prompt, index) through the token itself.
    matched = 0
    for p, c in zip(prompts, completions):
        for i, token in enumerate(c.tokens):
            ref = expected[(tuple(p), i)]
            errors = [relative_error(r, ref) for r in rows if r.argmax().item() == token]
            assert min(errors) <= 1e-5
            matched += 1
    assert matched == 24
    for p, c in zip(prompts, completions):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert c.tokens == out[0, len(p) :].tolist()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_heterogeneous_model_matches_uncached_greedy(nas_checkpoint, page_size) -> None:
    """Linear and no-op attention layers hold no pages and nothing breaks around them: greedy outputs of
    the nemotron-nas test model (4/2/1 KV heads) served 2 at a time with chunked prefill equal greedy decoding
    by whole uncached forwards."""
    model = load_model(nas_checkpoint)
    engine = Engine(
        model, config=EngineConfig(max_batch=2, max_step_tokens=8, page_size=tokens_per_page(page_size, model))
    )
    assert [k is None for k in engine.cache.k] == [b.attention.kind != "gqa" for b in model.arch.blocks]
    kv_heads = [k.shape[2] for k in engine.cache.k if k is not None]
    assert kv_heads == [b.attention.n_kv_heads for b in model.arch.blocks if b.attention.kind == "gqa"]
    page_bytes = PagedKVCache.page_bytes(model.arch, engine.cache.page_size, torch.float32)
    (group,) = engine.cache.groups  # no windows: one page space for every layer
    assert engine.cache.nbytes() == group.num_pages * page_bytes
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompts = prompts_of([5, 21, 2, 13], 101, seed=1)
    expected = [greedy_by_full_forward(model, p, 10) for p in prompts]
    assert [c.tokens for c in engine.generate(prompts, params)] == expected


def test_mixed_step_metadata_counts_its_leading_decodes(demo, monkeypatch) -> None:
    """A step of 2 decodes and a prompt chunk tells attention that its first 2 sequences have one query each
    (kernels.attention_paged gives them a split launch of their own beside a long chunk); a decode-only step, all."""
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=3, max_step_tokens=8))
    seen: list[tuple[list[int], int]] = []
    forward = model.forward_packed

    def spy(tokens, batch, *args):
        meta = batch.attention[0]
        seen.append((torch.diff(meta.cu_seqlens).tolist(), meta.decode_prefix))
        return forward(tokens, batch, *args)

    monkeypatch.setattr(model, "forward_packed", spy)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    engine.add_request([5, 6, 7], params)
    engine.add_request([8, 9], params)
    engine.step()  # both prompts
    engine.add_request(list(range(10, 40)), params)
    engine.step()  # 2 decodes and 6 of the 30
    engine.step()  # 2 decodes and 6 more
    assert seen == [([3, 2], 0), ([1, 1, 6], 2), ([1, 1, 6], 2)]
    while engine.has_work():
        engine.step()
    assert all(prefix == len(q_lens) for q_lens, prefix in seen if max(q_lens) == 1)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_greedy_in_a_busy_batch_equals_alone(demo, page_size) -> None:
    """Requests join a batch mid-flight (added between steps), some prefilled in chunks beside decodes."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=24)
    texts = ["def main(argv):\n", "import os\n", "class Node:\n    def __init__(self, value):\n", "for i in range("]
    alone = [Engine(model, tok).generate([t], params)[0] for t in texts]
    engine = Engine(
        model, tok, EngineConfig(max_batch=4, max_step_tokens=8, page_size=tokens_per_page(page_size, model))
    )
    ids = {}
    outputs = {}
    for step in range(10_000):
        if step % 3 == 0 and len(ids) < len(texts):
            t = texts[len(ids)]
            ids[engine.add_request(t, params)] = t
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        if len(ids) == len(texts) and not engine.has_work():
            break
    for request_id, t in ids.items():
        assert outputs[request_id] == alone[texts.index(t)].tokens


def test_seeded_sampling_is_batch_invariant(demo) -> None:
    model, tok = demo
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    alone = Engine(model, tok).generate(["import "], sampled)[0].tokens
    crowd = Engine(model, tok).generate(["x = ", "import ", "def f("], sampled)
    assert crowd[1].tokens == alone
    other = Engine(model, tok).generate(["import "], SamplingParams(16, 0.9, 50, 0.9, seed=8))[0].tokens
    assert other != alone
    greedy = Engine(model, tok).generate(["import "], SamplingParams(max_new_tokens=16))[0].tokens
    assert Engine(model, tok).generate(["import "], SamplingParams(16, 1.0, top_k=1, seed=3))[0].tokens == greedy


def run_to_end(engine: Engine) -> dict[str, list]:
    """Step until idle; every request's outputs by id."""
    outputs: dict[str, list] = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_a_request_that_cannot_sample_ends_alone(demo, monkeypatch) -> None:
    """A sampling failure (here NaN logits for one request) ends that request with an error; the greedy and
    sampled requests beside it finish with their solo outputs."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    greedy, sampled = SamplingParams(max_new_tokens=12), SamplingParams(12, 0.8, seed=3)
    solo_greedy = Engine(model, tok).generate(["import os"], greedy)[0].tokens
    solo_sampled = Engine(model, tok).generate(["def f("], sampled)[0].tokens
    real_sample = engine_module.sample

    def sample(logits, params, uniforms):
        for row, p in enumerate(params):  # the row of the seed-4 request
            if p.seed == 4:
                logits[row] = float("nan")
        return real_sample(logits, params, uniforms)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine = Engine(model, tok, EngineConfig(max_batch=4))
    ids = [
        engine.add_request("import os", greedy),
        engine.add_request("x = 1", SamplingParams(12, 0.8, seed=4)),
        engine.add_request("def f(", sampled),
    ]
    outputs = run_to_end(engine)
    bad = outputs[ids[1]][-1]
    assert bad.finish_reason == "error" and "sampling failed" in bad.error and bad.token_ids == []
    assert [t for o in outputs[ids[0]] for t in o.token_ids] == solo_greedy
    assert [t for o in outputs[ids[2]] for t in o.token_ids] == solo_sampled
    assert engine.cache.free_pages == engine.cache.usable_pages


def test_a_failed_forward_ends_the_requests_of_its_step_only(demo, monkeypatch) -> None:
    """A forward pass that raises is the failure of the requests in that step: `fail_step` ends them and frees
    their pages; a request still waiting for a batch slot is then served as if nothing happened."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=8)
    solo = Engine(model, tok).generate(["x = 1"], params)[0].tokens
    engine = Engine(model, tok, EngineConfig(max_batch=2))
    running = [engine.add_request("import os", params), engine.add_request("def f(", params)]
    waiting = engine.add_request("x = 1", params)
    engine.step()
    forward = model.forward_packed
    monkeypatch.setattr(model, "forward_packed", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    failed = engine.fail_step("RuntimeError: out of memory")
    assert sorted(o.request_id for o in failed) == sorted(running)
    assert all(o.finish_reason == "error" and o.error == "RuntimeError: out of memory" for o in failed)
    monkeypatch.setattr(model, "forward_packed", forward)
    outputs = run_to_end(engine)
    assert [t for o in outputs[waiting] for t in o.token_ids] == solo
    assert engine.cache.free_pages == engine.cache.usable_pages


def test_stop_strings_eos_and_length(demo) -> None:
    model, tok = demo
    engine = Engine(model, tok)
    free = engine.generate(["def fibonacci(n):"], SamplingParams(max_new_tokens=30))[0]
    assert free.finish_reason == "length" and len(free.tokens) == 30
    stop = free.text[10:14]
    cut = engine.generate(["def fibonacci(n):"], SamplingParams(max_new_tokens=30, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    eos = free.tokens[5]
    ended = engine.generate(["def fibonacci(n):"], SamplingParams(max_new_tokens=30, stop_token_ids=(eos,)))[0]
    assert ended.finish_reason == "stop" and ended.tokens == free.tokens[: free.tokens.index(eos)]


def test_text_stream_holds_back_possible_stop_strings_and_split_characters(demo) -> None:
    _, tok = demo
    text = "naïve café → done; END here"
    ids = tok.encode(text).ids
    stream = TextStream(tok, ("END",))
    deltas, stopped = [], False
    for t in ids:
        delta, stopped = stream.add(t)
        deltas.append(delta)
        assert "\ufffd" not in delta  # a character split across byte-level tokens is never sent half
        if stopped:
            break
    assert stopped and "".join(deltas) == "naïve café → done; "
    assert not any("E" in d for d in deltas)  # the partial "E", "EN" were held back, then cut
    plain = TextStream(tok)
    assert "".join(plain.add(t)[0] for t in ids) + plain.flush()[0] == text


def served_under_pressure(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, int]:
    """Each prompt's generated tokens through `engine`, and the most requests that ran at once; checks after
    every step that the pages the running requests hold and the free ones add up to the pool."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    most_running = 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        most_running = max(most_running, len(engine.running))
        held = len({p for r in engine.running for p in r.pages[0]})  # shared prefix pages once
        assert held + engine.cache.free_pages == engine.cache.usable_pages
    return [tokens[i] for i in ids], most_running


@pytest.mark.parametrize("sampling", ["greedy", "seeded", "penalized"])
def test_pages_are_taken_as_requests_grow_and_the_newest_is_preempted(request, sampling) -> None:
    """6 usable pages of 16 tokens: five requests of 10 prompt + 30 new tokens hold 3 pages each at their
    longest, so reserving that up front ran 2 at once. Taking pages as they grow, 3 start (a page to spare for
    each, `Engine._can_start`); at the 33rd token the pool runs dry and the newest is preempted, to be prefilled
    again later with what it generated. Every request's tokens equal those of an engine with pages to spare, in
    greedy and in seeded sampling (the preempted one samples on from its own stream)."""
    # Sampled draws compared across rounding paths in float64 (conftest's `demo_float64`); greedy in the served float32.
    model, tok = request.getfixturevalue("demo" if sampling == "greedy" else "demo_float64")
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, model.embed_tokens.weight.dtype)
    temperature = 0.0 if sampling == "greedy" else 1.0
    # Penalized: each request's counts kept in its batch row, filled again when a restart gives it another.
    penalties = {"frequency_penalty": 0.7, "repetition_penalty": 1.3} if sampling == "penalized" else {}
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=temperature, seed=7, **penalties)
    prompts = prompts_of([10] * 5, 8192, seed=2)
    roomy = Engine(model, tok, EngineConfig(max_batch=8, page_size=16))
    expected = [c.tokens for c in roomy.generate(prompts, params)]
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_cache_bytes=6 * page_bytes, page_size=16))
    tokens, most_running = served_under_pressure(engine, prompts, params)
    assert most_running == 3 and engine.preemptions > 0 and roomy.preemptions == 0
    assert tokens == expected and engine.cache.free_pages == 6


def test_requests_without_max_tokens_hold_the_pages_of_their_tokens(demo) -> None:
    """A request that leaves its length to the context (a chat without max_tokens) used to hold a whole
    context's pages from its start: a pool of one context ran one at a time. Now four start together, and all
    four finish with the tokens they get where pages are plenty, however often the pool runs dry on the way."""
    model, tok = demo
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, torch.float32)
    prompts, params = prompts_of([10, 7, 12, 9], 8192, seed=9), SamplingParams(max_new_tokens=None)
    config = EngineConfig(max_batch=4, max_model_len=128, page_size=16)
    expected = [c.tokens for c in Engine(model, tok, config).generate(prompts, params)]
    engine = Engine(model, tok, replace(config, kv_cache_bytes=8 * page_bytes))  # 8 pages: one context of 128
    tokens, most_running = served_under_pressure(engine, prompts, params)
    assert most_running == 4 and tokens == expected
    assert engine.preemptions > 0  # 4 requests of ~128 tokens in a pool of 128: it ran dry on the way


def test_admission_refuses_what_can_never_fit(demo) -> None:
    model, tok = demo
    page_bytes = PagedKVCache.page_bytes(model.arch, 16, torch.float32)
    engine = Engine(model, tok, EngineConfig(max_batch=8, kv_cache_bytes=6 * page_bytes, page_size=16))
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompts = prompts_of([10] * 5, 8192, seed=2)
    with pytest.raises(CapacityError, match=r"needs 7 KV pages.*whole pool holds 6"):
        engine.add_request(prompts[0], SamplingParams(max_new_tokens=100))
    with pytest.raises(ContextLengthError, match="1024 tokens"):
        engine.add_request([5] * 1024, params)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([8192], params)
    with pytest.raises(CapacityError, match="holds no page"):
        Engine(model, tok, EngineConfig(kv_cache_bytes=page_bytes - 1))


def test_max_batch_bounds_the_running_requests(demo) -> None:
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=3))
    for p in prompts_of([4] * 7, 8192, seed=3):
        engine.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
    seen = 0
    while engine.has_work():
        engine.step()
        seen = max(seen, len(engine.running))
    assert seen == 3


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_abort_frees_pages_at_once(demo, page_size) -> None:
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=2, page_size=tokens_per_page(page_size, model)))
    a = engine.add_request("def f(x):", SamplingParams(max_new_tokens=200))
    b = engine.add_request("import os", SamplingParams(max_new_tokens=200))
    engine.add_request("x = 1", SamplingParams(max_new_tokens=200))  # waits: max_batch 2
    for _ in range(6):
        engine.step()
    free, cached = engine.cache.free_pages, engine._requests[a].computed
    out = engine.abort(a)
    assert out.finished and out.finish_reason == "abort"
    # Pages for the tokens it has cached (its prompt and 5 sampled tokens: 6 steps), not for the 200 it may sample:
    # as many pages of 4, or 1 whole context.
    assert cached == len(engine.encode("def f(x):")) + 5
    assert engine.cache.free_pages == free + (-(-cached // 4) if page_size == 4 else 1)
    assert engine.abort(a) is None  # already gone
    assert engine.abort(b).finish_reason == "abort"
    engine.step()
    assert len(engine.running) == 1 and not engine.waiting


def test_padded_decode_step_equals_unpadded(demo) -> None:
    """The CUDA-graph path on the CPU (eager): 3 requests padded to a batch of 4 get the same logits as
    the engine's ordinary step, and the padding writes only the scratch page."""
    model, tok = demo
    engine = Engine(model, tok, EngineConfig(max_batch=8, page_size=16))
    for t in ("def f(x):", "import os, sys", "class A"):
        engine.add_request(t, SamplingParams(max_new_tokens=50))
    engine.step()  # prefill all three
    plan = engine._schedule()
    assert [n for _, n in plan] == [1, 1, 1]
    snapshot = [k.clone() for k in engine.cache.k]
    expected, _ = engine._forward(plan)
    graphs = DecodeGraphs(model, engine.cache, 8, engine.max_pages_per_request, capture=False)
    for layer, k in enumerate(snapshot):  # undo the writes of the unpadded step (same values anyway)
        engine.cache.k[layer].copy_(k)
    dev = engine.device
    tokens = torch.tensor([r.tokens[r.computed] for r, _ in plan], device=dev)
    positions = torch.tensor([r.computed for r, _ in plan], device=dev)
    slots = torch.tensor([r.pages[0][r.computed // 16] * 16 + r.computed % 16 for r, _ in plan], device=dev)
    seq_lens = torch.tensor([r.computed + 1 for r, _ in plan], dtype=torch.int32, device=dev)
    table = torch.tensor([r.pages[0] for r, _ in plan], dtype=torch.int32, device=dev)
    padded = graphs.run(tokens, positions, [slots], seq_lens, [table])
    assert padded.shape == expected.shape
    # fp32 sums of the same products in another order: the BLAS picks its kernel by the rows (3 or 4) and by the
    # weight layout the engine measured fastest (kernels/cpu_layout.py, a timing), so the order differs from run to
    # run; seen up to 1.04e-6 (2026-11-30). A token, slot or page read wrongly moves the logits by O(1).
    assert relative_error(padded, expected) <= 1e-5
    for layer, k in enumerate(engine.cache.k):
        changed = (k != snapshot[layer]).flatten(1).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= {0, *(r.pages[0][r.computed // 16] for r, _ in plan)}


def poison(cache: PagedKVCache, pages: list[list[int]], tokens: int) -> None:
    """What an earlier owner of `pages` could leave behind: NaN K/V for its first `tokens` tokens, every layer."""
    for layer, k in enumerate(cache.k):
        if k is not None:
            slots = torch.tensor(cache.slots(pages[cache.group_of[layer]], 0, tokens))
            for pool in (k, cache.v[layer]):
                pool.view(-1, *pool.shape[2:])[slots] = float("nan")


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_stale_nan_in_free_pages_never_reaches_a_request(demo, page_size) -> None:
    """NaN K/V left in the pool by earlier requests cannot leak into later ones through the masked tail of a
    page: first every slot of every page was written, then the first 20 tokens of one request's pages. Pages
    are zeroed when handed out, as far as their last owner could have written."""
    model, tok = demo
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = prompts_of([5, 37, 16], 8192, seed=4)
    clean = Engine(model, tok, EngineConfig(max_batch=4)).generate(prompts, params)
    engine = Engine(model, tok, EngineConfig(max_batch=4, page_size=tokens_per_page(page_size, model)))
    cache = engine.cache
    everything = cache.allocate(cache.free_pages * cache.page_size)
    poison(cache, everything, len(everything[0]) * cache.page_size)
    cache.release(everything, len(everything[0]) * cache.page_size)
    some = cache.allocate(20)
    poison(cache, some, 20)
    cache.release(some, 20)
    assert [c.tokens for c in engine.generate(prompts, params)] == [c.tokens for c in clean]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (decode steps replay CUDA graphs)")
def test_cuda_graph_decode_equals_eager_and_uncached_greedy() -> None:
    """On CUDA (float32, Triton kernels), decode steps replayed from graphs at padded batch sizes give the
    same greedy tokens for 5 requests (padded to 8) as eager steps and as whole uncached forwards."""
    model, tok = load_model(PARENT_DIR, device="cuda"), load_tokenizer(PARENT_DIR)
    engine = Engine(model, tok, EngineConfig(max_batch=8))
    assert engine.graphs is not None and 8 in engine.graphs.graphs
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompts = prompts_of([3, 17, 40, 9, 1], 8192, seed=5)
    eager = Engine(model, tok, EngineConfig(max_batch=8, cuda_graphs=False)).generate(prompts, params)
    graphs = engine.generate(prompts, params)
    assert [c.tokens for c in graphs] == [c.tokens for c in eager]
    assert [c.tokens for c in graphs] == [greedy_by_full_forward(model, p, 20) for p in prompts]


def test_steps_of_fresh_prompts_attend_with_the_varlen_kernel(demo, monkeypatch) -> None:
    """A step whose sequences all start in it (new prompts, whole or a first chunk) attends over its own keys with
    the varlen prefill kernel; a step with cached keys (a later chunk, decode tokens) reads them through the paged
    kernel. Either way every greedy token equals the uncached forward's, so the K/V the fresh step stored serve the
    steps after it."""
    from tessera import kernels

    model, tok = demo
    calls: list[str] = []
    for name in ("attention_prefill", "attention_paged"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    engine = Engine(model, tok, EngineConfig(max_batch=4, max_step_tokens=24))
    prompts = prompts_of([10, 12, 30], 8192, seed=5)
    layers = sum(layer.self_attn is not None and hasattr(layer.self_attn, "w_qkv") for layer in model.layers)
    steps = []
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
    outputs = {}
    while engine.has_work():
        calls.clear()
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        steps.append(set(calls))
        assert len(calls) == layers
    # Step 1: prompts of 10 and 12 tokens and the first 2 of the 30 (24 tokens), all fresh; then the rest of the
    # 30-token prompt beside two decode tokens, and decode steps: all through the paged kernel.
    assert steps[0] == {"attention_prefill"} and all(s == {"attention_paged"} for s in steps[1:])
    for p, tokens in zip(prompts, outputs.values()):
        assert tokens == greedy_by_full_forward(model, p, 5)


def test_a_failed_generate_leaves_the_engine_empty_for_the_next(demo, monkeypatch) -> None:
    """`Engine.run` (under `Generator` and `generate`) raises when one of its requests fails; the call's other
    requests are aborted on the way out, so their pages come back and the next call (which reuses the engine)
    works. Before, the leftover request kept its pages and the next call failed with a KeyError on its id."""
    from tessera.runtime import engine as engine_module
    from tessera.runtime.generate import Generator

    model, tok = demo
    generator = Generator(model, tok)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=1, ignore_eos=True)
    expected = generator.generate(["x = 1"], params)[0].tokens
    real_sample, calls = engine_module.sample, []

    def failing_third_step(logits, params, uniforms):
        calls.append(1)
        if len(calls) == 3:
            logits[0] = float("nan")
        return real_sample(logits, params, uniforms)

    monkeypatch.setattr(engine_module, "sample", failing_third_step)
    with pytest.raises(RuntimeError, match="sampling failed"):
        generator.generate(["def f(x):", "import os"], params)
    monkeypatch.setattr(engine_module, "sample", real_sample)
    engine = generator.engine
    assert not engine.running and not engine.waiting and engine.cache.free_pages == engine.cache.usable_pages
    assert generator.generate(["x = 1"], params)[0].tokens == expected


def test_the_penalty_table_is_made_before_the_kv_pool_takes_its_share_of_memory(demo, monkeypatch) -> None:
    """The pool is sized from the memory left once the engine's other buffers exist: the penalized requests' table
    (rows × vocabulary × 5 bytes; 164 MB at 256 rows of a 128k vocabulary) made later could find it taken."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    order = []
    made = engine_module.SeenTokens

    def seen_tokens(rows: int, vocab: int, device) -> object:
        order.append(("table", rows, vocab))
        return made(rows, vocab, device)

    def available_memory(device) -> int:
        order.append("memory read")
        return 2**40

    monkeypatch.setattr(engine_module, "SeenTokens", seen_tokens)
    monkeypatch.setattr(engine_module, "available_memory", available_memory)
    engine = Engine(model, tok, EngineConfig(max_batch=3, page_size=16))
    # The table checked against the memory there is, made, then the pool sized from what is left.
    assert order == ["memory read", ("table", 3, model.vocab_size), "memory read"]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=1.0, seed=1, frequency_penalty=0.5)
    (done,) = engine.generate([[5, 6, 7]], params)
    assert len(done.tokens) == 4 and len(order) == 3  # the penalized request used the table made with the engine


def test_buffers_past_the_memory_and_pages_past_the_context_are_refused(demo, monkeypatch) -> None:
    """An explicit KV pool (--kv-cache-gib) or a batch whose per-slot tables exceed the free memory is refused, named,
    before it is allocated (a CPU engine was OOM-killed without a word); a page longer than the context too (it
    held memory no request could fill)."""
    from tessera.runtime import engine as engine_module

    model, tok = demo
    free = 64 * 2**20
    monkeypatch.setattr(engine_module, "available_memory", lambda device: free)
    with pytest.raises(
        UserError, match=r"kv_cache_bytes \(--kv-cache-gib\) take 0.1 GiB, more than the 0.1 GiB of memory free"
    ):
        Engine(model, tok, EngineConfig(max_batch=2, kv_cache_bytes=free + 1))
    rows = free // (model.vocab_size * 5) + 1
    with pytest.raises(UserError, match=f"max_batch {rows}: its slots' token tables"):
        Engine(model, tok, EngineConfig(max_batch=rows))
    Engine(model, tok, EngineConfig(max_batch=rows - 1, kv_cache_bytes=free // 4))  # both within the memory
    with pytest.raises(UserError, match="page_size 128 is longer than max_model_len 64"):
        Engine(model, tok, EngineConfig(max_batch=2, max_model_len=64, page_size=128))
