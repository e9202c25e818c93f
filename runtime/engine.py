"""Continuous batching over the heterogeneous model: the serving engine behind `tessera serve`.

Requests join and leave between steps. Each step packs, for every running request, the tokens whose K/V are
not cached yet: one token for a request that is decoding, a chunk of the prompt for one that is prefilling
(chunked prefill, as in Sarathi-Serve and vLLM v1). Decode tokens are scheduled first, so a long prompt
arriving never stalls the streams already running for more than one chunk; the step's token budget
(`max_step_tokens`) bounds the chunk. One forward pass and one paged-attention launch per layer serve the
whole mixed step (kernels/attention_paged.py).

The KV cache is a pool of pages (runtime/cache.PagedKVCache) sized per layer by that layer's KV-head count;
linear and no-op attention layers hold nothing. Its size comes from a memory budget (`kv_cache_bytes`), its
pages are 16 tokens unless `page_size` says otherwise. A request takes
pages as its tokens need them (its prompt's when it starts, one more at each page boundary as it decodes), so a
chat that leaves max_tokens to the context holds the pages of the tokens it has, not of a whole context. When
a running request needs a page and the pool has none, the request that started last is preempted: its pages
go back, and it waits first in line to be prefilled again with what it has generated (vLLM's recompute
preemption), so the oldest request always goes on. A waiting request starts, in FIFO order, when its tokens
fit with a page to spare for each running request that may still grow; one that could never fit (more pages
than the whole pool at its longest) is refused with a `CapacityError` when it is added. Each step's attention
metadata (block tables, lengths, where each token's K/V go) is built once (`_step_batch`) and read by every
layer.

Sampling is per request (temperature, top-k, top-p, its own random stream: a hash of its seed and how many
tokens it has sampled), all of a step's rows at once, so a request's draws do not depend on what else is in the
batch: its output served in a busy batch equals its output served alone wherever its logits do (on the CPU,
tested greedy and seeded; a GPU's GEMMs may round differently at another batch size).
Text is produced incrementally (`sampling.TextStream`): stop strings cut the text, and text that could still
become a stop string, or that ends inside a UTF-8 character, is held back until it is decided.

On CUDA, decode-only steps replay CUDA graphs captured at a few padded batch sizes (`DecodeGraphs`): a
decode step of a small model is dominated by launch overhead, which a graph replay removes.

On CUDA a step is also planned while the GPU runs the one before it (async scheduling, as vLLM's): `step` issues
step n + 1, its input tokens read on the device from step n's draw, before it waits for step n's tokens and turns
them into text, so the host's work per step (planning, text, outputs) overlaps the GPU's instead of adding to it.
Only a step every token of which can be planned without step n's tokens runs ahead (`_plan_ahead`): all running
requests decoding, none waiting, the pages there without a preemption (penalties count the draws on the device,
log-probabilities are computed there); a request
that step n's token ends (EOS, stop string) has its row in step n + 1 dropped. Nothing the host sends to the device
in between waits for it (`devices.upload`).

This is the only way tokens are produced: the HTTP server runs engines in processes of their own
(runtime/async_engine.py), `Generator` (runtime/generate.py) runs its requests through `Engine.run`, and the
search's cost model times `Engine.step` (search/cost.py).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from tessera import kernels
from tessera.devices import available_memory, check_fp8, dtype_name, upload
from tessera.errors import UserError
from tessera.kernels import cpu_layout
from tessera.runtime.cache import (
    PAGE_SIZE,
    STEP_TOKENS,
    BlockTables,
    PagedKVCache,
    kv_groups,
    page_hashes,
    prefix_pages,
    window_pages,
)
from tessera.runtime.model import Batch, Model
from tessera.runtime.sampling import (
    SEEN_BYTES_PER_TOKEN,
    Completion,
    ContextLengthError,
    PromptEncoder,
    SamplingError,
    SamplingParams,
    SeenTokens,
    TextStream,
    TokenLogprobs,
    apply_penalties,
    logprob_entries,
    logprob_rows,
    request_keys,
    request_uniforms,
    sample,
    token_logprobs,
)


class CapacityError(UserError):
    """A request that can never be served by this engine: more KV pages than the whole pool."""


KV_CACHE_DTYPES = ("auto", "fp8")
SCORED_ROWS = 256  # prompt positions scored through the LM head at once (logits of 256 x a 128k vocabulary: 128 MiB)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16  # requests running at once (decode batch size)
    max_model_len: int | None = None  # prompt + generated tokens; None: the model's max_position_embeddings
    kv_cache_bytes: int | None = None  # KV pool budget; None: room for max_batch requests of max_model_len
    page_size: int | None = None  # tokens per KV page; None: cache.PAGE_SIZE
    max_step_tokens: int = STEP_TOKENS  # tokens per forward pass (decode + prefill chunks); at least max_batch
    cuda_graphs: bool = True  # on CUDA, replay decode steps from graphs captured at padded batch sizes
    # "auto": K/V in the model's compute dtype; "fp8": E4M3 with per-layer scales (the model's calibrated ones,
    # Model.kv_scales, else 1.0): half the bytes of bf16, so twice the tokens in the same budget
    kv_cache_dtype: str = "auto"
    # Keep filled KV pages findable by the prefix they hold, so a prompt that starts as an earlier one did (a
    # system prompt, the turns of a chat so far) computes only what follows (runtime/cache.py). Only in a
    # model whose attention layers are all full attention, and only whole pages are shared
    prefix_caching: bool = True
    # Plan each decode step while the device runs the one before (vLLM's async scheduling), hiding the host's work
    # per step behind the GPU's. None: where that overlap exists, on CUDA (a CPU runs its ops as they are issued)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.page_size is not None and self.page_size < 1:
            raise UserError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UserError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it has finished. Built by
    the named constructors below."""

    request_id: str
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int  # sampled so far, an EOS token included
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort", "error"
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V a final output's request found cached (prefix caching)
    logprobs: list[TokenLogprobs] | None = None  # one per token sampled (an EOS that ends it too), when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None  # on a request's first output, when asked for

    @classmethod
    def progress(
        cls, request_id: str, token_ids: list[int], text: str, prompt_tokens: int, completion_tokens: int
    ) -> RequestOutput:
        """New tokens of a request that goes on."""
        return cls(request_id, token_ids, text, prompt_tokens, completion_tokens)

    @classmethod
    def final(
        cls,
        request_id: str,
        reason: str,
        token_ids: list[int],
        text: str,
        prompt_tokens: int,
        completion_tokens: int,
        error: str | None = None,
        cached_tokens: int = 0,
    ) -> RequestOutput:
        """The last output of a request: it finished for `reason` ("stop", "length", "abort" or "error")."""
        return cls(request_id, token_ids, text, prompt_tokens, completion_tokens, True, reason, error, cached_tokens)

    @classmethod
    def failure(cls, request_id: str, error: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> RequestOutput:
        """A request ended by an error outside its engine's step (its engine process died, say)."""
        return cls.final(request_id, "error", [], "", prompt_tokens, completion_tokens, error)


@dataclass(frozen=True)
class EngineRequest:
    """A request checked against an engine's limits (`EngineLimits.admit`): what an engine takes, and trusts."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    budget: int  # tokens it may generate: max_new_tokens, or less where the context ends first


@dataclass(frozen=True)
class EngineLimits:
    """What an engine can take: enough to check a request where the engine is not (the HTTP server's process
    checks requests before handing them to an engine process, which trusts them)."""

    vocab_size: int
    max_model_len: int
    page_size: int
    # Each KV group of the pool (layers of one attention window, runtime/cache.py): (usable pages, the most a
    # sequence holds there; None: as many as its tokens fill).
    groups: tuple[tuple[int, int | None], ...]
    has_tokenizer: bool
    max_batch: int

    @property
    def usable_pages(self) -> int:
        """KV pages of the whole pool (its first group's, as PagedKVCache.usable_pages)."""
        return self.groups[0][0]

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def admit(
        self, request_id: str, prompt: list[int], params: SamplingParams, exact_length: bool = False
    ) -> EngineRequest:
        """Check a request whose prompt a `PromptEncoder` of this context has read: how many tokens it may
        generate, and whether the pool can ever hold it. A `max_new_tokens` past the context is cut to the
        context, or refused with `exact_length` (an API client asked for exactly that many). Raises
        ContextLengthError, CapacityError or another UserError with a message meant for the client."""
        if params.stop and not self.has_tokenizer:
            raise UserError("stop strings need a tokenizer")
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise SamplingError("logit_bias", f"token {outside[0]} is outside the vocabulary of {self.vocab_size}")
        room = self.max_model_len - len(prompt)  # >= 1: the encoder checked the prompt
        asked = params.max_new_tokens
        if exact_length and asked is not None and asked > room:
            raise ContextLengthError(
                f"this model's context is {self.max_model_len} tokens; the prompt has {len(prompt)} and "
                f"{asked} more were asked for ({len(prompt) + asked} in all)"
            )
        budget = room if asked is None else min(asked, room)
        pages = self.pages_for(len(prompt) + budget - 1)
        for usable, most in self.groups:
            need = pages if most is None else min(pages, most)
            if need > usable:
                raise CapacityError(
                    f"the request needs {need} KV pages ({len(prompt)} prompt + {budget} new tokens, "
                    f"{self.page_size} per page) but the whole pool holds {usable}; raise the "
                    "KV-cache budget or ask for fewer tokens"
                )
        return EngineRequest(request_id, list(prompt), params, budget)


class _Request:
    """Engine-side state of one request."""

    def __init__(self, request: EngineRequest, stream: TextStream) -> None:
        self.id, self.params, self.budget, self.stream = request.request_id, request.params, request.budget, stream
        self.tokens = list(request.prompt)  # prompt + generated; tokens[:computed] have their K/V in the cache
        self.prompt_len = len(request.prompt)
        self.computed = 0
        self.sampled = 0  # tokens sampled, an EOS included
        self.pages: list[list[int]] = []  # its pages in each KV group of the cache (Engine.add sets the groups)
        self.max_pages: list[int] = []  # the most pages it can ever hold in each KV group (Engine.add sets them)
        self.capacity = 0  # the most tokens its pages hold (PagedKVCache.capacity)
        self.row: int | None = None  # its row of the engine's BlockTables while it runs
        self.hashes: list[bytes] = []  # the prefix hashes of its first full pages (cache.page_hashes), grown lazily
        self.registered = 0  # its first pages registered in the prefix cache (all of them hold computed tokens)
        self.cached_tokens: int | None = None  # prompt tokens it found cached when it first started (prefix caching)
        self.keys = (0, 0, 0, 0)  # its sampling stream (sampling.request_keys); seeded at random when it has no seed
        # Each prompt token's log-probability (the first has none: nothing scores it) while they are to be sent.
        self.prompt_logprobs: list[TokenLogprobs] | None = None
        if request.params.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprobs(t, None) for t in request.prompt]
        self.seen_row: int | None = None  # its row of the engine's SeenTokens, once filled (penalties)
        self.done = False  # finished: a step planned before it finished drops its row

    @property
    def most_tokens(self) -> int:
        """Tokens whose K/V it can ever hold: its prompt and every new token but the last (which nothing reads)."""
        return self.prompt_len + self.budget - 1


@dataclass
class _Launched:
    """A step whose forward pass and draw are issued (on CUDA, queued on the stream): what `Engine._complete`
    needs to turn its tokens into outputs once the device has them."""

    requests: list[_Request]  # every request of the step
    sampling: list[_Request]  # those that sample, in row order
    tokens: torch.Tensor | None = None  # their tokens [S] on the device (-1: the draw failed)
    asking: list[int] = field(default_factory=list)  # the rows whose log-probabilities are asked for
    # On the host as the device gets there: the tokens, and for the rows asking, `sampling.logprob_rows`
    host: tuple[torch.Tensor, ...] = ()
    ready: torch.cuda.Event | None = None  # recorded after those copies, on CUDA


def _check_room(nbytes: int, what: str, free: int) -> None:
    """Refuse a host buffer larger than the `free` bytes of memory there are."""
    if nbytes > free:
        raise UserError(f"{what} take {nbytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory free")


class DecodeGraphs:
    """The decode-only step at padded batch sizes, from static input buffers.

    With capture (CUDA) each size is a CUDA graph, captured once and then replayed: one launch instead of
    a few hundred. Without (the CPU tests) the same padded step runs eagerly, so the padding logic is tested
    where there is no GPU. Padding rows decode token 0 at position 0 into the scratch page (page 0), which
    no request owns, with a context of 1: they read and write nothing of anyone else's.
    """

    def __init__(self, model: Model, cache: PagedKVCache, max_batch: int, max_pages: int, capture: bool) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        device = model.embed_tokens.weight.device
        self.sizes = sorted({s for s in (1, 2, 4, 8, *range(16, max_batch + 1, 16)) if s <= max_batch} | {max_batch})
        self.tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        groups = len(cache.groups)  # each KV group its own slots and block tables
        self.slots = torch.zeros(groups, max_batch, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(groups, max_batch, max_pages, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def _forward(self, size: int) -> torch.Tensor:
        """The padded step over the first `size` rows of the static buffers. Its metadata is built here, once
        per capture (a graph keeps the split scratch it allocated); the eager path builds it per call."""
        cu = self.cu_seqlens[: size + 1]
        attention = [kernels.PagedAttentionMetadata(t[:size], cu, self.seq_lens[:size], 1) for t in self.block_tables]
        batch = Batch(self.positions[:size], cu, 1, self.cache, list(self.slots[:, :size]), attention)
        return self.model.logits(self.model.forward_packed(self.tokens[:size], batch))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Compile every kernel variant (the split count, hence the kernels, depend on the batch size) and
            # copy the rope frequencies to the device outside the capture: loading a kernel or copying from the host
            # while a stream captures fails.
            for size in self.sizes:
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            # The graphs share one pool: memory a graph freed at the end of its capture (its split scratch) may
            # hold another graph's output. Sound because one graph replays at a time and everything that reads its
            # logits (the draw, the log-probabilities: Engine._launch) is queued on the stream before the next
            # replay, even one issued ahead.
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: list[torch.Tensor],
        seq_lens: torch.Tensor,
        block_tables: list[torch.Tensor],
    ) -> torch.Tensor:
        """Logits [B, vocab] of one decode token for each of B requests; slots and block tables per KV group."""
        b = tokens.shape[0]
        size = next(s for s in self.sizes if s >= b)
        for static, value, pad in (
            (self.tokens, tokens, 0),
            (self.positions, positions, 0),
            (self.seq_lens, seq_lens, 1),
            *((self.slots[g], slots[g], 0) for g in range(len(slots))),
        ):
            static[:b].copy_(value)
            static[b:size].fill_(pad)
        for static, table in zip(self.block_tables, block_tables):
            static[:b, : table.shape[1]].copy_(table)
            static[b:size].zero_()
        if not self.capture:
            return self._forward(size)[:b]
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:b]


class Engine:
    """Continuous batching for one model (and its tokenizer, for text and stop strings). Not thread-safe:
    one thread calls add_request/add/abort/step/fail_step (an engine process's loop, or `run`)."""

    def __init__(self, model: Model, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        arch = model.arch
        if config.max_model_len is not None and config.max_model_len > arch.max_position_embeddings:
            raise UserError(
                f"max_model_len {config.max_model_len} is longer than the model's context "
                f"({arch.max_position_embeddings}, max_position_embeddings)"
            )
        self.max_model_len = config.max_model_len or arch.max_position_embeddings
        self.device = model.embed_tokens.weight.device
        # On the CPU, where F.linear reads the weights: their fastest layout, and the packed twins the steps multiply
        # through (kernels/cpu_layout.py)
        self.cpu_twins = model.lay_out_for_cpu() if kernels.forced_backend() != "triton" else 0
        self._twins = cpu_layout.twins_active if self.cpu_twins else contextlib.nullcontext
        fp8_cache = config.kv_cache_dtype == "fp8"
        if fp8_cache:
            check_fp8(self.device, "kv_cache_dtype fp8")
        self.kv_dtype = kernels.FP8 if fp8_cache else model.embed_tokens.weight.dtype  # the pages' dtype
        step_tokens = max(config.max_step_tokens, config.max_batch)  # the most one request gets in a step
        page = config.page_size or PAGE_SIZE
        if config.page_size and page > self.max_model_len:  # a page past the context holds what no request fills
            raise UserError(f"page_size {page} is longer than max_model_len {self.max_model_len}")
        if self.device.type == "cpu":  # past the host's memory the OOM killer ends the process without a word
            free = available_memory(self.device)  # (a GPU's allocator raises its own out-of-memory error)
            if model.tp is not None:  # one figure for every rank: they refuse alike, or start alike
                free = model.tp.agree_min(free)
            seen = config.max_batch * model.vocab_size * SEEN_BYTES_PER_TOKEN
            _check_room(seen, f"max_batch {config.max_batch}: its slots' token tables ({model.vocab_size} each)", free)
            _check_room(config.kv_cache_bytes or 0, "kv_cache_bytes (--kv-cache-gib)", free)
        # The penalized requests' tokens, a row per batch slot (256 rows of a 128k vocabulary: 164 MB): made before
        # the KV pool takes its share of the memory there is, so a penalized request can never find it taken.
        self._seen = SeenTokens(config.max_batch, model.vocab_size, self.device)
        if config.kv_cache_bytes is not None:
            budget = config.kv_cache_bytes
        else:  # room for max_batch requests of max_model_len
            budget = config.max_batch * self._request_bytes(page, step_tokens)
            if budget:  # a long max_model_len must not size a pool past the memory there is: the CPU also
                # holds the weights, activations and other processes, the GPU only this engine's activations
                share = 0.8 if self.device.type == "cuda" else 0.5
                budget = min(budget, int(share * available_memory(self.device)))
        if model.tp is not None:  # tensor-parallel ranks run one schedule: their pools must hold the same pages
            budget = model.tp.agree_min(budget)
        self.max_pages_per_request = -(-self.max_model_len // page)
        pages = self._pool_pages(budget, page, step_tokens)
        # + each group's scratch page
        scales = model.kv_scales() if fp8_cache else None
        self.cache = PagedKVCache(
            arch, [n + 1 for n in pages], page, self.device, self.kv_dtype, step_tokens, scales, config.prefix_caching
        )
        self.tables = BlockTables(self.cache, config.max_batch, self.max_pages_per_request)
        groups = tuple((g.num_pages - 1, g.window_pages) for g in self.cache.groups)
        self.limits = EngineLimits(
            model.vocab_size, self.max_model_len, page, groups, tokenizer is not None, config.max_batch
        )
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.stepping: list[_Request] = []  # the requests of the step in progress (fail_step ends them)
        self._registering: list[tuple[int, int]] = []  # (group, page) the step in progress registered
        self.preemptions = 0  # requests paused for want of pages (_preempt), since the start
        self.prefix_queries = 0  # tokens of the requests started (restarts too), looked up in the prefix cache
        self.prefix_hits = 0  # of those, the tokens found cached
        self._ids = itertools.count()
        self._requests: dict[str, _Request] = {}
        self.async_scheduling = (
            self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        )
        self._ahead: _Launched | None = None  # the step planned and issued before the last one's tokens were known
        # The error issuing a step planned ahead raised, with that step's requests: raised at the next step call
        self._ahead_error: tuple[Exception, list[_Request]] | None = None
        self.steps_ahead = 0  # steps planned ahead, since the start
        self.graphs = None
        # The plain-torch references read lengths on the host: a forced torch backend is not capturable.
        if config.cuda_graphs and self.device.type == "cuda" and kernels.forced_backend() != "torch":
            with torch.inference_mode():
                self.graphs = DecodeGraphs(
                    model, self.cache, config.max_batch, self.max_pages_per_request, capture=True
                )

    def _request_pages(self, page: int, step_tokens: int) -> list[int]:
        """Pages one request of max_model_len holds in each KV group at once (runtime/cache.py): its `window_pages` in a
        windowed group, every page in the full-attention one."""
        full = -(-self.max_model_len // page)
        return [window_pages(w, page, step_tokens, self.max_model_len) or full for w, _ in kv_groups(self.model.arch)]

    def _request_bytes(self, page: int, step_tokens: int) -> int:
        """KV bytes one request of max_model_len holds."""
        group_bytes = PagedKVCache.group_page_bytes(self.model.arch, page, self.kv_dtype)
        return sum(n * b for n, b in zip(self._request_pages(page, step_tokens), group_bytes))

    def _pool_pages(self, budget: int, page: int, step_tokens: int) -> list[int]:
        """Pages of each KV group for `budget` bytes, shared out as requests of max_model_len need them (one
        group: budget // page bytes)."""
        held, per_request = self._request_pages(page, step_tokens), self._request_bytes(page, step_tokens)
        if not per_request:  # a model with no attention caches nothing: its pool is bookkeeping only
            return [self.config.max_batch * n for n in held]
        smallest = sum(PagedKVCache.group_page_bytes(self.model.arch, page, self.kv_dtype))  # a page in each group
        if budget < smallest:
            raise CapacityError(f"kv_cache_bytes {budget} holds no page of {page} tokens ({smallest} bytes)")
        return [max(1, budget * n // per_request) for n in held]

    # Requests

    @functools.cached_property
    def encoder(self) -> PromptEncoder:
        """Made on first use: engine processes behind the server never encode (the server's process does)."""
        return PromptEncoder(self.tokenizer, self.model.vocab_size, self.max_model_len)

    def encode(self, prompt: str | list[int], what: str = "the prompt") -> list[int]:
        """A prompt's token ids, checked against the vocabulary and this engine's context."""
        return self.encoder(prompt, what)

    def admit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> EngineRequest:
        """An encoded prompt with its parameters, checked against this engine's limits (a fresh id if none)."""
        return self.limits.admit(request_id or f"req-{next(self._ids)}", prompt, params)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Encode, check and queue a request; returns its id."""
        return self.add(self.admit(self.encode(prompt), params, request_id))

    def add(self, request: EngineRequest) -> str:
        """Queue a request checked already (`admit`, here or in the server's process)."""
        if request.request_id in self._requests:
            raise UserError(f"request id {request.request_id!r} is already in use")
        req = _Request(request, TextStream(self.tokenizer, request.params.stop))
        req.pages = [[] for _ in self.cache.groups]
        req.max_pages = self.cache.pages_needed(req.most_tokens)
        if request.params.temperature > 0:
            req.keys = request_keys(request.params.seeded().seed)
        self._requests[req.id] = req
        self.waiting.append(req)
        return req.id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request now, freeing its pages; returns its final output (None if it is unknown/finished)."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        out = self._finish(req, "abort", [], "")
        self._forget_finished_ahead()
        return out

    def abort_all(self) -> list[RequestOutput]:
        outputs = []
        for req in [*self.running, *self.waiting]:
            outputs.append(self._finish(req, "abort", [], ""))
        self.running.clear()
        self.waiting.clear()
        self._forget_finished_ahead()
        return outputs

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def info(self) -> dict:
        """What this engine runs on, for the server's start-up line."""
        return {
            "device": str(self.device),
            "dtype": dtype_name(self.model.run_dtype),
            "kv_dtype": dtype_name(self.kv_dtype),
            "threads": torch.get_num_threads(),
            "max_model_len": self.max_model_len,
            "pages": self.cache.usable_pages,
            "page_size": self.cache.page_size,
            "prefix_caching": self.cache.prefix_caching,
            "kv_mib": self.cache.nbytes() / 2**20,
            "cuda_graphs": self.graphs is not None,
            "async_scheduling": self.async_scheduling,
            "packed_matrices": self.cpu_twins,
        }

    @property
    def kv_usage(self) -> float:
        """Share of the pool's pages held by running requests."""
        return 1 - self.cache.free_pages / self.cache.usable_pages

    # One step

    def _schedule(self) -> list[tuple[_Request, int]]:
        """(request, tokens to feed) for this step: decode tokens and unfinished prefills of the running
        requests first, then new (or preempted) requests in FIFO order while a batch slot and their pages are
        free. A running request takes the pages its tokens of this step need; when the pool has none left, the
        request that started last is preempted (below)."""
        room = max(self.config.max_step_tokens, self.config.max_batch)  # every running request decodes each step
        plan: dict[_Request, int] = {}
        # Decodes (1 token) first, then unfinished prompts, each kind in the order it started. Decodes take pages
        # here, and a prompt's later chunks their windowed groups' (a request starts with its prompt's other pages),
        # oldest first: the newest, the one preempted when the pool is dry, is never one planned already (only the
        # newest can be part way through its prompt: a step starts requests whole while its room lasts).
        for req in sorted(self.running, key=lambda r: len(r.tokens) - r.computed > 1):
            if req.row is None:
                continue  # preempted by a request before it in this loop
            n = min(len(req.tokens) - req.computed, room)
            if n <= 0:
                continue
            while req.computed + n > req.capacity and not self._extend(req, req.computed + n):
                victim = self.running[-1]  # the newest: the oldest request always goes on
                self._preempt(victim)
                if victim is req:
                    break
            else:
                plan[req] = n
                room -= n
                self._register(req, req.computed + n)
        while self.waiting and room > 0 and len(self.running) < self.config.max_batch:
            req = self.waiting[0]
            hits = self.cache.lookup(self._prefix_hashes(req))
            if not self._can_start(req, hits):
                break  # FIFO: a request that does not fit yet is not overtaken (no starvation)
            self.waiting.popleft()
            plan[req] = self._start(req, hits, room)
            room -= plan[req]
            self._register(req, req.computed + plan[req])
        self.cache.clear_stale()
        self.tables.grow([(r.row, r.pages, r.computed + n) for r, n in plan.items()])
        return list(plan.items())

    def _extend(self, req: _Request, tokens: int, window_tokens: int | None = None) -> bool:
        """Give a request the pages it lacks for `tokens` tokens (PagedKVCache.extend); False (nothing taken) when
        the pool lacks them."""
        if not self.cache.extend(req.pages, tokens, window_tokens):
            return False
        req.capacity = self.cache.capacity(req.pages)
        return True

    def _prefix_hashes(self, req: _Request) -> list[bytes]:
        """The hashes of a waiting request's full pages that may be found cached: not the page of its last token,
        whose logits it must compute."""
        if not self.cache.prefix_caching or req.prompt_logprobs is not None:  # a prompt to score is computed whole
            return []
        pages = prefix_pages(req.tokens, self.cache.page_size)
        return page_hashes(req.tokens, self.cache.page_size, req.hashes, pages)[:pages]

    def _can_start(self, req: _Request, hits: list[list[int]]) -> bool:
        """Whether a waiting request's tokens fit in the pool now, its cached prefix pages `hits` (per group)
        shared, leaving a page for each running request that may still need one (vLLM's watermark, per request):
        without it, requests admitted into the last pages would be preempted again at the next page boundary of
        the ones already running."""
        needs = self.cache.pages_needed(len(req.tokens))
        for g, (need, group, found) in enumerate(zip(needs, self.cache.groups, hits)):
            # A windowed group grows to its window_pages, then gives a page back for each it takes.
            growing = sum(group.holds_fewer(r.pages[g], r.max_pages[g]) for r in self.running)
            spare = growing + (need < req.max_pages[g]) if self.running else 0  # alone it always fits later
            # Hits no one owns are counted free: sharing them takes them from the free count.
            new = need - group.held(found)
            available = group.available - sum(p != 0 and group.refs[p] == 0 for p in found)
            if new + spare > available:
                return False
        return True

    def _start(self, req: _Request, hits: list[list[int]], room: int) -> int:
        """Run a waiting request: its cached prefix pages shared, its tokens past them to compute (pages for all
        of its prompt now, so a long one is not stalled mid-way for full-attention pages; in a windowed group those
        of this step's tokens, since it gives pages back as it goes: a pool that runs dry there preempts it like a
        decode); how many of its tokens this step computes, at most `room`."""
        self.cache.share(req.pages, hits)
        cached = len(hits[0])  # pages of the prefix found, as every group's list has
        req.registered, req.computed = cached, cached * self.cache.page_size
        self.prefix_queries += len(req.tokens)
        self.prefix_hits += req.computed
        if req.cached_tokens is None:  # its first start: a restart may find the pages it filled itself
            req.cached_tokens = req.computed
        n = min(len(req.tokens) - req.computed, room)
        self._extend(req, len(req.tokens), req.computed + n)
        req.row = self.tables.add(req.pages, req.computed + n)
        self.running.append(req)
        return n

    def _register(self, req: _Request, tokens: int) -> None:
        """Register in the prefix cache the pages a request fills up to `tokens` tokens, this step's included, as
        soon as the step is planned: a request that starts later in the same step reads them, as written by this
        step before its attention reads the cache (every layer stores the step's K/V, then attends). A step
        that fails forgets them (`step`)."""
        full = tokens // self.cache.page_size
        if not self.cache.prefix_caching or full <= req.registered:
            return
        page_hashes(req.tokens, self.cache.page_size, req.hashes, full)
        for g, own in enumerate(req.pages):
            for i in range(req.registered, full):
                if own[i] and self.cache.register(g, own[i], req.hashes[i]):
                    self._registering.append((g, own[i]))
        req.registered = full

    def _preempt(self, req: _Request) -> None:
        """Stop a running request for want of pages and put it first in line again: its pages go back to the
        pool and, when it starts again, its prompt and the tokens it has generated are prefilled anew (vLLM's
        recompute preemption). What it sent stays sent: it samples on from where it was, with the same random
        stream, so its text is the one it would have had without the pause wherever its logits are the same."""
        self.running.remove(req)
        self.cache.release(req.pages, len(req.tokens))
        req.pages, req.capacity = [[] for _ in self.cache.groups], 0
        self.tables.remove(req.row)
        req.row, req.computed, req.registered, req.seen_row = None, 0, 0, None
        self.waiting.appendleft(req)
        self.preemptions += 1

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass over the scheduled tokens; returns an output for each request that sampled.

        A request whose sampling fails ends alone, with finish reason "error". A failure of the forward pass
        is raised: it belongs to every request of the step, which `fail_step` then ends (the server does).

        With async scheduling the step after this one is planned and issued before this one's tokens are waited
        for (`_run_ahead`), so the device goes from one step to the next while the host turns tokens into text."""
        self._registering = []
        if self._ahead_error is not None:  # issuing the step planned ahead failed: that step fails now
            (error, failed), self._ahead_error = self._ahead_error, None
            self.stepping = [req for req in failed if not req.done]
            raise error
        launched, self._ahead = self._ahead, None
        if launched is None:
            try:
                plan = self._schedule()
            except Exception:
                self.stepping = list(self.running)  # pages half handed out: the step of every running request failed
                self.cache.forget(self._registering)
                raise
            self.stepping = [req for req, _ in plan]
            if not plan:
                return []
            try:
                launched = self._launch(plan)
            except BaseException:
                self.cache.forget(self._registering)  # registered for K/V this step has not written
                raise
        self.stepping = [req for req in launched.requests if not req.done]
        if self.async_scheduling:
            self._run_ahead(launched)
        outputs = self._complete(launched)
        self._forget_finished_ahead()
        return outputs

    def _forget_finished_ahead(self) -> None:
        """Drop the step planned ahead (or the error issuing it raised) once every request of it has finished:
        nothing of it is left to send (or to fail)."""
        if self._ahead is not None and all(req.done for req in self._ahead.requests):
            self._ahead = None
        if self._ahead_error is not None and all(req.done for req in self._ahead_error[1]):
            self._ahead_error = None

    def _launch(self, plan: list[tuple[_Request, int]], ahead: torch.Tensor | None = None) -> _Launched:
        """Issue a planned step's forward pass and draw. ahead: the step's input tokens on the device, for a step
        planned before they were known (one decode token each)."""
        logits, sampling = self._forward(plan, ahead)
        for req, n in plan:
            req.computed += n
        launched = _Launched([req for req, _ in plan], sampling)
        if not sampling:
            return launched
        launched.tokens = self._draw(sampling, logits, ahead is not None)
        results = [launched.tokens]
        launched.asking = [i for i, req in enumerate(sampling) if req.params.logprobs is not None]
        if launched.asking:  # log-probabilities are the model's own, without the penalties the draw saw
            index = upload(launched.asking, self.device, torch.int64)
            k = max(sampling[i].params.logprobs for i in launched.asking)
            results += logprob_rows(logits[index], launched.tokens[index], k)
        if self.device.type == "cuda":  # to the host behind the step, without a wait here
            launched.host = tuple(torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in results)
            for host, result in zip(launched.host, results):
                host.copy_(result, non_blocking=True)
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        else:
            launched.host = tuple(results)
        return launched

    def _run_ahead(self, launched: _Launched) -> None:
        """Plan and issue the step after `launched` while the device runs it, if it can be planned without its
        tokens (`_plan_ahead`). An error issuing it fails that step at the next `step` call, not this one, whose
        outputs are still returned."""
        plan = self._plan_ahead(launched)
        if plan is None:
            return
        rows = {id(req): i for i, req in enumerate(launched.sampling)}
        index = [rows[id(req)] for req, _ in plan]
        tokens = launched.tokens
        if index != list(range(len(launched.sampling))):  # rows of requests ended since, or another order
            tokens = tokens[upload(index, self.device, torch.int64)]
        try:
            # A draw that failed (-1) ends its request when its step completes; until then its row reads token 0.
            self._ahead = self._launch(plan, tokens.clamp(min=0))
        except Exception as error:
            self._ahead_error = (error, [req for req, _ in plan])
            return
        self.steps_ahead += 1

    def _plan_ahead(self, launched: _Launched) -> list[tuple[_Request, int]] | None:
        """The next step's plan before `launched`'s tokens are known, or None where only they can decide it: the
        plan `_schedule` would make once they are, every running request decoding the token `launched` draws for
        it, but for the requests that token may end (a row the step drops). Only where every running request
        samples in `launched`, none waits to start or has prompt log-probabilities to send, and the pool has the pages
        without preempting anyone: the rest is planned after the tokens, as always. (Nothing else of a step reads
        the token before on the host: penalties count it on the device, log-probabilities are computed there.)"""
        live = sum(not req.done for req in launched.sampling)  # a step planned ahead has rows of requests ended since
        if self.waiting or not live or live != len(self.running):
            return None
        if any(req.prompt_logprobs is not None for req in self.running):
            return None  # a prompt's log-probabilities go with its first output, which the host has yet to make
        plan = []
        for req in self.running:
            if req.sampled + 1 >= req.budget:
                continue  # the token it is drawing is its last
            if req.computed + 1 > req.capacity and not self._extend(req, req.computed + 1):
                return None  # a preemption: `_schedule` decides it, with the tokens known
            plan.append((req, 1))
        if not plan:
            return None
        self.cache.clear_stale()
        self.tables.grow([(req.row, req.pages, req.computed + 1) for req, _ in plan])
        return plan

    def fail_step(self, error: str) -> list[RequestOutput]:
        """End the requests of the step that raised (its K/V may be half written); the rest go on."""
        failed = [req for req in self.stepping if not req.done]
        self.stepping = []
        outputs = [self._fail(req, error) for req in failed]
        self._forget_finished_ahead()  # a step planned ahead of the failed one, if it holds only those
        return outputs

    def _forward(
        self, plan: list[tuple[_Request, int]], ahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, list[_Request]]:
        batch, tokens, last, sampling = self._step_batch(plan, ahead)
        decode_only = tokens.shape[0] == len(plan) == len(sampling)  # one token each, and each samples
        if self.graphs is not None and decode_only:
            tables = [a.block_tables for a in batch.attention]
            return self.graphs.run(tokens, batch.positions, batch.slots, batch.attention[0].seq_lens, tables), sampling
        with self._twins():
            hidden = self.model.forward_packed(tokens, batch)
            if any(req.prompt_logprobs is not None for req, _ in plan):
                self._score_prompts(plan, hidden)
            if not sampling:
                return None, sampling
            return self.model.logits(hidden if decode_only else hidden[last]), sampling  # decode: every token samples

    def _score_prompts(self, plan: list[tuple[_Request, int]], hidden: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens this step's chunks score, for the requests that ask for them:
        the hidden state at position p gives prompt token p + 1's. One head and one log-softmax for all of them. (A
        decode-only step, replayed from a CUDA graph, scores none: its one token per request is a prompt's last
        at most, which scores a sampled token.)"""
        rows, targets, counts, where, start = [], [], [], [], 0
        for req, n in plan:
            if req.prompt_logprobs is not None:
                for p in range(req.computed, min(req.computed + n, req.prompt_len - 1)):
                    rows.append(start + p - req.computed)
                    targets.append(req.tokens[p + 1])
                    counts.append(req.params.prompt_logprobs)
                    where.append((req, p + 1))
            start += n
        for start in range(0, len(rows), SCORED_ROWS):  # a block of rows at a time: logits of a whole chunk are big
            block = slice(start, start + SCORED_ROWS)
            logits = self.model.logits(hidden[torch.tensor(rows[block], device=hidden.device)])
            for (req, position), entry in zip(where[block], token_logprobs(logits, targets[block], counts[block])):
                req.prompt_logprobs[position] = entry

    def _step_batch(
        self, plan: list[tuple[_Request, int]], ahead: torch.Tensor | None = None
    ) -> tuple[Batch, torch.Tensor, torch.Tensor, list[_Request]]:
        """The step's tokens and their Batch (positions, K/V slots, attention metadata), built once for all layers;
        with the index of each sampling request's last token, and those requests. The host sends two small
        tensors, without waiting for the device (`upload`); block tables and slots come from the device's
        `BlockTables`. ahead: the tokens of a step planned ahead (`_plan_ahead`), on the device: one each, the
        one its request is drawing in the step before, so every request samples."""
        tokens, positions, seq_of_token, rows, cu, seq_lens, last, sampling = [], [], [], [], [0], [], [], []
        for i, (req, n) in enumerate(plan):
            start, end = req.computed, req.computed + n
            if ahead is None:
                tokens.extend(req.tokens[start:end])
            positions.extend(range(start, end))
            seq_of_token.extend([i] * n)
            rows.append(req.row)
            cu.append(cu[-1] + n)
            seq_lens.append(end)
            if ahead is not None or end == len(req.tokens):  # all its tokens cached after this step: it samples
                last.append(cu[-1] - 1)
                sampling.append(req)
        n_seqs = len(plan)
        longs = upload(tokens + positions + seq_of_token + rows + last, self.device, torch.int64)
        ints = upload(cu + seq_lens, self.device, torch.int32)
        sizes = (len(tokens), len(positions), len(positions), n_seqs, len(last))
        tokens_t, positions_t, seq_of_token_t, rows_t, last_t = longs.split(sizes)
        if ahead is not None:
            tokens_t = ahead
        cu_t, lens_t = ints[: n_seqs + 1], ints[n_seqs + 1 :]
        tables = self.tables.gather(rows, rows_t)
        slots = list(self.tables.slots(tables, seq_of_token_t, positions_t))
        max_len = max(n for _, n in plan)
        decodes = next((i for i, (_, n) in enumerate(plan) if n != 1), n_seqs)  # _schedule puts decodes first
        attention = [kernels.PagedAttentionMetadata(t, cu_t, lens_t, max_len, decodes) for t in tables]
        # Every sequence starts in this step: attention over the step's own keys, no cache read. Not over an FP8
        # cache: there every step reads the pages (rounded to E4M3), so a prompt's output does not depend on
        # whether it shared its first step with decodes.
        fresh = not self.cache.fp8 and all(req.computed == 0 for req, _ in plan)
        batch = Batch(positions_t, cu_t, max_len, self.cache, slots, attention, fresh)
        return batch, tokens_t, last_t, sampling

    def _draw(self, reqs: list[_Request], logits: torch.Tensor, ahead: bool = False) -> torch.Tensor:
        """Every row's next token at once, on the device (greedy rows their argmax). ahead: in a step planned before
        the step before it completed, whose draw each request has not counted yet."""
        params, uniforms = [req.params for req in reqs], None
        if any(p.temperature > 0 for p in params):
            keys = torch.tensor([req.keys for req in reqs], dtype=torch.int64)
            uniforms = request_uniforms(keys, torch.tensor([req.sampled + ahead for req in reqs]))
        counted = [i for i, p in enumerate(params) if p.penalized]
        if not counted:
            return sample(logits, params, uniforms)
        # The draw sees the penalties; log-probabilities are the model's own.
        rows = [req.row for req in reqs]
        for i in counted:
            req = reqs[i]
            if req.seen_row != req.row:  # its first penalized draw, or its first since a preemption moved it
                # (never in a step planned ahead: a request's first draw after a start is in a step planned after)
                self._seen.fill(req.row, req.tokens[: req.prompt_len], req.tokens[req.prompt_len :])
                req.seen_row = req.row
        tokens = sample(apply_penalties(logits, params, self._seen, rows), params, uniforms)
        where = upload(counted, logits.device, torch.int64)
        self._seen.count(upload([rows[i] for i in counted], logits.device, torch.int64), tokens[where])
        return tokens

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        """A launched step's outputs, its tokens waited for here: each request's bookkeeping, in row order. A
        request that ended since the step was planned (it ran ahead) has no output."""
        if not launched.sampling:
            return []
        if launched.ready is not None:
            launched.ready.synchronize()
        reqs, asking = launched.sampling, launched.asking
        tokens, *found = (t.tolist() for t in launched.host)
        logprobs = [None] * len(reqs)
        if asking:
            counts = [reqs[i].params.logprobs for i in asking]
            entries = logprob_entries([tokens[i] for i in asking], *found, counts)
            for i, entry in zip(asking, entries):
                logprobs[i] = entry if tokens[i] >= 0 else None  # a row whose sampling failed has none
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if req.done:
                continue
            if token < 0:  # NaN or infinite logits: this request's failure, not the batch's
                outputs.append(self._fail(req, "sampling failed: the logits hold a NaN or an infinity"))
                continue
            scored = req.prompt_logprobs
            out = self._append(req, token)
            if logprobs[i] is not None:  # an EOS that ends the request has its entry (as in vLLM), not its text
                out.logprobs = [logprobs[i]]
            if scored is not None:  # the first output carries the prompt's
                out.prompt_logprobs, req.prompt_logprobs = scored, None
            if not out.finished:  # the pages a step planned ahead fills, registered once their tokens are known
                self._register(req, req.computed)
            outputs.append(out)
        return outputs

    def _fail(self, req: _Request, error: str) -> RequestOutput:
        self.running.remove(req)
        # Whatever went wrong, the K/V only it holds serve no one else.
        self.cache.forget_unshared(req.pages, req.hashes[: req.registered])
        return self._finish(req, "error", [], "", error)

    def _append(self, req: _Request, token: int) -> RequestOutput:
        req.sampled += 1
        params = req.params
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.model.arch.eos_token_ids
        if not params.ignore_eos and token in stop_ids:
            self.running.remove(req)
            return self._finish(req, "stop", [], req.stream.flush()[0])
        req.tokens.append(token)
        text, stopped = req.stream.add(token)
        if stopped or req.sampled >= req.budget:
            self.running.remove(req)
            if not stopped:
                rest, stopped = req.stream.flush()
                text += rest
            return self._finish(req, "stop" if stopped else "length", [token], text)
        return RequestOutput.progress(req.id, [token], text, req.prompt_len, req.sampled)

    def _finish(
        self, req: _Request, reason: str, token_ids: list[int], text: str, error: str | None = None
    ) -> RequestOutput:
        """The request's last output; its pages go back to the pool now (a step planned ahead that holds it still
        writes one token's K/V on them: on CUDA queued before any step of their next owner)."""
        self.cache.release(req.pages, max(len(req.tokens), req.computed))
        req.pages, req.done = [], True
        if req.row is not None:
            self.tables.remove(req.row)
            req.row = None
        del self._requests[req.id]
        return RequestOutput.final(
            req.id, reason, token_ids, text, req.prompt_len, req.sampled, error, req.cached_tokens or 0
        )

    # Offline use

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams) -> list[Completion]:
        """Serve a list of prompts to completion (all submitted at once) and return them in order."""
        return self.run([self.admit(self.encode(p, f"prompt {i}"), params) for i, p in enumerate(prompts)])

    def run(self, requests: list[EngineRequest]) -> list[Completion]:
        """Serve checked requests to completion (all queued at once); their completions in order. A request
        that fails raises (offline, a failure is a bug to see, not an output); whatever ends the call early (that,
        Ctrl-C) aborts the call's other requests, so the engine is left empty for the next call."""
        completions = {}
        try:
            for request in requests:
                self.add(request)
                completions[request.request_id] = Completion(request.prompt, text="" if self.tokenizer else None)
            while self.has_work():
                for out in self.step():
                    c = completions[out.request_id]
                    c.tokens.extend(out.token_ids)
                    if c.text is not None:
                        c.text += out.text
                    if out.logprobs is not None:
                        c.logprobs = c.logprobs or []
                        c.logprobs.extend(out.logprobs)
                    if out.prompt_logprobs is not None:
                        c.prompt_logprobs = out.prompt_logprobs
                    if out.error is not None:
                        raise RuntimeError(f"{out.request_id}: {out.error}")
                    if out.finished:
                        c.finish_reason = out.finish_reason
        except BaseException:
            for request_id in completions:
                self.abort(request_id)  # None for those already finished
            raise
        return [completions[r.request_id] for r in requests]
