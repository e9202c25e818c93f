"""OpenAI-compatible HTTP server over the continuous-batching engine: `tessera serve`.

Endpoints: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`, `POST /v1/chat/completions` (JSON
or SSE streaming, `stream_options.include_usage`), `GET /health`, and Prometheus `GET /metrics`. The wire format
follows OpenAI's API reference (the `openai` client is the test client); `top_k` and `ignore_eos` are accepted as
vLLM's extensions, so vLLM's benchmark conventions work unchanged.

Every bad request gets HTTP 400 (404 for an unknown model or route, 405 for a wrong method, 413 for a body
past `max_request_bytes`, read by the `BodyLimit` middleware before the body is) with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, and the server keeps serving. Unknown fields are refused
by name rather than silently ignored, and fields we accept but cannot honour (`suffix`, `best_of` past 1)
are refused with the reason: a client never gets an answer to a question it did not ask.

A watcher on each request's connection aborts its engine requests the moment the client goes away, so a
disconnected stream frees its batch slot and KV pages before the next engine step (a whole answer's client that
left counts as status 499 in the metrics, nginx's "client closed request": not the server's failure). On shutdown
the server stops accepting and lets in-flight requests finish for `graceful_timeout` seconds; then the engines end
the rest (reason "abort": a stream's error event, a whole answer's 503), whose answers get ABORT_DELIVERY_S more to
go out before uvicorn cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import jinja2.sandbox
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from tokenizers import Tokenizer

from tessera.config import ConfigError, read_json
from tessera.errors import UserError
from tessera.runtime.async_engine import AsyncEngine, EngineSpec, RequestStream
from tessera.runtime.engine import CapacityError, EngineConfig, EngineRequest, RequestOutput
from tessera.runtime.sampling import (
    MAX_LOGPROBS,
    ContextLengthError,
    SamplingError,
    SamplingParams,
    TokenBytes,
    TokenLogprobs,
)

# Used when the tokenizer config has no chat_template: one "role: content" line per message, then the
# assistant's turn. Documented in docs/serving.md.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# A request body may hold one prompt that fills the context, as text or token ids: 32 bytes a token is ~8
# characters of text a token, or ids of up to 30 digits; never below 1 MiB. Larger bodies get a 413 before
# they are read (a 50 MB body once took the process from 345 MB to 4.6 GB).
BODY_BYTES_PER_TOKEN = 32
MIN_BODY_BYTES = 2**20
# SamplingParams' field names as the API spells them.
API_FIELDS = {"max_new_tokens": "max_tokens"}
CLIENT_CLOSED = "499"  # a whole answer's client left before it was ready (nginx's status), as the metrics count it
# At shutdown, how long the answers of the requests the engines ended (after the grace period) get to go out.
ABORT_DELIVERY_S = 5.0


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # OpenAI types every other client error (405, 413, ...) as an invalid request
    kind = {404: "not_found_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets a 413 before it is read into memory
    (by its Content-Length), or as soon as it outgrows the limit (a chunked body). The body is read here
    and handed on in one piece; later receive calls (the disconnect watcher's) go to the client."""

    def __init__(self, app, limit: int, on_refused=None) -> None:
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, send)
            if not message.get("more_body", False):
                break
        first = {"type": "http.request", "body": bytes(body), "more_body": False}
        del body

        async def replay():
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        if self.on_refused is not None:
            self.on_refused(scope["path"])
        message = f"the request body is larger than this server's limit of {self.limit} bytes"
        await JSONResponse(error_body(413, message), status_code=413, headers={"Connection": "close"})(
            scope, None, send
        )


# Request bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Strict: "5" is not a number, 1.5 is not a token count."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)  # vLLM extension; 0 (or vLLM's -1): no cut
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)  # vLLM extension; 1: none
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]
    user: str | None = None  # accepted and ignored, as OpenAI uses it only for abuse monitoring
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI reads null as "the default" for an optional field (the official client sends temperature=None
        when the caller leaves it so): such a field given null takes its default. A required field stays null,
        and is refused as such."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    def check_supported(self) -> None:
        if self.n < 1:
            raise APIError(400, f"n: must be >= 1, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")

    def logprob_count(self) -> int | None:
        """How many likeliest tokens each generated token's log-probability comes with (None: no log-probabilities):
        the endpoints spell it each their own way."""
        raise NotImplementedError

    def prompt_logprob_count(self) -> int | None:
        """The same for the prompt's tokens (None: not scored)."""
        return None

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs: its keys must be token ids."""
        biases = []
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\s*[0-9]{1,10}\s*", key):
                raise APIError(400, f"logit_bias: keys are token ids, got {key[:40]!r}", "logit_bias")
            biases.append((int(key), bias))
        return tuple(biases)

    def max_tokens_field(self) -> str:
        """The name the client gave the token limit by (errors about it name it so)."""
        return "max_tokens"

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", "stop")
        return tuple(s for s in stops if s)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's, and this many likeliest (0: none)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value: Any) -> Any:
        """Clients of the legacy API send `logprobs: false` for none (true is no count: refused)."""
        return None if value is False else value

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of: only 1 is supported", "best_of")
        if self.suffix:
            raise APIError(400, "suffix: not supported by this server", "suffix")

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:  # echo: the prompt comes back, scored when logprobs are asked for
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id...: passed to the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False  # each generated token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # and this many likeliest tokens' (needs logprobs)

    def check_supported(self) -> None:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        super().check_supported()

    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ClientGone(Exception):
    """The client disconnected before its answer was complete (Server._merge)."""


class Vocabulary:
    """Tokens as log-probability entries name them, each decoded once: `text`, the token's own text (special tokens
    too; a token holding part of a UTF-8 character shows U+FFFD, as in vLLM), and `bytes`, its own bytes (that part
    of the character: runtime.sampling.TokenBytes)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._bytes = TokenBytes(tokenizer) if tokenizer is not None else None
        self._texts: dict[int, str] = {}
        self._raw: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def bytes(self, token_id: int) -> bytes:
        raw = self._raw.get(token_id)
        if raw is None:
            raw = self._raw[token_id] = self._bytes(token_id)
        return raw


async def _prompt_only(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of a prompt scored alone (completions' echo with max_tokens 0) without the token generated to
    score it: no text, no entry, no completion token, finished for "length" (as vLLM answers it)."""
    async with contextlib.aclosing(outputs):
        async for index, out in outputs:
            if not (out.error or out.finish_reason == "abort"):
                reason = "length" if out.finished else None
                out = replace(out, token_ids=[], text="", completion_tokens=0, logprobs=None, finish_reason=reason)
            yield index, out


# Response formats


def _with_own(top: dict[str, float], text: str, logprob: float) -> dict[str, float]:
    """A token's likeliest (text -> log-probability) with its own entry added: a likelier token of the same text (two
    partial UTF-8 characters both show U+FFFD) keeps its value."""
    top.setdefault(text, logprob)
    return top


class ResponseFormat:
    """What OpenAI's text-completion responses spell one way and chat responses another. `logprobs`: a choice's
    (or a chunk's) token log-probabilities, in the endpoint's form, or None."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def delta(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return self.choice(index, text, reason, logprobs)

    def logprobs(self, entries: list[TokenLogprobs], vocab: Vocabulary, offset: int) -> dict:
        """The legacy completions form: parallel lists, each token's text offset counted from `offset` (the
        characters of the choice's tokens before these). A token's likeliest tokens include itself, as OpenAI's
        and vLLM's do ("up to logprobs + 1" of them)."""
        texts = [vocab.text(e.token_id) for e in entries]
        offsets = list(itertools.accumulate(map(len, texts[:-1]), initial=offset))[: len(texts)]
        top = [
            None if e.logprob is None else _with_own({vocab.text(t): lp for t, lp in e.top}, text, e.logprob)
            for e, text in zip(entries, texts)
        ]
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def opening(self, n: int) -> list[dict]:
        """Stream chunks sent before any text."""
        return []


class ChatFormat(ResponseFormat):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": reason,
        }

    def delta(self, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def logprobs(self, entries: list[TokenLogprobs], vocab: Vocabulary, offset: int) -> dict:
        """The chat form: one entry per token with its text, its own bytes and the likeliest tokens'."""

        def token(token_id: int, logprob: float) -> dict:
            return {"token": vocab.text(token_id), "logprob": logprob, "bytes": list(vocab.bytes(token_id))}

        return {
            "content": [{**token(e.token_id, e.logprob), "top_logprobs": [token(*t) for t in e.top]} for e in entries]
        }

    def opening(self, n: int) -> list[dict]:  # each choice's role first, as OpenAI sends it
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)
        ]


