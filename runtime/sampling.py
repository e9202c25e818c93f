"""What a request asks for and what comes back: sampling parameters, prompt checks, sampling, and text streaming
with stop strings. Shared by the engine (runtime/engine.py), the offline generator (runtime/generate.py) and the
HTTP server (runtime/server.py), so all three accept, sample and stop the same way.

Sampling is greedy (temperature 0) or temperature / top-k / top-p from a seeded generator per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer


class ContextLengthError(ValueError):
    """A prompt that leaves no room in the model's context window."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # None when generating from token ids without a tokenizer
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json (a Hugging Face fast tokenizer is needed for text)")
    return Tokenizer.from_file(str(file))


def encode_prompt(tokenizer: Tokenizer | None, prompt: str | list[int]) -> list[int]:
    """Token ids of a text prompt (through the tokenizer) or of one given as ids already."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or load tokenizer.json")
        return tokenizer.encode(prompt).ids
    return list(prompt)


def check_prompt(tokens: list[int], vocab_size: int, context: int, what: str, limit: str) -> None:
    """A prompt must be non-empty, inside the vocabulary, and leave room to generate in `context` tokens
    (`limit` names where that number comes from)."""
    if not tokens:
        raise ValueError(f"{what} is empty")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} has token id {bad}, outside the vocabulary [0, {vocab_size})")
    if len(tokens) >= context:
        raise ContextLengthError(
            f"{what} has {len(tokens)} tokens; the context is {context} tokens ({limit}), leaving no room to generate"
        )


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p (so the first always stays).
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStream:
    """Generated token ids → text deltas, with stop strings.

    The whole text is decoded again at each token (byte-level BPE merges across token boundaries, so pieces
    decoded alone would split characters); the part already sent is never changed. A stop string ends the
    text before it; a suffix that could still grow into a stop string, or an unfinished UTF-8 character
    (decoded as U+FFFD), is held back until the next token decides it.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (new text safe to send, whether a stop string ended the text)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._send(cut), True
        end = len(self.text.rstrip("\ufffd"))
        for k in range(min(max((len(s) for s in self.stop), default=1) - 1, end - self.sent), 0, -1):
            if any(s.startswith(self.text[end - k : end]) for s in self.stop):
                end -= k
                break
        return self._send(end), False

    def flush(self) -> str:
        """The rest of the text, when generation ends for another reason than a stop string."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta
