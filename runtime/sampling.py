"""What a request asks for and what comes back: sampling parameters, prompt checks, sampling, and text streaming
with stop strings. Shared by the engine (runtime/engine.py), the offline generator (runtime/generate.py) and the
HTTP server (runtime/server.py), so all three accept, sample and stop the same way.

Sampling is greedy (temperature 0) or temperature / top-k / top-p, a whole step's rows at once (`sample`), each
row drawing from its request's own random stream (`request_uniforms`: a hash of the request's seed and how many
tokens it has sampled), so a request's tokens depend on its seed alone, never on the batch it shares.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tessera.devices import upload
from tessera.errors import UserError, UserFileNotFound


class ContextLengthError(UserError):
    """A prompt that leaves no room in the model's context window."""


class SamplingError(UserError):
    """Sampling parameters that cannot sample; `field` names the parameter (SamplingParams' name for it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes (and OpenAI clients send); modulo 2**64
MAX_LOGPROBS = 20  # alternatives a token's log-probabilities may list (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. Checked here, once, for every entry point (CLI, server, Python): a value that
    cannot sample (NaN, inf, a seed outside SEED_RANGE) is refused with the field named."""

    max_new_tokens: int | None = 64  # None: to the end of the context
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely (TokenLogprobs)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's prompt_logprobs)
    # Penalties on tokens already seen (`apply_penalties`): OpenAI's presence and frequency penalties over the
    # tokens generated so far, in [-2, 2], and the repetition penalty over the prompt's and those (> 0; 1: none)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to its logit (OpenAI's)

    @property
    def penalized(self) -> bool:
        """Whether its logits change before sampling (`apply_penalties`)."""
        biased = bool(self.logit_bias)
        return biased or self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= _integer(name, value) <= MAX_LOGPROBS:
                raise SamplingError(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
        if self.max_new_tokens is not None and _integer("max_new_tokens", self.max_new_tokens) < 1:
            raise SamplingError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if _integer("top_k", self.top_k) < 0:
            raise SamplingError("top_k", f"must be >= 0, got {self.top_k}")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise SamplingError(name, f"expected a finite number, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise SamplingError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if _integer("logit_bias", token) < 0:
                raise SamplingError("logit_bias", f"token ids are >= 0, got {token}")
            if not isinstance(bias, int | float) or isinstance(bias, bool) or not -100 <= bias <= 100:
                raise SamplingError("logit_bias", f"token {token}: a bias is a number in [-100, 100], got {bias!r}")
        if self.temperature < 0:
            raise SamplingError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise SamplingError("seed", f"expected an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")

    def seeded(self) -> SamplingParams:
        """These parameters, with a seed drawn now when they sample without one: processes that must draw the same
        tokens (tensor-parallel ranks) take it from the one that drew it."""
        if self.temperature == 0 or self.seed is not None:
            return self
        return replace(self, seed=random.getrandbits(64))


def _integer(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # a bool is an int to Python, not to a request
        raise SamplingError(name, f"expected an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (the log-softmax of its raw logits: before temperature, top-k and
    top-p, as vLLM and OpenAI report them) and the `SamplingParams.logprobs` (or `prompt_logprobs`) most likely
    tokens with theirs, most likely first. A prompt's first token has none: logprob None, nothing scores it."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # None when generating from token ids without a tokenizer
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    logprobs: list[TokenLogprobs] | None = None  # one per token sampled (an EOS that stopped it too), when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # one per prompt token, when asked for


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserFileNotFound(f"{file}: no such file (a Hugging Face fast tokenizer is needed for text)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser's error (a bad JSON or an unknown model type) has no file name
        raise UserError(f"{file}: not a Hugging Face tokenizer file ({e})") from None


def check_text(text: str, what: str) -> None:
    """Text must be valid Unicode: a lone surrogate (JSON's "\\ud800", or a byte that is not UTF-8 in argv,
    which Python passes on as U+DC80..U+DCFF) cannot be encoded as UTF-8, which the tokenizer needs."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"{text[e.start]!r}"
        raise UserError(f"{what} is not valid UTF-8 text ({bad} at character {e.start})") from None


def max_token_bytes(tokenizer: Tokenizer) -> int | None:
    """The most input bytes one token can cover, when the tokenizer keeps every byte of its input (byte-level
    BPE with no normalizer, as Llama 3's and the demo's): a text of n bytes then has at least n / this many
    tokens. None for other tokenizers: a normalizer or a pre-tokenizer that drops whitespace could leave a
    long input few tokens."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel":
        return None
    # A byte-level vocabulary spells each byte as one character; added tokens match their literal text.
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=False)), default=1)
    added = (len(t.content.encode("utf-8")) for t in tokenizer.get_added_tokens_decoder().values())
    return max(longest, *added, 0)  # the list of added tokens may be empty


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Llama 3's, the demo's): the character each byte is spelled as in the
    vocabulary -> that byte. Printable Latin-1 bytes spell themselves; the others take 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)}
    shifted = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """A token's own bytes, as OpenAI's log-probability entries give them (`bytes`): a token that holds part of a
    UTF-8 character gives that part, where its decoded text is U+FFFD. Read from the vocabulary where the tokenizer
    spells bytes there (byte-level BPE; SentencePiece's byte-fallback pieces <0xNN>); otherwise, and for added
    tokens, the UTF-8 of the token's decoded text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self.tokenizer = tokenizer
        self.alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
        self.byte_fallback = "ByteFallback" in kinds
        self.added = set(tokenizer.get_added_tokens_decoder())

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and token_id not in self.added:
            if self.alphabet is not None and all(c in self.alphabet for c in piece):
                return bytes(self.alphabet[c] for c in piece)
            if self.byte_fallback and (byte := BYTE_FALLBACK_PIECE.fullmatch(piece)):
                return bytes([int(byte.group(1), 16)])
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()


class PromptEncoder:
    """Prompts, as text or token ids, to checked token ids: the one place a prompt is read (the server, the
    engine, `Generator`). A prompt must be valid Unicode, non-empty, inside the vocabulary and leave room to
    generate in `context` tokens (`limit` names where that number comes from)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, context: int, limit: str = "max_model_len"):
        self.tokenizer, self.vocab_size, self.context, self.limit = tokenizer, vocab_size, context, limit
        # A text of more characters than token_bytes x context cannot fit (a character is at least a byte): refused
        # without tokenising, which takes seconds of a core for a 1 MB prompt.
        self.token_bytes = max_token_bytes(tokenizer) if tokenizer is not None else None

    def __call__(self, prompt: str | list[int], what: str = "the prompt", special_tokens: bool = True) -> list[int]:
        """special_tokens: let the tokenizer add its own (a BOS, say); False for a rendered chat template, which
        writes them itself (Hugging Face's apply_chat_template and vLLM's chat encode it so: never two BOS)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("a text prompt needs a tokenizer; pass token ids or load tokenizer.json")
            if self.token_bytes is not None and len(prompt) > self.token_bytes * self.context:
                raise ContextLengthError(
                    f"{what} has {len(prompt)} characters, at least {len(prompt) // self.token_bytes} tokens; the "
                    f"context is {self.context} tokens ({self.limit})"
                )
            check_text(prompt, what)
            # encode_batch releases the GIL while the Rust side works (encode does not): the server tokenises
            # in a worker thread, and a long prompt must not stall the event loop.
            tokens = self.tokenizer.encode_batch([prompt], add_special_tokens=special_tokens)[0].ids
        else:
            tokens = list(prompt)
        if not tokens:
            raise UserError(f"{what} is empty")
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"{what} has token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        if len(tokens) >= self.context:
            raise ContextLengthError(
                f"{what} has {len(tokens)} tokens; the context is {self.context} tokens ({self.limit}), leaving no "
                "room to generate"
            )
        return tokens


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """x · m modulo 2**32, for x in [0, 2**32) held in int64: in two 16-bit halves of m, so no product overflows
    int64 (whose wrap-around torch does not promise)."""
    low = x * (m & 0xFFFF)
    high = ((x * (m >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit bijective integer hash with full avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_words(seed: int) -> tuple[int, int]:
    """A request's seed (SEED_RANGE, taken modulo 2**64) as its low and high 32-bit words."""
    seed %= 2**64
    return seed & _MASK32, seed >> 32