TEXT, CHAT = ResponseFormat(), ChatFormat()


# Metrics


class Metrics:
    """Prometheus metrics of one server (its own registry, so two servers in a process do not collide)."""

    def __init__(self, engine: AsyncEngine) -> None:
        disable_created_metrics()  # the *_created series only restate the start time
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tessera_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("tessera_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("tessera_generation_tokens", "tokens generated", registry=r)
        Gauge("tessera_requests_running", "requests in the running batch", registry=r).set_function(
            lambda: engine.running
        )
        Gauge("tessera_requests_waiting", "requests queued for a batch slot or KV pages", registry=r).set_function(
            lambda: engine.queue_depth
        )
        Gauge("tessera_kv_cache_usage", "share of KV pages in use", registry=r).set_function(lambda: engine.kv_usage)
        r.register(_EngineCounters(engine))
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        per_token = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "time to first token", buckets=latency, registry=r)
        self.tpot = Histogram(
            "tessera_time_per_output_token_seconds",
            "time per output token after the first",
            buckets=per_token,
            registry=r,
        )
        self.e2e = Histogram("tessera_e2e_request_latency_seconds", "request latency", buckets=latency, registry=r)


class _EngineCounters:
    """Counters the engines keep, read from their last reported state: `tessera_preemptions_total`, requests
    paused for want of KV pages (as vLLM's num_preemptions); `tessera_prefix_cache_queries_total` and
    `tessera_prefix_cache_hits_total`, the tokens of started requests looked up in the prefix cache and those
    found there (as vLLM's prefix_cache_queries and prefix_cache_hits: their ratio is the hit rate)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield CounterMetricFamily("tessera_preemptions", "requests paused for want of KV pages", engine.preemptions)
        yield CounterMetricFamily(
            "tessera_prefix_cache_queries", "tokens looked up in the prefix cache", engine.prefix_queries
        )
        yield CounterMetricFamily("tessera_prefix_cache_hits", "tokens found in the prefix cache", engine.prefix_hits)


@dataclass
class _Timing:
    """One request's clock, for the TTFT/TPOT histograms and usage."""

    start: float
    first: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    counts_prompt: bool = True  # the first choice of its prompt: the prompt's tokens are counted once, as in usage

    def record(self, metrics: Metrics) -> None:
        end = time.perf_counter()
        if self.counts_prompt:
            metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.generation_tokens.inc(self.completion_tokens)
        metrics.e2e.observe(end - self.start)
        if self.first is not None:
            metrics.ttft.observe(self.first - self.start)
            if self.completion_tokens > 1:
                metrics.tpot.observe((end - self.first) / (self.completion_tokens - 1))


# The application


def load_chat_template(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """The checkpoint's chat template and its special tokens (tokenizer_config.json's bos/eos_token);
    DEFAULT_CHAT_TEMPLATE when it has none. Where transformers looks, in its order: chat_template.jinja (what
    transformers >= 4.43 writes), then tokenizer_config.json's chat_template (a string, or the "default" of a list
    of named ones)."""
    path = Path(model_dir) / "tokenizer_config.json"
    config = read_json(path, "a tokenizer config", ConfigError) if path.is_file() else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    specials = {k: v for k, v in config.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{jinja}: cannot be read as UTF-8 text ({e})") from None
        compile_chat_template(template, str(jinja))
        return template, specials
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")
    if template is not None:
        compile_chat_template(template, f"{path}: chat_template")  # before any engine starts: the file's error
    return template or DEFAULT_CHAT_TEMPLATE, specials


def compile_chat_template(template: str, source: str = "chat template") -> jinja2.Template:
    """A chat template ready to render, sandboxed (it comes with a downloaded checkpoint) as transformers runs it;
    a ConfigError naming `source` when it does not compile."""
    # The options transformers renders with (loop controls: real templates `{% break %}` out of loops).
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{source} does not compile (line {e.lineno}: {e.message})") from None


def _raise_exception(message: str) -> None:
    raise APIError(400, f"chat template: {message}", "messages")


class Server:
    """The FastAPI app over one AsyncEngine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        chat_template: str = DEFAULT_CHAT_TEMPLATE,
        special_tokens: dict[str, str] | None = None,
        max_request_bytes: int | None = None,
    ) -> None:
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())
        self.template = compile_chat_template(chat_template)
        # A model's own template writes its special tokens (a BOS, say): its rendering is encoded without the
        # tokenizer's, as apply_chat_template and vLLM encode it. tessera's fallback writes none: the tokenizer
        # adds them, as it does to a completion prompt.
        self.template_writes_specials = chat_template != DEFAULT_CHAT_TEMPLATE
        self.special_tokens = special_tokens or {}
        self.vocab = Vocabulary(engine.tokenizer)
        self.metrics = Metrics(engine)
        self.max_request_bytes = max_request_bytes or max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * self.max_model_len)
        self.app = self._build_app()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def _count(self, path: str, status: str) -> None:
        """One answered request in the metrics, under its route's label and status."""
        self.metrics.requests.labels(self._route_label(path), status).inc()

    def _route_label(self, path: str) -> str:
        """A request's path as the metrics label it counts under: the template of the route that takes it, or
        "unmatched", so that clients sending paths of their choosing cannot add series without limit."""
        scope = {"type": "http", "path": path, "root_path": "", "method": "GET", "path_params": {}}
        return next((r.path for r in self.app.routes if r.matches(scope)[0] != Match.NONE), "unmatched")

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="tessera", lifespan=self._lifespan)
        app.add_middleware(
            BodyLimit,
            limit=self.max_request_bytes,
            on_refused=lambda path: self._count(path, "413"),
        )

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError) -> JSONResponse:
            self._count(request.url.path, str(e.status))
            return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
            first = e.errors()[0]
            where = [str(p) for p in first.get("loc", ()) if p != "body"]
            if first.get("type") == "json_invalid":
                message, param = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
            elif first.get("type") == "extra_forbidden":
                message, param = f"unknown field {'.'.join(where)!r}", where[-1] if where else None
            else:
                message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
                param = where[0] if where else None
            self._count(request.url.path, "400")
            return JSONResponse(error_body(400, message, param), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
            message = str(e.detail)
            if e.status_code in (404, 405):
                verb = "no route" if e.status_code == 404 else "method not allowed:"
                message = f"{verb} {request.method} {request.url.path}"
            self._count(request.url.path, str(e.status_code))
            return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

        @app.exception_handler(Exception)
        async def bug(request: Request, e: Exception) -> JSONResponse:  # logged with its traceback by uvicorn
            self._count(request.url.path, "500")
            return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.get("/v1/models/{model_id:path}")(self.model)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        yield
        await asyncio.to_thread(self.engine.shutdown)

    async def health(self) -> JSONResponse:
        """200 while every engine process runs; 503 once one has died (its requests failed)."""
        healthy = self.engine.healthy
        body = {
            "status": "ok" if healthy else "engine process exited",
            "model": self.model_name,
            "running": self.engine.running,
            "waiting": self.engine.queue_depth,
        }
        status = 200 if healthy else 503
        self._count("/health", str(status))
        return JSONResponse(body, status_code=status)

    async def prometheus(self) -> PlainTextResponse:
        self._count("/metrics", "200")  # before the scrape, which then counts itself
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tessera",
            "max_model_len": self.max_model_len,
        }

    async def models(self) -> dict:
        self._count("/v1/models", "200")
        return {"object": "list", "data": [self._card()]}

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            message = f"the model {name!r} does not exist; this server serves {self.model_name!r}"
            raise APIError(404, message, "model", "model_not_found")

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        self._count(f"/v1/models/{model_id}", "200")
        return self._card()

    # Shared by both endpoints: a request is read and checked once, here, then trusted downstream

    def _sampling(self, body: _Sampling, default_max: int | None) -> SamplingParams:
        """The body's sampling parameters, checked (the cheap checks, before any prompt is read)."""
        if body.model is not None:
            self._check_model(body.model)
        body.check_supported()
        try:
            return SamplingParams(
                max_new_tokens=body.max_tokens if body.max_tokens is not None else default_max,
                temperature=body.temperature,
                top_k=max(body.top_k, 0),  # vLLM's -1 is our 0: no cut
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop_strings(),
                ignore_eos=body.ignore_eos,
                logprobs=body.logprob_count(),
                prompt_logprobs=body.prompt_logprob_count(),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=body.token_biases(),
            )
        except SamplingError as e:
            field = API_FIELDS.get(e.field, e.field)
            if field == "max_tokens":
                field = body.max_tokens_field()
            raise APIError(400, f"{field}{str(e).removeprefix(e.field)}", field) from e

    def _encode(self, prompt: str | list[int], param: str, what: str = "the prompt", chat: bool = False) -> list[int]:
        """A prompt's checked token ids (in a worker thread: tokenising a long text takes a while). A chat rendered
        by the model's own template is encoded without the tokenizer's special tokens: the template wrote them."""
        try:
            return self.engine.encode(prompt, what, special_tokens=not (chat and self.template_writes_specials))
        except ContextLengthError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from e
        except UserError as e:
            raise APIError(400, str(e), param) from e

    def _render(self, messages: list[dict]) -> str:
        """The chat's prompt: the template rendered with the messages (in a worker thread too)."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except APIError:  # the template's own raise_exception
            raise
        except Exception as e:  # the messages the client sent broke it (e.g. a field of a type it cannot iterate)
            raise APIError(400, f"chat template: {type(e).__name__}: {e}", "messages") from e

    def _admit(self, request_id: str, prompt: list[int], params: SamplingParams, body: _Sampling) -> EngineRequest:
        """A request checked against the engines' limits; an explicit max_tokens past the context is refused
        (OpenAI's behaviour), a default one is cut to the context."""
        try:
            return self.engine.admit(request_id, prompt, params, body.max_tokens is not None)
        except ContextLengthError as e:
            raise APIError(400, str(e), body.max_tokens_field(), "context_length_exceeded") from e
        except CapacityError as e:
            raise APIError(400, str(e), body.max_tokens_field()) from e
        except SamplingError as e:
            raise APIError(400, str(e), e.field) from e
        except UserError as e:
            raise APIError(400, str(e), "stop") from e

    async def _serve(
        self,
        request: Request,
        body: _Sampling,
        read: Callable[[], list[list[int]]],
        default_max: int | None,
        form: ResponseFormat,
        echo: Callable[[int, list[int]], str] | None = None,
        prompt_only: bool = False,
    ):
        """Check the request, read its prompts (`read`, off the event loop), queue them all (or none: every
        check comes first) and answer, streamed or whole. `echo(i, ids)`: prompt i's text, which each of its choices
        then starts with (OpenAI's echo). prompt_only: the generated tokens left out of the answer (_prompt_only)."""
        params = self._sampling(body, default_max)
        prompts = await asyncio.to_thread(read)
        n = body.n
        if len(prompts) * n > self.engine.max_batch:
            raise APIError(
                400,
                f"n: {n} choices of {len(prompts)} prompt(s) are {len(prompts) * n} sequences; this server runs at "
                f"most {self.engine.max_batch} (the batch size) for one request",
                "n",
            )
        rid = f"{form.id_prefix}-{uuid.uuid4().hex}"
        # Choice i·n + j is prompt i's j-th (OpenAI's order). With a seed, choice j draws from seed + j (as vLLM's
        # parallel sampling): the choices differ, and each is reproducible. Those that one engine serves share their
        # prompt's K/V pages (prefix caching), computed once.
        choice_params = [
            replace(params, seed=(params.seed + j) % 2**64) if j and params.seed is not None else params
            for j in range(n)
        ]
        checked = [
            self._admit(f"{rid}-{i * n + j}", p, choice_params[j], body)
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        try:
            streams = [self.engine.submit(r) for r in checked]
        except RuntimeError as e:  # shutting down, or no engine left
            raise APIError(503, str(e)) from e
        outputs = self._merge(request, streams, n)
        if prompt_only:
            outputs = _prompt_only(outputs)
        echoes = None if echo is None else [echo(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        if body.stream:  # answered 200 once the stream starts; a whole answer once it is complete
            self._count(request.url.path, "200")
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self._events(outputs, len(streams), rid, form, include_usage, n, echoes),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            answer = await self._whole(outputs, len(streams), rid, form, n, echoes)
        except ClientGone:
            self._count(request.url.path, CLIENT_CLOSED)
            return Response(status_code=int(CLIENT_CLOSED))  # to no one
        self._count(request.url.path, "200")
        return answer

    async def _merge(
        self, request: Request, streams: list[RequestStream], per_prompt: int
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of all streams as the engine produces them (`per_prompt` choices of each prompt,
        consecutive). Every stream is aborted when the client disconnects (raising ClientGone) or the consumer stops
        early (closing this generator)."""
        merged: asyncio.Queue = asyncio.Queue()
        start = time.perf_counter()
        timings = [_Timing(start, counts_prompt=i % per_prompt == 0) for i in range(len(streams))]

        async def pump(index: int, stream: RequestStream) -> None:
            async for out in stream:
                await merged.put((index, out))

        async def watch() -> None:  # the client is gone: http.disconnect arrives on the receive channel
            while (await request.receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        watcher = asyncio.create_task(watch())
        remaining, getter = len(streams), None
        try:
            while remaining:
                getter = asyncio.ensure_future(merged.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    raise ClientGone  # the finally below aborts everything
                index, out = getter.result()
                t = timings[index]
                if out.token_ids and t.first is None:
                    t.first = time.perf_counter()
                t.prompt_tokens, t.completion_tokens = out.prompt_tokens, out.completion_tokens
                if out.finished:
                    remaining -= 1
                    t.record(self.metrics)
                yield index, out
        finally:  # also when the response task is cancelled mid-wait: no task may be left waiting forever
            if getter is not None:
                getter.cancel()
            watcher.cancel()
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.abort()

    def _usage(self, outs: dict[int, RequestOutput], n: int) -> dict:
        """OpenAI's usage, with the prompt tokens found in the prefix cache as `prompt_tokens_details.cached_tokens`:
        a prompt's tokens counted once whatever its number of choices `n` (its first choice's figures)."""
        firsts = [o for index, o in outs.items() if index % n == 0]
        prompt = sum(o.prompt_tokens for o in firsts)
        completion = sum(o.completion_tokens for o in outs.values())
        cached = sum(o.cached_tokens for o in firsts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _whole(
        self,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        n: int,
        rid: str,
        form: ResponseFormat,
        per_prompt: int,
        echoes: list[str] | None,
    ) -> dict:
        """The non-streamed answer: every choice's whole text (n in all, `per_prompt` for each prompt), after its
        prompt's when `echoes` gives them."""
        texts, finals, logprobs = echoes or [""] * n, {}, [None] * n
        async with contextlib.aclosing(outputs):
            async for index, out in outputs:
                if out.error:
                    raise APIError(500, out.error)
                texts[index] += out.text
                if out.prompt_logprobs is not None:  # first: the entries of an echoed prompt
                    logprobs[index] = list(out.prompt_logprobs)
                if out.logprobs is not None:
                    logprobs[index] = logprobs[index] or []
                    logprobs[index].extend(out.logprobs)
                if out.finished:
                    finals[index] = out
        if len(finals) < n or any(o.finish_reason == "abort" for o in finals.values()):
            raise APIError(503, "the request was cancelled (the server is shutting down)")

        def choices() -> list[dict]:
            return [
                form.choice(i, texts[i], finals[i].finish_reason, self._logprobs(form, logprobs[i], 0))
                for i in range(n)
            ]

        return {
            "id": rid,
            "object": form.object,
            "created": int(time.time()),
            "model": self.model_name,
            # Long log-probability lists (an echoed prompt's) are formatted off the event loop.
            "choices": await asyncio.to_thread(choices) if any(lp for lp in logprobs) else choices(),
            "usage": self._usage(finals, per_prompt),
        }

    async def _events(
        self,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        n: int,
        rid: str,
        form: ResponseFormat,
        include_usage: bool,
        per_prompt: int,
        echoes: list[str] | None,
    ) -> AsyncIterator[str]:
        """The streamed answer: SSE chunks as the engine produces text, then the usage chunk and [DONE] (n choices
        in all, `per_prompt` for each prompt); with `echoes`, a choice's first chunk is its prompt's text (with its
        prompt's log-probabilities when asked for)."""
        created, finals, offsets, echoed = int(time.time()), {}, [0] * n, set()

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            data = {
                "id": rid,
                "object": form.chunk_object,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async with contextlib.aclosing(outputs):
            for choice in form.opening(n):
                yield chunk([choice])
            try:
                async for index, out in outputs:
                    if out.error or out.finish_reason == "abort":
                        message = out.error or "the request was cancelled (the server is shutting down)"
                        yield f"data: {json.dumps(error_body(500 if out.error else 503, message))}\n\n"
                        return
                    if echoes is not None and index not in echoed:  # its first output: the prompt's entries, if asked
                        echoed.add(index)  # a long prompt's entries are formatted off the event loop
                        scored = await asyncio.to_thread(self._logprobs, form, out.prompt_logprobs, 0)
                        yield chunk([form.delta(index, echoes[index], None, scored)])
                        offsets[index] = await asyncio.to_thread(self._text_length, out.prompt_logprobs)
                    reason = out.finish_reason if out.finished else None
                    # A token's log-probability goes out with it, though a stop string may hold its text back a while.
                    logprobs = self._logprobs(form, out.logprobs or None, offsets[index])
                    if out.text or reason or logprobs:
                        yield chunk([form.delta(index, out.text, reason, logprobs)])
                    offsets[index] += self._text_length(out.logprobs)
                    if out.finished:
                        finals[index] = out
            except ClientGone:
                return  # no one left to tell
        if include_usage:
            yield chunk([], self._usage(finals, per_prompt))
        yield "data: [DONE]\n\n"

    def _logprobs(self, form: ResponseFormat, entries: list[TokenLogprobs] | None, offset: int) -> dict | None:
        return None if entries is None else form.logprobs(entries, self.vocab, offset)

    def _text_length(self, entries: list[TokenLogprobs] | None) -> int:
        return sum(len(self.vocab.text(e.token_id)) for e in entries or ())

    # Endpoints

    async def completions(self, body: CompletionRequest, request: Request):
        prompt = body.prompt
        one = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
        prompts = [prompt] if one else list(prompt)
        if not prompts:
            raise APIError(400, "prompt: no prompt given", "prompt")
        if len(prompts) > self.engine.max_batch:
            raise APIError(
                400,
                f"prompt: at most {self.engine.max_batch} prompts a request (the batch size), got {len(prompts)}",
                "prompt",
            )
        names = ["the prompt"] if one else [f"prompt {i}" for i in range(len(prompts))]

        def echo(i: int, ids: list[int]) -> str:  # the prompt as sent; one of token ids, decoded
            return (
                prompts[i]
                if isinstance(prompts[i], str)
                else self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            )

        # `echo` with max_tokens 0 scores the prompt alone (older evaluation harnesses send it): as vLLM does, one
        # token is generated, then dropped from the answer.
        prompt_only = body.echo and body.max_tokens == 0
        return await self._serve(
            request,
            body.model_copy(update={"max_tokens": 1}) if prompt_only else body,
            lambda: [self._encode(p, "prompt", name) for p, name in zip(prompts, names)],
            COMPLETION_DEFAULT_MAX_TOKENS,
            TEXT,
            echo if body.echo else None,
            prompt_only,
        )

    async def chat_completions(self, body: ChatRequest, request: Request):
        messages = []
        for m in body.messages:
            content = (
                m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            )
            messages.append({**m.model_dump(exclude_none=True), "content": content or ""})
        # Chat defaults to the rest of the context (max_new_tokens None).

        def encode() -> list[list[int]]:
            return [self._encode(self._render(messages), "messages", "the chat prompt", chat=True)]

        return await self._serve(request, body, encode, None, CHAT)


def engine_spec(
    model_dir: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    max_batch: int = 16,
    max_model_len: int | None = None,
    kv_cache_bytes: int | None = None,
    threads: int | None = None,
    tensor_parallel_size: int = 1,
    torchrun: bool = False,
    kv_cache_dtype: str = "auto",
    page_size: int | None = None,
    prefix_caching: bool = True,
    async_scheduling: bool | None = None,
) -> EngineSpec:
    """How the server's engine processes build their engine, checked here first, so a bad checkpoint or flag
    fails with its own error before any process starts (`torchrun`: the ranks are torchrun's, EngineSpec)."""
    from tessera.config import ArchConfig
    from tessera.devices import parse_dtype
    from tessera.runtime.loader import checkpoint_dir

    parse_dtype(dtype)
    ArchConfig.from_json(checkpoint_dir(model_dir) / "config.json")
    if tensor_parallel_size > 1:
        from tessera.runtime.parallel import check_ranks, torchrun_local

        local = torchrun_local()[1] if torchrun else None
        check_ranks(model_dir, tensor_parallel_size, device, local)
    config = EngineConfig(
        max_batch=max_batch,
        max_model_len=max_model_len,
        kv_cache_bytes=kv_cache_bytes,
        kv_cache_dtype=kv_cache_dtype,
        page_size=page_size,
        prefix_caching=prefix_caching,
        async_scheduling=async_scheduling,
    )
    return EngineSpec(str(model_dir), str(device), dtype, config, threads, tensor_parallel_size, torchrun)


def build_server(
    model_dir: str | Path,
    served_model_name: str | None = None,
    data_parallel_size: int = 1,
    max_request_bytes: int | None = None,
    **engine_args: Any,
) -> Server:
    """The server of a checkpoint (config.json, safetensors, tokenizer.json): its engine processes start here,
    each loading the checkpoint, and this returns once all are ready. `engine_args`: `engine_spec`'s (device,
    dtype, max_batch, ...), checked there first."""
    spec = engine_spec(model_dir, **engine_args)
    template, specials = load_chat_template(model_dir)  # its errors before any engine process starts
    name = served_model_name or Path(model_dir).resolve().name
    engine = AsyncEngine(spec, data_parallel_size).start()
    try:
        return Server(engine, name, template, specials, max_request_bytes)
    except BaseException:
        engine.shutdown()  # started engine processes would otherwise outlive the error
        raise


LISTEN_BACKLOG = 2048  # uvicorn's default


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on host:port for `run`, made before the engines load (minutes, for a large model), so an
    address in use or a host that is not this machine's is said at once, naming the flag. Every address the host
    resolves to, as asyncio's create_server binds them (`localhost`: 127.0.0.1 and ::1; "" every interface),
    skipping those this machine does not have."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address of this machine ({e})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # an address family this machine lacks (IPv6 turned off)
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart need not wait
            if family == socket.AF_INET6:  # the IPv4 address is a socket of its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)  # listening now: another server cannot take the port meanwhile
            except OSError as e:
                if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):  # not an address of this machine
                    sockets.pop().close()
                    continue
                flag = "--port" if e.errno == errno.EADDRINUSE else "--host/--port"
                raise UserError(f"{flag}: cannot listen on {host}:{port} ({e.strerror})") from None
        if not sockets:
            raise UserError(f"--host {host}: not an address of this machine")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def addresses(sockets: list[socket.socket]) -> str:
    """Where `sockets` listen, as URLs (the port chosen for --port 0 included)."""
    urls = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        urls.append(f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}")
    return ", ".join(urls)


def run(server: Server, sockets: list[socket.socket], graceful_timeout: float = 10.0) -> None:
    """Serve on `sockets` (listening_sockets) until SIGINT/SIGTERM: in-flight requests get `graceful_timeout`
    seconds to finish."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's shutdown, except that requests still running `graceful_timeout` seconds in are ended by the
        engines (reason "abort": a stream's error event, a whole answer's 503) instead of being cancelled in the
        middle of their answers (a cut stream, a plain-text 500): uvicorn's own limit comes ABORT_DELIVERY_S later."""

        async def shutdown(self, sockets=None) -> None:
            async def end_the_rest() -> None:
                await asyncio.sleep(graceful_timeout)
                await asyncio.to_thread(server.engine.shutdown)

            ender = asyncio.create_task(end_the_rest())
            try:
                await super().shutdown(sockets)
            finally:
                ender.cancel()

    config = uvicorn.Config(
        server.app,
        log_level="info",
        timeout_graceful_shutdown=graceful_timeout + ABORT_DELIVERY_S,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the previous handler:
    # make both a KeyboardInterrupt, caught here, so a requested shutdown exits 0 without a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            GracefulServer(config).run(sockets=sockets)
    finally:  # also when uvicorn exits without its lifespan's shutdown (a port in use): no engine outlives it
        server.engine.shutdown()
