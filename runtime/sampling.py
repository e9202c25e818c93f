"""What a request asks for and what comes back: sampling parameters, prompt checks, sampling, and text streaming
with stop strings. Shared by the engine (runtime/engine.py), the offline generator (runtime/generate.py) and the
HTTP server (runtime/server.py), so all three accept, sample and stop the same way.

Sampling is greedy (temperature 0) or temperature / top-k / top-p from a seeded generator per request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tessera.errors import UserError, UserFileNotFound


class ContextLengthError(UserError):
    """A prompt that leaves no room in the model's context window."""


class SamplingError(UserError):
    """Sampling parameters that cannot sample; `field` names the parameter (SamplingParams' name for it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. Checked here, once, for every entry point (CLI, server, Python): a value that
    cannot sample (NaN, inf, a seed the generator refuses) is refused with the field named."""

    max_new_tokens: int | None = 64  # None: to the end of the context
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and _integer("max_new_tokens", self.max_new_tokens) < 1:
            raise SamplingError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if _integer("top_k", self.top_k) < 0:
            raise SamplingError("top_k", f"must be >= 0, got {self.top_k}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise SamplingError(name, f"expected a finite number, got {value!r}")
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
        return replace(self, seed=int(torch.randint(0, 2**31 - 1, ()).item()))


def _integer(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # a bool is an int to Python, not to a request
        raise SamplingError(name, f"expected an integer, got {value!r}")
    return value


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # None when generating from token ids without a tokenizer
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


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
    return max(longest, *added)


class PromptEncoder:
    """Prompts, as text or token ids, to checked token ids: the one place a prompt is read (the server, the
    engine, `Generator`). A prompt must be valid Unicode, non-empty, inside the vocabulary and leave room to
    generate in `context` tokens (`limit` names where that number comes from)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, context: int, limit: str = "max_model_len"):
        self.tokenizer, self.vocab_size, self.context, self.limit = tokenizer, vocab_size, context, limit
        # A text of more characters than token_bytes x context cannot fit (a character is at least a byte): refused
        # without tokenising, which takes seconds of a core for a 1 MB prompt.
        self.token_bytes = max_token_bytes(tokenizer) if tokenizer is not None else None

    def __call__(self, prompt: str | list[int], what: str = "the prompt") -> list[int]:
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
            tokens = self.tokenizer.encode_batch([prompt])[0].ids
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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V].

    In float64, from logits shifted so their maximum is 0: any temperature SamplingParams accepts (1e-300
    included) gives finite probabilities, and the best token always keeps a share, whatever top-k and top-p cut.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature  # max 0, the rest <= 0 or -inf
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
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

    def flush(self) -> str:
        """The rest of the text, when generation ends for another reason than a stop string (an unfinished
        character included, as U+FFFD)."""
        if self.tokenizer is None:
            return ""
        text, self.held = self.held + self._decode_new(final=True), ""
        return text

    def _decode_new(self, final: bool = False) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""  # nothing new yet (a special token, or half a character)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]