def request_keys(seed: int) -> tuple[int, int, int, int]:
    """The part of a request's stream that depends on its seed alone (SEED_RANGE), computed once when the request
    arrives: for each of the two hash chains, its key and the word its output is whitened with."""
    low, high = (torch.tensor(w) for w in seed_words(seed))
    keys = []
    for salt in (0x9E3779B9, 0x85EBCA6B):  # two independent chains: 32 + 21 bits
        key = _mix32(_mix32(high ^ salt) ^ low)
        keys += [int(key), int(_mix32(key ^ 0x68E31DA4))]
    return tuple(keys)


def request_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform draw in [0, 1) (float64, 53 bits) per row from its request's `request_keys` [B, 4] (int64) and
    counter [B] (the tokens the request has sampled so far). Counter-based, as Philox streams are: a request's
    n-th draw is a hash of (seed, n), the same on any device, in any batch, in any order, and a whole step's draws
    are a few elementwise ops instead of a generator call per request."""
    # The counter goes in between two keyed rounds: with one round after it, mix(key ^ n), every seed's stream
    # would be the same sequence read in another order (seed B's n-th = seed A's (n ^ key_A ^ key_B)-th).
    n = counters & _MASK32
    high, low = (_mix32(_mix32(keys[:, c] ^ n) ^ keys[:, c + 1]) for c in (0, 2))
    return (high.double() * 2**21 + (low >> 11).double()) / 2**53


CANDIDATES = 512  # the likeliest tokens a top-p cut looks at first (a full sort only when they cover too little)


def _kept(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The tokens each row keeps [S, V] (bool) under its top-k (k = V: none; ties at the k-th kept) and then its
    top-p (p = 1: none; a token goes once the likelier tokens kept cover p, the likeliest always stays, and so
    does every token tied with the last one kept), from logits x [S, V] whose maximum is 0.

    Tokens are ranked by `topk` over only as many as the cuts need, a top-p cut alone the CANDIDATES likeliest,
    rather than by a full sort (64 rows of 8,192 tokens on the dev VM's CPU: 6-9 ms against 40). A row whose
    nucleus is wider (its likeliest token too unlikely for CANDIDATES tokens to cover p: a flat distribution; or
    the candidates turned out short) is ranked in full. Without a top-p row nothing of this depends on the logits:
    the host never waits for the device (the engine plans its next step meanwhile); a top-p cut does."""
    vocab = x.shape[-1]
    k = upload(top_k, x.device, torch.int64)
    p = upload(top_p, x.device, torch.float64)
    # Ranked: a top-k row's k, a top-p row's CANDIDATES (or k when it has both); a row with neither needs none.
    width = min(vocab, max(n if n < vocab else CANDIDATES if q < 1 else 1 for n, q in zip(top_k, top_p)))
    if all(q >= 1 for q in top_p):  # top-k cuts alone: every row's k-th value is among the `width` ranked
        return _cut(x, k, p, width, any_top_p=False)[0]
    full = (k >= vocab) & (p < 1)  # top-p alone: ranked in full when CANDIDATES tokens cannot cover p
    if any(n >= vocab and q < 1 for n, q in zip(top_k, top_p)):  # (a full-vocabulary logsumexp only then)
        full &= CANDIDATES * (-x.logsumexp(dim=-1)).exp() < p
    kept = torch.ones_like(x, dtype=torch.bool)
    rest = (~full).nonzero()[:, 0]
    if len(rest):
        kept[rest], short = _cut(x[rest], k[rest], p[rest], width)
        full[rest[short]] = True
    rows = full.nonzero()[:, 0]
    if len(rows):
        kept[rows] = _cut(x[rows], k[rows], p[rows], vocab)[0]
    return kept


def _cut(
    x: torch.Tensor, k: torch.Tensor, p: torch.Tensor, width: int, any_top_p: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_kept` with the `width` likeliest tokens ranked: (kept [S, V], the rows whose nucleus the ranked tokens
    do not cover [S] bool). any_top_p: whether any row may have a top-p cut (False: the top-k cuts alone)."""
    vocab = x.shape[-1]
    ranked = x.topk(width, dim=-1)[0] if width < vocab else x.sort(dim=-1, descending=True)[0]
    kth = ranked.gather(-1, (k.clamp(max=width) - 1)[:, None]).masked_fill((k >= vocab)[:, None], float("-inf"))
    kept = x >= kth  # the top-k cut, in vocabulary order (ties at the k-th stay)
    if not any_top_p:
        return kept, torch.zeros_like(p, dtype=torch.bool)
    nucleus = p < 1
    # Probabilities over what the top-k cut keeps (ranked or not), then the cut in likelihood order.
    total = x.masked_fill(~kept, float("-inf")).logsumexp(dim=-1, keepdim=True)
    probs = (ranked.masked_fill(ranked < kth, float("-inf")) - total).exp()
    covered = probs.cumsum(dim=-1)
    drop = (covered - probs >= p[:, None]) | (probs == 0)
    drop[:, 0] = False
    # The nucleus is a prefix of the ranking; it keeps every token at least as likely as its last one. Tied logits
    # (common in bf16) rank in an order that depends on the width ranked, which depends on the batch's other rows:
    # keeping the ties whole (as top-k does) makes a row's tokens the same in any batch.
    last = ranked.gather(-1, ((~drop).sum(dim=-1, keepdim=True) - 1))
    kept &= (x >= last) | ~nucleus[:, None]
    return kept, nucleus & (covered[:, -1] < p) if width < vocab else torch.zeros_like(nucleus)


def sample(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: row i under params[i], drawn by inverse transform from uniforms[i]
    (`request_uniforms`; None when no row samples); greedy rows (temperature 0) take their argmax. All rows at
    once.

    In float64, from logits shifted so their maximum is 0: any temperature SamplingParams accepts (1e-300
    included) gives finite probabilities, and the best token always keeps a share, whatever top-k and top-p cut.
    top-k keeps every token at least as likely as the k-th (ties kept); top-p drops a token once the tokens
    before it cover top_p (the first always stays, and every token tied with the last kept). A sampled row whose
    logits hold a NaN, or whose largest is infinite, gives -1 (greedy rows take their argmax whatever it is).

    Greedy, plain temperature and top-k rows never wait for the device (the engine plans its next step meanwhile);
    a top-p cut does (`_kept` sizes its work by what the logits hold).
    """
    device = logits.device
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    index = upload(rows, device, torch.int64)
    chosen = [params[i] for i in rows]
    temperature = upload([p.temperature for p in chosen], device, torch.float64)
    x = logits[index].double()
    x = x - x.amax(dim=-1, keepdim=True)
    bad = x.isnan().any(dim=-1)  # NaN logits, or a max of +inf or -inf (inf - inf): no distribution to draw from
    x = x / temperature[:, None]  # max 0, the rest <= 0 or -inf
    if any(p.top_k or p.top_p < 1 for p in chosen):
        top_k = [min(p.top_k, x.shape[-1]) or x.shape[-1] for p in chosen]
        x = x.masked_fill(~_kept(x, top_k, [p.top_p for p in chosen]), float("-inf"))
    # The draw's inverse transform in vocabulary order, whichever cuts a row has: a row samples alike in any batch.
    probs = x.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = upload(uniforms, device, torch.float64)[index, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True)  # the first token whose cdf passes the draw
    last_kept = (probs > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # a draw rounded up to the total
    picked = torch.minimum(picked, last_kept)[:, 0]
    return tokens.index_put((index,), torch.where(bad, -1, picked))


SEEN_BYTES_PER_TOKEN = 5  # SeenTokens' bytes per batch slot and vocabulary entry


class SeenTokens:
    """The penalized requests' tokens on the device, a row per batch slot (the engine's block-table row): how often
    each token was generated, and which the prompt holds. A row is filled once, when its request first samples with
    penalties (`fill`), and each step's draws are counted into their rows on the device (`count`), so a step's
    penalties cost no work per token of a prompt or an output, and nothing of them waits for the host: a step can be
    planned before the tokens of the step before are known (the engine's async scheduling). Rows × vocabulary × 5
    bytes (256 rows of a 128k vocabulary: 164 MB), made with the engine, before its KV pool is sized."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(rows, vocab, device=device)  # float32 (SEEN_BYTES_PER_TOKEN: 4 + 1 with in_prompt)
        self.in_prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def fill(self, row: int, prompt: list[int], generated: list[int]) -> None:
        """Row `row` for a request with this prompt that has generated these tokens (whatever the row held)."""
        device = self.counts.device
        self.counts[row] = 0
        if generated:
            ones = torch.ones(len(generated), device=device)
            self.counts[row].index_add_(0, upload(generated, device, torch.int64), ones)
        self.in_prompt[row] = False
        self.in_prompt[row, upload(prompt, device, torch.int64)] = True

    def count(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count token `tokens[i]` once more in row `rows[i]` (both on the device); a failed draw (-1) counts none."""
        flat = rows * self.counts.shape[1] + tokens.clamp(min=0)  # a scatter: atomic adds, no sort, no host read
        self.counts.view(-1).scatter_add_(0, flat, (tokens >= 0).float())


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], seen: SeenTokens | None, rows: list[int | None]
) -> torch.Tensor:
    """Logits [B, V] (as float32) with each penalized row's adjustments applied in vLLM's order: its logit biases
    added; the repetition penalty r on every token of its prompt or its output (a positive logit divided by r, any
    other multiplied by it); then, over its generated tokens only (row `rows[i]` of `seen`), the frequency penalty
    times each token's count and the presence penalty once for each token that occurs (OpenAI's formula). Other
    rows are left as they are."""
    out = logits.to(torch.float32, copy=True)
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if not penalized:
        return out
    device = logits.device
    index = upload(penalized, device, torch.int64)
    x = out[index]
    chosen = [params[i] for i in penalized]
    biases: dict[tuple[int, int], float] = {}  # summed here: the same sum in any order (ranks sample alike)
    for r, p in enumerate(chosen):
        for token, bias in p.logit_bias:
            biases[r, token] = biases.get((r, token), 0.0) + bias
    if biases:
        r, token = (upload(c, device, torch.int64) for c in zip(*biases))
        x[r, token] += upload(list(biases.values()), device, torch.float32)
    slots = upload([rows[i] for i in penalized], device, torch.int64)
    counts = seen.counts[slots]
    if any(p.repetition_penalty != 1 for p in chosen):
        penalty = upload([p.repetition_penalty for p in chosen], device, torch.float32)[:, None]
        repeated = seen.in_prompt[slots] | (counts > 0)
        x = torch.where(repeated, torch.where(x > 0, x / penalty, x * penalty), x)
    frequency = upload([p.frequency_penalty for p in chosen], device, torch.float32)[:, None]
    presence = upload([p.presence_penalty for p in chosen], device, torch.float32)[:, None]
    out[index] = x - frequency * counts - presence * (counts > 0)
    return out


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the device, from logits [B, V] and a token per row [B] (a failed draw's -1 reads token 0): each token's
    log-probability [B] and the k likeliest tokens' [B, k] with their ids [B, k]: one log-softmax (float32) and one
    top-k for all rows, nothing read on the host (a step planned ahead reports them too)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return chosen, values, ids


def logprob_entries(
    tokens: list[int], chosen: list[float], values: list[list[float]], ids: list[list[int]], counts: list[int]
) -> list[TokenLogprobs]:
    """`logprob_rows`' rows (as lists) as entries: row i with its `counts[i]` likeliest tokens."""
    return [
        TokenLogprobs(token, lp, tuple(zip(ids[i][:n], values[i][:n])))
        for i, (token, lp, n) in enumerate(zip(tokens, chosen, counts))
    ]


def token_logprobs(logits: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TokenLogprobs]:
    """Row i's token `tokens[i]` with its log-probability and the `counts[i]` most likely tokens with theirs, from
    logits [B, V]."""
    rows = logprob_rows(logits, torch.tensor(tokens, device=logits.device), max(counts))
    return logprob_entries(tokens, *(t.tolist() for t in rows), counts)


class TextStream:
    """Generated token ids → text deltas, with stop strings, in constant work per token.

    Byte-level BPE merges bytes across token boundaries, and SentencePiece-style decoders strip a leading
    space from the first token, so tokens cannot be decoded one by one. As vLLM does, each step decodes only a
    short window: the tokens since the last emitted text (`ids[prefix:]`), minus the same window without the
    new tokens (`ids[prefix:read]`); both start at the same token, so their difference is exactly the new
    text, unless it ends in an unfinished UTF-8 character (U+FFFD), which waits for the next token.

    A stop string ends the text before it. Text that could still grow into a stop string is held back
    (`held`) until the next token decides it; a stop string can only start in held-back or new text, so the
    search covers only that, never the whole text.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()) -> None:
        if stop and tokenizer is None:
            raise UserError("stop strings need a tokenizer")
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to text already handed to `held` or sent
        self.held = ""  # decoded text not sent yet: it could be the start of a stop string

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text safe to send, whether a stop string ended the text)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        self.held += self._decode_new()
        cut = self._first_stop(self.held)
        if cut >= 0:
            text, self.held = self.held[:cut], ""
            return text, True
        keep = 0
        for k in range(min(self.longest - 1, len(self.held)), 0, -1):
            if any(s.startswith(self.held[-k:]) for s in self.stop):
                keep = k
                break
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text, False

    def flush(self) -> tuple[str, bool]:
        """The rest of the text, when generation ends for another reason than a stop string seen so far (an
        unfinished character included, as U+FFFD), and whether a stop string ended it after all: the last token's
        text, held back while it ended inside a character, is searched too."""
        if self.tokenizer is None:
            return "", False
        text, self.held = self.held + self._decode_new(final=True), ""
        cut = self._first_stop(text)
        return (text, False) if cut < 0 else (text[:cut], True)

    def _first_stop(self, text: str) -> int:
        return min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)

    def _decode_new(self, final: bool = False) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""  # nothing new yet (a special token, or half a character)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]
