"""Generation: batching, sampling distributions, stopping rules and the context-length check."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.generate import Generator
from tessera.runtime.model import Model
from tessera.runtime.sampling import (
    ContextLengthError,
    SamplingParams,
    SeenTokens,
    TextStream,
    TokenLogprobs,
    apply_penalties,
    load_tokenizer,
    request_keys,
    request_uniforms,
    sample,
    seed_words,
    token_logprobs,
)

from .conftest import transformers_demo_parent

TEXT = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b", "hello world"] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def generator(tokenizer: Tokenizer) -> Generator:
    block = BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 96))
    arch = ArchConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=48,
        n_heads=4,
        head_dim=12,
        blocks=(block,) * 2,
        max_position_embeddings=64,
        eos_token_ids=(0,),
    )
    # A large init spreads the logits so greedy and sampled paths differ visibly.
    return Generator(Model(arch).init_weights(std=0.5, seed=0).eval(), tokenizer)


PROMPTS = ["def add(a", "the quick brown fox jumps over", "h"]


def test_batched_greedy_equals_one_at_a_time(generator: Generator) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = generator.generate(PROMPTS, params)
    for prompt, c in zip(PROMPTS, batched):
        [alone] = generator.generate([prompt], params)
        assert c.tokens == alone.tokens and len(c.tokens) == 12
        assert c.text == generator.tokenizer.decode(c.tokens)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(generator: Generator) -> None:
    def run(seed):
        return [c.tokens for c in generator.generate(PROMPTS, SamplingParams(16, 1.0, seed=seed, ignore_eos=True))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_and_tiny_top_p_are_greedy(generator: Generator) -> None:
    greedy = [c.tokens for c in generator.generate(PROMPTS, SamplingParams(10, ignore_eos=True))]
    top_k = [c.tokens for c in generator.generate(PROMPTS, SamplingParams(10, 1.5, top_k=1, seed=0, ignore_eos=True))]
    top_p = [
        c.tokens for c in generator.generate(PROMPTS, SamplingParams(10, 1.5, top_p=1e-6, seed=0, ignore_eos=True))
    ]
    assert greedy == top_k == top_p


N_SAMPLES = 40_000  # frequency std <= sqrt(0.25 / 40000) = 0.0025; tolerance 0.015 is 6 sigma


def _frequencies(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """N_SAMPLES draws of one request's stream (seed 0, counters 0..N-1), all rows at once."""
    uniforms = request_uniforms(torch.tensor([request_keys(0)] * N_SAMPLES), torch.arange(N_SAMPLES))
    draws = sample(logits.expand(N_SAMPLES, -1), [params] * N_SAMPLES, uniforms)
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / N_SAMPLES


def _lowbias32(x: int) -> int:
    """The hash request_uniforms uses, in Python integers (no overflow to worry about): its reference."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_reference(seed: int, counter: int) -> float:
    low, high = seed_words(seed)
    words = []
    for salt in (0x9E3779B9, 0x85EBCA6B):
        key = _lowbias32(_lowbias32(high ^ salt) ^ low)
        words.append(_lowbias32(_lowbias32(key ^ counter) ^ _lowbias32(key ^ 0x68E31DA4)))
    return (words[0] * 2**21 + (words[1] >> 11)) / 2**53


def test_request_streams_are_uniform_independent_and_the_reference_hash() -> None:
    """Each request's stream (`request_uniforms`): equal to the hash computed in Python integers (seeds at both
    ends of SEED_RANGE included), in [0, 1); 100,000 draws of one stream and of 1,000 seeds are uniform (the
    Kolmogorov-Smirnov distance below its 0.1 % critical value, 1.95 / sqrt(n)); neighbouring seeds' streams are
    uncorrelated (|r| below 4 standard errors, 4 / sqrt(n)) and not each other's values reordered."""
    seeds = [0, 1, 2**32, -1, -(2**63), 2**64 - 1, 123456789]
    keys = torch.tensor([request_keys(s) for s in seeds for _ in range(3)], dtype=torch.int64)
    counters = torch.tensor([0, 1, 2**31 + 5] * len(seeds))
    got = request_uniforms(keys, counters).tolist()
    assert got == [_uniform_reference(s, c) for s in seeds for c in (0, 1, 2**31 + 5)]

    def ks(u: torch.Tensor) -> float:
        u, n = u.sort().values, u.numel()
        grid = torch.arange(1, n + 1, dtype=torch.float64) / n
        return max((grid - u).max().item(), (u - (grid - 1 / n)).max().item())

    n = 100_000
    one_stream = request_uniforms(torch.tensor([request_keys(0)] * n), torch.arange(n))
    many = torch.tensor([request_keys(s) for s in range(1000)], dtype=torch.int64).repeat_interleave(100, dim=0)
    many_seeds = request_uniforms(many, torch.arange(100).repeat(1000))
    for u in (one_stream, many_seeds):
        assert u.min() >= 0 and u.max() < 1
        assert ks(u) < 1.95 / n**0.5
    a = request_uniforms(torch.tensor([request_keys(7)] * n), torch.arange(n))
    b = request_uniforms(torch.tensor([request_keys(8)] * n), torch.arange(n))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 4 / n**0.5
    # Nor is one seed's stream another's in another order. Seeds 703 and 2693 have first-round keys 200 apart: when
    # the counter went into the last round alone, 9,984 of their first 10,000 draws shared their top 32 bits.
    # Independent streams share about 10^8 / 2^32 ≈ 0.02.
    a, b = (request_uniforms(torch.tensor([request_keys(s)] * 10_000), torch.arange(10_000)) for s in (703, 2693))
    assert len(set((a * 2**32).floor().tolist()) & set((b * 2**32).floor().tolist())) <= 2


def test_a_batch_samples_each_row_as_that_row_alone() -> None:
    """Rows of a batch with different parameters (greedy, temperature, top-k, top-p, both) each give the token
    they give sampled alone with the same draw; the inverse transform picks the first token whose cumulative
    probability passes the draw (brute force: the cuts in likelihood order, then the kept tokens in vocabulary
    order)."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 2
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.8),
    ]
    for draw in (0.0, 0.37, 0.93, 1 - 2**-53):
        uniforms = torch.full((5,), draw, dtype=torch.float64)
        batch = sample(logits, params, uniforms).tolist()
        alone = [sample(logits[i : i + 1], [p], uniforms[i : i + 1]).item() for i, p in enumerate(params)]
        assert batch == alone
        for i, p in enumerate(params[1:], start=1):
            x = logits[i].double() / p.temperature
            order = x.argsort(descending=True).tolist()
            kept = order[: p.top_k or len(order)]
            probs = torch.softmax(x[kept], -1).tolist()
            if p.top_p < 1:
                kept = kept[: next((j for j in range(1, len(probs)) if sum(probs[:j]) >= p.top_p), len(kept))]
            kept = sorted(kept)  # the inverse transform runs in vocabulary order
            probs = torch.softmax(x[kept], -1).tolist()
            total, target = 0.0, draw * sum(probs)
            expected = kept[-1]
            for token, q in zip(kept, probs):
                total += q
                if total > target:
                    expected = token
                    break
            assert batch[i] == expected, (draw, p)
    assert batch[0] == logits[0].argmax().item()


def test_top_p_over_a_few_candidates_equals_the_full_ranking(monkeypatch) -> None:
    """A top-p cut ranks only the CANDIDATES likeliest tokens, and in full only the rows whose nucleus is wider:
    with 16 candidates over 300 tokens (peaked rows inside them, flat rows past them, top-k + top-p rows) every
    draw gives the token the full ranking gives."""
    from tessera.runtime import sampling

    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([8.0, 0.3, 6.0, 0.5, 4.0])[:, None]  # peaked and flat rows
    logits = torch.randn(5, 300, generator=gen) * scales
    params = [
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.95),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.5),
        SamplingParams(temperature=1.2),
    ]
    draws = [torch.rand(5, generator=gen, dtype=torch.float64) for _ in range(50)]
    monkeypatch.setattr(sampling, "CANDIDATES", 300)
    full = [sample(logits, params, u).tolist() for u in draws]
    monkeypatch.setattr(sampling, "CANDIDATES", 16)
    assert [sample(logits, params, u).tolist() for u in draws] == full


def test_a_row_draws_the_same_token_in_any_batch_even_over_tied_logits() -> None:
    """bf16 logits tie often, and tied logits rank in an order that depends on how many tokens are ranked, which
    the batch's other rows decide (a top_k=600 row beside a top-p row widens the ranking): the nucleus keeps every
    token tied with its last one, so a row's kept tokens, and its draws, are the same alone and in any batch
    (168 of 200 such rows kept other tokens before)."""
    gen = torch.Generator().manual_seed(0)
    vocab = 8192
    mine = SamplingParams(temperature=1.0, top_p=0.9)
    others = [SamplingParams(temperature=1.0, top_k=600), SamplingParams(temperature=1.0, top_k=2000, top_p=0.5)]
    from tessera.runtime.sampling import _kept

    for _ in range(20):
        logits = (torch.randn(3, vocab, generator=gen) * 3).bfloat16().double()  # many exact ties
        logits -= logits.amax(dim=-1, keepdim=True)
        kept = _kept(logits[:1], [vocab], [0.9])
        for other in others:
            pair = _kept(logits[:2], [vocab, other.top_k], [0.9, other.top_p])
            assert torch.equal(pair[:1], kept)
        draws = torch.rand(3, generator=gen, dtype=torch.float64)
        alone = sample(logits[:1].float(), [mine], draws[:1])
        assert torch.equal(sample(logits.float(), [mine, *others], draws)[:1], alone)


def test_top_k_rows_are_cut_without_reading_the_logits_on_the_host(monkeypatch) -> None:
    """A batch of top-k rows (greedy, plain and seeded rows beside them) samples without the host reading anything
    the device computed (no bool, item, nonzero or tolist of a tensor), so the engine's next step can be issued
    while this one runs (async scheduling); the tokens equal a cut by hand: each row's k likeliest, ties at the
    k-th kept, drawn by inverse transform."""
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(4, 500, generator=gen) * 2).bfloat16().float()
    for row, k in ((0, 5), (2, 40)):  # ties at the k-th (bf16 values), which stay
        assert (logits[row] == logits[row].topk(k).values[-1]).sum() >= 2
    params = [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=40, seed=3),
        SamplingParams(temperature=1.3),
    ]
    draws = torch.rand(4, generator=gen, dtype=torch.float64)

    def host_read(*args, **kwargs):
        raise AssertionError("the host read a value the device computed")

    with monkeypatch.context() as patched:
        for name in ("__bool__", "item", "nonzero", "tolist"):
            patched.setattr(torch.Tensor, name, host_read)
        tokens = sample(logits, params, draws)
    for row, (p, u) in enumerate(zip(params, draws.tolist())):
        x = logits[row].double()
        if p.temperature == 0:
            assert tokens[row] == x.argmax()
            continue
        x = (x - x.max()) / p.temperature
        if p.top_k:
            x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
        cdf = x.softmax(-1).cumsum(-1)
        assert tokens[row] == torch.searchsorted(cdf, u * cdf[-1], right=True), row


def test_rows_without_a_distribution_give_minus_one() -> None:
    """A sampled row with a NaN logit, a +inf logit or only -inf logits has nothing to draw from: -1 (the engine
    fails that request alone); the greedy row beside them keeps its argmax."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    logits[1, 3], logits[2, 7], logits[3] = float("nan"), float("inf"), float("-inf")
    params = [SamplingParams()] + [SamplingParams(temperature=0.8, top_p=0.9)] * 3
    tokens = sample(logits, params, torch.full((4,), 0.5, dtype=torch.float64)).tolist()
    assert tokens == [logits[0].argmax().item(), -1, -1, -1]


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits[0].double() / temperature, -1)
        freq = _frequencies(logits, SamplingParams(temperature=temperature))
        assert (freq - expected).abs().max() < 0.015


def test_top_k_and_top_p_renormalise_over_the_kept_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log()[None].float()
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_k=3))
    assert freq[3] == 0 and (freq[:3] - probs[:3] / 0.95).abs().max() < 0.015
    # top_p 0.7: token 0 (0.5) is kept, token 1 is kept (0.5 < 0.7 before it), token 2 is dropped (0.8 >= 0.7).
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.5 / 0.8) < 0.015


def test_stops_on_eos(generator: Generator) -> None:
    [free] = generator.generate([PROMPTS[0]], SamplingParams(10, ignore_eos=True))
    eos = free.tokens[3]
    first = free.tokens.index(eos)
    [c] = generator.generate([PROMPTS[0]], SamplingParams(10, stop_token_ids=(eos,), logprobs=0))
    assert c.tokens == free.tokens[:first] and c.finish_reason == "stop"
    # The EOS that stopped it is no token of the completion, but has its log-probability entry (as vLLM gives it).
    assert [e.token_id for e in c.logprobs] == [*c.tokens, eos] and all(e.top == () for e in c.logprobs)


def _transformers_logits(tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row p scores token p + 1, from transformers' logits of the demo parent (float32, one
    forward over the whole sequence, no cache), in float64."""
    with torch.inference_mode():
        return transformers_demo_parent()(torch.tensor([tokens])).logits[0].double()


def _transformers_log_softmax(tokens: list[int]) -> torch.Tensor:
    return _transformers_logits(tokens).log_softmax(dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_log_softmax_of_transformers_logits(temperature: float) -> None:
    """Each generated token's log-probability and its 3 likeliest alternatives are the log-softmax of transformers'
    logits (the demo parent, float32, one forward over prompt + completion, no cache) at the token's position: the
    model's own distribution, before the temperature (0.7 changes what is drawn, not what is reported). 1e-4:
    engine and transformers logits agree to ~1e-5 of their magnitude (~10) in fp32 (test_engine.py)."""

    from tessera.demo import PARENT_DIR
    from tessera.runtime.loader import load_model

    params = SamplingParams(12, temperature=temperature, seed=3, logprobs=3, ignore_eos=True)
    completions = Generator(load_model(PARENT_DIR), load_tokenizer(PARENT_DIR)).generate(
        ["def fibonacci(n):", "import os\n"], params
    )
    for c in completions:
        assert [e.token_id for e in c.logprobs] == c.tokens and len(c.tokens) == 12
        expected = _transformers_log_softmax(c.prompt_tokens + c.tokens)[len(c.prompt_tokens) - 1 : -1]
        chosen = expected.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
        got = torch.tensor([e.logprob for e in c.logprobs], dtype=torch.float64)
        assert torch.allclose(got, chosen, rtol=0, atol=1e-4)
        top = expected.topk(3, dim=-1)
        assert [[t for t, _ in e.top] for e in c.logprobs] == top.indices.tolist()
        top_got = torch.tensor([[lp for _, lp in e.top] for e in c.logprobs], dtype=torch.float64)
        assert torch.allclose(top_got, top.values, rtol=0, atol=1e-4)
        if temperature == 0:  # greedy: the chosen token is the likeliest
            assert c.tokens == top.indices[:, 0].tolist()
        else:  # sampled: some token below the likeliest was drawn, reported at its own (lower) log-probability
            assert any(t != i for t, i in zip(c.tokens, top.indices[:, 0].tolist()))


def _penalized_by_hand(logits: list[float], params: SamplingParams, prompt: list[int], generated: list[int]) -> list:
    """One row's adjustments, token by token in float64: vLLM's order (the logit bias, the repetition penalty, then
    OpenAI's frequency and presence penalties), written out."""
    out = []
    for token, x in enumerate(logits):
        x = x + sum(bias for t, bias in params.logit_bias if t == token)
        if token in prompt or token in generated:
            x = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
        count = generated.count(token)
        out.append(x - params.frequency_penalty * count - params.presence_penalty * (count > 0))
    return out


def test_penalties_match_the_formula_row_by_row() -> None:
    """apply_penalties against the formula by hand: rows with and without penalties in one batch, a token seen in
    the prompt only (repetition penalty alone), a token generated three times (its count), negative logits (the
    repetition penalty multiplies them), negative presence and frequency penalties (favouring repeats), logit biases
    (a token given two adds both; before the repetition penalty, as in vLLM). The counts are kept on the device as
    tokens come (`SeenTokens.count`, a failed draw's -1 counting nothing), equal to counting them anew; each request
    reads its own row of them, the rows in another order than the batch's, one of them filled over a row used before."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, generator=gen) * 3
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5, logit_bias=((2, 5.0), (7, -100), (2, 1.5))),
    ]
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9], [1]]
    generated = [[3, 10, 10, 10, 0], [4, 4], [6, 11], [], [2, 2]]
    rows = [4, 0, 2, 1, 3]  # request i's row of the counts
    seen = SeenTokens(5, 12, torch.device("cpu"))
    seen.fill(2, [0, 1, 2, 3, 4], [5, 5, 9])  # what an earlier request left in row 2
    for row, prompt, tokens in zip(rows, prompts, generated):
        seen.fill(row, prompt, tokens[:1])
        for token in [*tokens[1:], -1]:
            seen.count(torch.tensor([row]), torch.tensor([token]))
    out = apply_penalties(logits, params, seen, rows)
    for row in range(5):
        expected = _penalized_by_hand(logits[row].double().tolist(), params[row], prompts[row], generated[row])
        assert torch.allclose(out[row].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], logits[1])  # no penalty: the row as it was


def test_greedy_with_penalties_equals_transformers_with_the_formula() -> None:
    """Greedy decoding with all three penalties through the engine equals a loop that takes transformers' logits
    (the demo parent, one whole forward per token), applies the formula by hand and takes the argmax; the
    penalties change the text (without them the tokens differ), and the reported log-probabilities stay the
    model's own."""
    from tessera.demo import PARENT_DIR
    from tessera.runtime.loader import load_model

    tok = load_tokenizer(PARENT_DIR)
    params = SamplingParams(
        16, presence_penalty=0.4, frequency_penalty=0.6, repetition_penalty=1.2, ignore_eos=True, logprobs=0
    )
    prompts = ["def fibonacci(n):", "import os\nimport sys\n"]
    completions = Generator(load_model(PARENT_DIR), tok).generate(prompts, params)
    plain = Generator(load_model(PARENT_DIR), tok).generate(prompts, SamplingParams(16, ignore_eos=True))
    assert [c.tokens for c in completions] != [c.tokens for c in plain]
    for c in completions:
        tokens = list(c.prompt_tokens)
        for step in range(16):
            logits = _transformers_logits(tokens)[-1]
            penalized = _penalized_by_hand(logits.tolist(), params, c.prompt_tokens, tokens[len(c.prompt_tokens) :])
            tokens.append(max(range(len(penalized)), key=penalized.__getitem__))
            assert abs(c.logprobs[step].logprob - logits.log_softmax(dim=-1)[tokens[-1]].item()) <= 1e-4
        assert tokens[len(c.prompt_tokens) :] == c.tokens


def test_prompt_logprobs_over_chunks_a_cached_prefix_and_a_preemption() -> None:
    """Each prompt token's log-probability (and its 2 likeliest) is transformers' log-softmax at the position before
    it, the first token's None, whether the prompt is read in 8-token chunks or served again when its pages are
    cached (a request scoring its prompt computes it whole: nothing of it is taken from the cache, though a request
    that does not score it still is). Requests preempted while decoding (a pool of 6 pages of 16 tokens, five of
    10 + 30 tokens: test_engine's case) send their prompt's entries once, on their first output."""
    from tessera.demo import PARENT_DIR
    from tessera.runtime.cache import PagedKVCache
    from tessera.runtime.engine import Engine, EngineConfig
    from tessera.runtime.loader import load_model

    tok, model = load_tokenizer(PARENT_DIR), load_model(PARENT_DIR)
    scored = SamplingParams(2, prompt_logprobs=2, ignore_eos=True)

    def check(ids: list[int], entries: list) -> None:
        expected = _transformers_log_softmax(ids)[:-1]
        assert len(entries) == len(ids) and entries[0] == TokenLogprobs(ids[0], None)
        assert [e.token_id for e in entries[1:]] == ids[1:]
        got = torch.tensor([e.logprob for e in entries[1:]], dtype=torch.float64)
        assert torch.allclose(got, expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], rtol=0, atol=1e-4)
        assert [[t for t, _ in e.top] for e in entries[1:]] == expected.topk(2).indices.tolist()

    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    engine = Engine(model, tok, EngineConfig(max_batch=2, max_model_len=64, page_size=4, max_step_tokens=8))
    for _ in range(2):  # the second time, the prompt's pages are in the cache
        [c] = engine.generate([prompt], scored)
        check(tok.encode(prompt).ids, c.prompt_logprobs)
        assert engine.prefix_hits == 0 and c.logprobs is None
    [plain] = engine.generate([prompt], SamplingParams(2, ignore_eos=True))
    assert plain.prompt_logprobs is None and engine.prefix_hits > 0  # cached pages still serve the others

    page_bytes = PagedKVCache.page_bytes(model.arch, 16, torch.float32)
    tight = Engine(model, tok, EngineConfig(max_batch=8, kv_cache_bytes=6 * page_bytes, page_size=16))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 8192, (10,), generator=gen).tolist() for _ in range(5)]
    ids = [tight.add_request(p, SamplingParams(30, prompt_logprobs=2, ignore_eos=True)) for p in prompts]
    sent: dict[str, list] = {i: [] for i in ids}
    while tight.has_work():
        for out in tight.step():
            if out.prompt_logprobs is not None:
                sent[out.request_id].append(out.prompt_logprobs)
    assert tight.preemptions > 0
    for prompt_ids, request_id in zip(prompts, ids):
        [entries] = sent[request_id]
        check(prompt_ids, entries)


def test_stops_on_stop_string(generator: Generator) -> None:
    [free] = generator.generate([PROMPTS[1]], SamplingParams(20, ignore_eos=True))
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [c] = generator.generate([PROMPTS[1]], SamplingParams(20, stop=(stop,), ignore_eos=True))
    assert c.finish_reason == "stop" and c.text == text[: text.find(stop)]
    assert stop not in c.text


def test_max_new_tokens(generator: Generator) -> None:
    for c in generator.generate(PROMPTS, SamplingParams(5, ignore_eos=True)):
        assert len(c.tokens) == 5 and c.finish_reason == "length"


def test_prompt_longer_than_context_is_refused(generator: Generator) -> None:
    with pytest.raises(
        ContextLengthError, match=r"prompt 1 has 64 tokens; the context is 64 tokens \(max_position_embeddings\)"
    ):
        generator.generate([[5, 6], [7] * 64], SamplingParams(4))


def test_generation_stops_at_the_context_end(generator: Generator) -> None:
    # Prompt 0 can only grow by 2 tokens; prompt 1 rides along with a 20-token budget in the same batch.
    completions = generator.generate([[9] * 62, [5, 6, 7]], SamplingParams(20, ignore_eos=True))
    assert [len(c.tokens) for c in completions] == [2, 20]
    assert [c.finish_reason for c in completions] == ["length", "length"]
    [alone] = generator.generate([[5, 6, 7]], SamplingParams(20, ignore_eos=True))
    assert alone.tokens == completions[1].tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"temperature": float("nan")}, "temperature: expected a finite number"),
        ({"temperature": float("inf")}, "temperature: expected a finite number"),
        ({"top_p": float("nan")}, "top_p: expected a finite number"),
        ({"seed": 2**64}, "seed: expected an integer"),
        ({"seed": -(2**63) - 1}, "seed: expected an integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens: expected an integer"),
        ({"logprobs": 21}, r"logprobs: must be in \[0, 20\]"),
        ({"logprobs": -1}, r"logprobs: must be in \[0, 20\]"),
        ({"logprobs": True}, "logprobs: expected an integer"),
        ({"presence_penalty": 2.5}, r"presence_penalty: must be in \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty: must be in \[-2, 2\]"),
        ({"repetition_penalty": 0}, "repetition_penalty: must be > 0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty: expected a finite number"),
        ({"logit_bias": ((5, 101),)}, r"logit_bias: token 5: a bias is a number in \[-100, 100\]"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias: token ids are >= 0"),
    ],
)
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_is_refused(generator: Generator) -> None:
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.generate([""], SamplingParams(3))


def test_token_ids_outside_the_vocabulary_are_refused(generator: Generator) -> None:
    vocab = generator.model.arch.vocab_size
    with pytest.raises(ValueError, match=rf"prompt 1 has token id {vocab}, outside the vocabulary \[0, {vocab}\)"):
        generator.generate([[1, 2], [3, vocab]], SamplingParams(2))


def test_no_prompts_no_completions(generator: Generator) -> None:
    assert generator.generate([], SamplingParams(2)) == []


def test_empty_stop_token_ids_means_none_not_eos(generator: Generator, monkeypatch) -> None:
    from dataclasses import replace

    [free] = generator.generate([PROMPTS[2]], SamplingParams(10, ignore_eos=True))
    # Make a token the greedy path emits early the model's EOS: the default stops there, () does not.
    monkeypatch.setattr(generator.model, "arch", replace(generator.model.arch, eos_token_ids=(free.tokens[1],)))
    [default] = generator.generate([PROMPTS[2]], SamplingParams(10))
    [none] = generator.generate([PROMPTS[2]], SamplingParams(10, stop_token_ids=()))
    assert default.finish_reason == "stop" and len(default.tokens) < 10
    assert none.tokens == free.tokens and none.finish_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-45),
        SamplingParams(temperature=5e-324),
        SamplingParams(temperature=1, top_p=1e-300),
        SamplingParams(temperature=2, top_k=1, top_p=1e-300),
    ],
    ids=["temperature-1e-45", "temperature-min-double", "top_p-1e-300", "top_k-1-top_p-1e-300"],
)
def test_extreme_accepted_values_sample_the_best_token(params: SamplingParams) -> None:
    """Values the checks accept must sample: these once gave inf/NaN probabilities (torch.multinomial raised, and
    the server failed every request in the batch). Each leaves only the best token a share."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    uniforms = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)  # the ends of the draws' range too
    draws = sample(logits, [params] * 3, uniforms)
    assert draws.tolist() == logits.argmax(dim=-1).tolist()


class CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def test_text_stream_equals_the_whole_decode_in_constant_work_per_token(tokenizer: Tokenizer) -> None:
    """Streamed deltas join to exactly what decoding all the ids at once gives (multi-byte characters split
    across tokens included), and each token costs a bounded decode: 3,000 tokens once re-decoded the whole
    text at each token (4.5 million ids), now a few ids a token."""
    text = "naïve café 日本語 — ünïcödé " + " ".join(TEXT)
    ids = (tokenizer.encode(text).ids * 20)[:3000]
    rng = torch.Generator().manual_seed(0)
    ids[::7] = torch.randint(0, tokenizer.get_vocab_size(), (len(ids[::7]),), generator=rng).tolist()  # odd bytes
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ("<never>",))
    streamed = "".join(stream.add(t)[0] for t in ids) + stream.flush()[0]
    assert streamed == tokenizer.decode(ids)
    assert counting.decoded / len(ids) < 16


@pytest.mark.parametrize("stop", ["fox", "\n    ", "b)", "world the"])
def test_text_stream_cuts_at_the_first_stop_string(tokenizer: Tokenizer, stop: str) -> None:
    ids = tokenizer.encode(" ".join(TEXT[:6])).ids
    whole = tokenizer.decode(ids)
    stream, text = TextStream(tokenizer, (stop, "<never>")), ""
    for t in ids:
        delta, stopped = stream.add(t)
        text += delta
        if stopped:
            break
    assert stopped and text == whole[: whole.index(stop)]


def test_a_stop_string_completed_by_the_last_token_inside_a_character_still_stops() -> None:
    """A token whose text ends inside a UTF-8 character is held back until the next token completes it; when
    generation ends on it (EOS or the token budget), flush searches that text for stop strings too (the demo
    parent's tokenizer has such tokens)."""
    from tessera.demo import PARENT_DIR

    tokenizer = Tokenizer.from_file(str(PARENT_DIR / "tokenizer.json"))
    ending = next(
        i
        for i in range(tokenizer.get_vocab_size())
        if len(tokenizer.decode([i])) > 1
        and tokenizer.decode([i]).endswith("\ufffd")
        and not tokenizer.decode([i]).startswith("\ufffd")
    )
    stop = "#" + tokenizer.decode([ending])[:-1]  # completed by that token, before its unfinished character
    stream, text = TextStream(tokenizer, (stop,)), ""
    for t in [*tokenizer.encode("x = 1 #").ids, ending]:
        delta, stopped = stream.add(t)
        text += delta
        assert not stopped  # held back: the last token ends inside a character
    rest, stopped = stream.flush()
    assert stopped and text + rest == "x = 1 "


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "NoSuchModel"}}', ""])
def test_a_corrupt_tokenizer_file_is_named(tmp_path, content: str) -> None:
    """The tokenizers library's own error names no file; ours names it, in one line (CLI exit 2)."""
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tokenizer.json: not a Hugging Face tokenizer file \("):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json: no such file \("):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_draws_and_the_sampling_are_the_same_on_cuda() -> None:
    """A request's random stream is integer arithmetic: bit for bit the same on CUDA as on the CPU. The batched
    sampling over it (float64) picks the same tokens for all but the rare row whose draw falls within rounding of a
    boundary between two tokens (cumulative sums add in another order on the GPU)."""
    keys = torch.tensor([request_keys(s) for s in range(200)], dtype=torch.int64)
    counters = torch.arange(200) * 7919
    cpu = request_uniforms(keys, counters)
    assert torch.equal(request_uniforms(keys.cuda(), counters.cuda()).cpu(), cpu)
    logits = torch.randn(200, 4096, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.8, top_k=50 * (i % 3), top_p=(1.0, 0.9)[i % 2]) for i in range(200)]
    same = sample(logits.cuda(), params, cpu.cuda()).cpu() == sample(logits, params, cpu)
    assert same.sum() >= 198


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_penalties_and_logprobs_on_cuda_equal_the_cpus() -> None:
    """The served path's sampling adjustments on the GPU: the penalties and biases (from token counts and prompt
    masks kept on the device) and the log-probabilities with their likeliest tokens equal the CPU's (float32 sums in
    another order: 1e-5), and a CUDA engine replaying its decode graphs reports as many entries as it samples."""
    from tessera.demo import PARENT_DIR
    from tessera.runtime.loader import load_model

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4096, generator=gen) * 3
    params = [
        SamplingParams(presence_penalty=0.3 * i, frequency_penalty=0.2, repetition_penalty=1 + 0.1 * i)
        for i in range(5)
    ] + [SamplingParams(logit_bias=((7, 4.0), (9, -3.0)))]
    history = [torch.randint(0, 4096, (n,), generator=gen).tolist() for n in (3, 40, 1, 90, 12, 5)]
    out = {}
    for device in ("cpu", "cuda"):
        seen = SeenTokens(6, 4096, torch.device(device))
        for row, h in enumerate(history):
            seen.fill(row, h[:2], h[2:])
        adjusted = apply_penalties(logits.to(device), params, seen, list(range(6)))
        out[device] = adjusted.cpu(), token_logprobs(adjusted, list(range(6)), [3] * 6)
    assert torch.allclose(out["cuda"][0], out["cpu"][0], rtol=0, atol=1e-5)
    for a, b in zip(out["cuda"][1], out["cpu"][1]):
        assert abs(a.logprob - b.logprob) <= 1e-5 and [t for t, _ in a.top] == [t for t, _ in b.top]
    engine_params = SamplingParams(12, logprobs=2, prompt_logprobs=1, frequency_penalty=0.5, ignore_eos=True)
    model = load_model(PARENT_DIR, device=torch.device("cuda"))
    for c in Generator(model, load_tokenizer(PARENT_DIR)).generate(["def f(", "import os\n", "x = 1"], engine_params):
        assert len(c.logprobs) == len(c.tokens) == 12 and len(c.prompt_logprobs) == len(c.prompt_tokens)
        assert all(math.isfinite(e.logprob) and len(e.top) == 2 for e in c.logprobs)
