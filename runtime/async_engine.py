"""Engine processes behind the HTTP server: `AsyncEngine` runs each `Engine` in a process of its own.

As in vLLM v1 (its EngineCore process), the engine steps in its own process, so the server's event loop,
JSON and SSE work and the engine's Python never wait on each other's GIL. With `data_parallel_size` > 1
(CPU), several engines each serve a share of the requests, each on its own core(s): a CPU decode step of a
small model is bound by one core's memory bandwidth and by Python, and a second engine on the second core
adds more than a second torch thread in the same engine does (docs/serving.md has the measurements).

Requests go to the engine `runtime/routing.py` chooses (the one most likely to hold their prefix cached, within a
quarter of a batch of the least busy one). Messages travel through pipes as the small dataclasses
below: the server sends `Add` (a request checked already, which the engine trusts), `Abort` and `Shutdown`;
an engine answers `Ready` or `Failed` once, then a `Step` (outputs and load) every step, and `Stopped`. A
reader thread per engine hands a whole step's outputs to the event loop in one call, and a `RequestStream`
merges the outputs its consumer has not taken yet into one (as vLLM's RequestOutputCollector does), so a
slow client gets bigger SSE chunks instead of a growing queue.

An engine process ignores SIGINT and SIGTERM: the server's process decides when it stops (Ctrl-C reaches
the whole process group) and then sends `Shutdown`; if the server's process dies or closes the pipe, the engine
sees it close and stops as a Shutdown stops it (a tensor-parallel engine's other ranks with it).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing
import queue
import signal
import threading
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import torch
from tokenizers import Tokenizer

from tessera.errors import UserError
from tessera.runtime.engine import Engine, EngineConfig, EngineLimits, EngineRequest, RequestOutput
from tessera.runtime.model import Model
from tessera.runtime.parallel import TensorParallel, backend_for, free_port, join_group, load_shard
from tessera.runtime.routing import PrefixRouter
from tessera.runtime.sampling import PromptEncoder, SamplingParams, load_tokenizer

START_TIMEOUT_S = 600.0  # loading a large checkpoint and capturing CUDA graphs takes a while
HEARTBEAT_S = 10.0  # an idle tensor-parallel engine's rounds: its ranks' collectives never wait past their timeout


class EngineProcessError(RuntimeError):
    """An engine process that failed to start (its own error in the message) or died."""


@dataclass(frozen=True)
class EngineSpec:
    """How an engine process builds its engine: it loads the checkpoint itself (a model does not cross a
    process boundary cheaply)."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    config: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None  # CPU: torch threads of this engine (None: torch's default)
    tensor_parallel_size: int = 1  # ranks this engine is sharded over (runtime/parallel.py), each a process
    # The ranks are torchrun's (`torchrun ... tessera serve`, one node or several): the server, torchrun's rank 0,
    # starts rank 0's engine process alone, which joins torchrun's group; ranks > 0 run `follow` where they are.
    torchrun: bool = False

    def load(self, tp: TensorParallel | None = None) -> tuple[Model, Tokenizer | None]:
        """This engine's model, or with `tp` its rank's shard (the rank's GPU on CUDA), reading only that rank's
        parts, and the tokenizer. No collective: a rank that fails here fails alone (`_start_rank`)."""
        from tessera.devices import parse_dtype
        from tessera.runtime.loader import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        device, dtype = torch.device(self.device), parse_dtype(self.dtype)
        if tp is None:
            model = load_model(self.model_dir, device=device, dtype=dtype)
        else:
            model = load_shard(self.model_dir, tp, tp.device(device), dtype)
        return model, load_tokenizer(self.model_dir)


@dataclass(frozen=True)
class EngineLoad:
    """An engine's state after its last step, for the metrics."""

    running: int = 0
    waiting: int = 0
    used_pages: int = 0
    preemptions: int = 0  # since the engine started
    prefix_queries: int = 0  # tokens of the requests started, looked up in the prefix cache, since the start
    prefix_hits: int = 0  # of those, the tokens found cached


# Messages: server -> engine process


@dataclass(frozen=True)
class Add:
    request: EngineRequest


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# Messages: engine process -> server


@dataclass(frozen=True)
class Ready:
    limits: EngineLimits
    info: dict


@dataclass(frozen=True)
class Failed:
    error: str  # why the engine could not start


@dataclass(frozen=True)
class Step:
    outputs: list[RequestOutput]
    load: EngineLoad


@dataclass(frozen=True)
class Stopped:
    pass


def _load(engine: Engine) -> EngineLoad:
    used = engine.cache.usable_pages - engine.cache.free_pages
    return EngineLoad(
        len(engine.running), len(engine.waiting), used, engine.preemptions, engine.prefix_queries, engine.prefix_hits
    )


def smallest_pools(limits: list[EngineLimits]) -> EngineLimits:
    """The limits every engine can meet. Engines of one model size a default KV pool from the memory free as each
    starts, so their pools can differ; a request goes to whichever engine is least busy, so it is checked against
    the smallest pool of each KV group. Admitted against a larger one, it would wait forever in a smaller one's
    queue (and hold up every request behind it)."""
    pools = zip(*(lim.groups for lim in limits), strict=True)
    return replace(limits[0], groups=tuple((min(usable for usable, _ in group), group[0][1]) for group in pools))


def routing_slack(limits: EngineLimits) -> int:
    """How many more requests in flight than the least busy engine an engine may hold and still be sent a request
    for the prefix it probably has cached: a quarter of a batch (at least one). A step's time grows with its
    batch, so past that the prefix's saved prefill is worth less than the balance lost; requests still queue
    past an engine's `max_batch` when every engine is full."""
    return max(1, limits.max_batch // 4)


def _ignore_signals() -> None:
    """In a process the server started: the server decides when it stops (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _start_rank(spec: EngineSpec, rank: int, port: int | None) -> tuple[Engine | None, TensorParallel | None, str]:
    """Join the engine's process group (tensor parallel; at 127.0.0.1:`port`, or torchrun's when `port` is None)
    and build this rank's engine; (engine, tp, error). Two stages, each ending in an exchange of errors, so every
    rank hears every rank's error and none waits in a collective a failed rank never joins: loading the shard (no
    collective: out of memory, a bad tensor, on one rank alone), then building the engine (which agrees on the KV
    pool's size with a collective that every rank reaches: what fails before it, the config's checks, fails on
    every rank alike)."""
    tp, engine, error, model = None, None, "", None
    try:
        if spec.tensor_parallel_size > 1:
            tp = join_group(rank, spec.tensor_parallel_size, port, backend_for(spec.device), START_TIMEOUT_S)
        model, tokenizer = spec.load(tp)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    error = _first_error(tp, error)
    if not error:
        try:
            engine = Engine(model, tokenizer, spec.config)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        error = _first_error(tp, error)
    return engine, tp, error


def _first_error(tp: TensorParallel | None, error: str) -> str:
    """The first rank's error, on every rank ("rank r: ..."; "" when none failed); this process's alone without tp."""
    if tp is None:
        return error
    errors = [None] * tp.size
    torch.distributed.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), "")


def _apply(engine: Engine, messages: list) -> tuple[list[RequestOutput], bool]:
    """The server's messages, in order: (outputs they produced, whether one was Shutdown)."""
    outputs: list[RequestOutput] = []
    for message in messages:
        if isinstance(message, Add):
            try:
                engine.add(message.request)
            except UserError as e:  # a request id in use twice: never leave a caller hanging
                outputs.append(RequestOutput.failure(message.request.request_id, str(e)))
        elif isinstance(message, Abort):
            engine.abort(message.request_id)
        elif isinstance(message, Shutdown):
            return outputs + engine.abort_all(), True
    return outputs, False


def _step(engine: Engine, tp: TensorParallel | None = None) -> list[RequestOutput]:
    """One engine step. A step that raises fails the requests in it, not the engine nor those waiting; except in
    a tensor-parallel engine, where it ends the engine: the other ranks may be waiting in a collective of that
    step, and a rank that went on alone would pair its next collective with theirs. Raised, the error ends this
    rank's process, whose closed connections fail the others' collectives (gloo at once; NCCL at its timeout),
    and the server reports the engine lost."""
    if not engine.has_work():
        return []
    try:
        return engine.step()
    except Exception as e:
        if tp is not None:
            raise
        return engine.fail_step(f"{type(e).__name__}: {e}")


def _seeded(message: object) -> object:
    """An Add of unseeded sampling with a seed drawn here: tensor-parallel ranks must draw the same tokens."""
    if isinstance(message, Add):
        return Add(replace(message.request, params=message.request.params.seeded()))
    return message


def _engine_process(spec: EngineSpec, inbox: Connection, outbox: Connection, port: int | None = None) -> None:
    """An engine process (rank 0 of a tensor-parallel engine): build the engine, then step it for as long as the
    server talks to it. With tensor parallelism the messages of each step go to the other ranks first, so every
    rank steps the same requests; an idle engine still sends an empty round every HEARTBEAT_S, inside the
    collectives' timeout."""
    _ignore_signals()
    engine, tp, error = _start_rank(spec, 0, port)
    if error:  # reported to the server, which raises it where it started this engine
        outbox.send(Failed(error))
        return
    outbox.send(Ready(engine.limits, engine.info()))
    try:
        _serve(engine, tp, inbox, outbox)
    except (EOFError, OSError):  # the server's end closed: nobody to serve
        pass
    except Exception as e:  # a tensor-parallel step or collective failed (`_step`): the engine ends, saying why
        traceback.print_exc()
        with contextlib.suppress(OSError):
            outbox.send(Failed(f"{type(e).__name__}: {e}"))


def _serve(engine: Engine, tp: TensorParallel | None, inbox: Connection, outbox: Connection) -> None:
    """Rank 0's loop: the server's messages in (to every rank first), a step, its outputs out; until Shutdown."""
    while True:
        if not engine.has_work():
            inbox.poll(None if tp is None else HEARTBEAT_S)  # idle: sleep until a message (or EOF)
        messages = []
        while inbox.poll():
            try:
                messages.append(inbox.recv())
            except EOFError:  # the server closed its end (shut down, or gone): stop as a Shutdown stops, every rank
                messages.append(Shutdown())
                break
        if tp is not None:
            messages = tp.broadcast([_seeded(m) for m in messages])
        outputs, stop = _apply(engine, messages)
        if stop:
            outbox.send(Step(outputs, _load(engine)))
            outbox.send(Stopped())
            return
        outbox.send(Step(outputs + _step(engine, tp), _load(engine)))


def _rank_process(spec: EngineSpec, rank: int, port: int) -> None:
    """Rank > 0 of a tensor-parallel engine, started by the server on this machine (`follow`)."""
    _ignore_signals()
    follow(spec, rank, port)


def follow(spec: EngineSpec, rank: int, port: int | None = None) -> str:
    """Rank > 0 of a tensor-parallel engine: the same engine over its shard, stepping the requests rank 0
    broadcasts; its outputs equal rank 0's and go nowhere. It ends with Shutdown, or when rank 0 is gone (the
    collective fails), or when its own step fails (`_step`). With `port` None the ranks are torchrun's: a torchrun
    rank > 0 of `tessera serve` runs this in its own process, and SIGTERM stops it (rank 0's engine then fails,
    and the server says so).
    Returns "" after a Shutdown, else why it ended."""
    engine, tp, error = _start_rank(spec, rank, port)
    if error:
        return error
    try:
        while True:
            _, stop = _apply(engine, tp.broadcast(None))
            if stop:
                return ""
            _step(engine, tp)
    except Exception as e:  # rank 0 exited (its collectives fail here), or a step failed here (`_step`)
        return f"the engine stopped: {type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(RuntimeError):
            torch.distributed.destroy_process_group()


class RequestStream:
    """The outputs of one request submitted to an AsyncEngine, as an async iterator; `abort()` drops it.
    Outputs that arrived while the consumer was busy come out merged into one."""

    def __init__(self, handle: _EngineHandle, request_id: str) -> None:
        self.handle, self.request_id = handle, request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        while not out.finished and not self.queue.empty():
            later = self.queue.get_nowait()
            logprobs = None
            if out.logprobs is not None or later.logprobs is not None:
                logprobs = (out.logprobs or []) + (later.logprobs or [])
            prompt_logprobs = out.prompt_logprobs if out.prompt_logprobs is not None else later.prompt_logprobs
            out = replace(
                later,
                token_ids=out.token_ids + later.token_ids,
                text=out.text + later.text,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        self.finished = out.finished
        return out

    def abort(self) -> None:
        """Free the request's batch slot and pages before its engine's next step (no-op once finished)."""
        if not self.finished:
            self.finished = True
            if self.handle.streams.pop(self.request_id, None) is not None:
                self.handle.send(Abort(self.request_id))


class _EngineHandle:
    """The server's side of one engine process: its pipes, a writer thread, and its requests in flight."""

    def __init__(self, context, spec: EngineSpec, rank: int) -> None:
        inbox_reader, self.inbox = context.Pipe(duplex=False)
        self.outbox, outbox_writer = context.Pipe(duplex=False)
        self.rank = rank
        port = free_port() if spec.tensor_parallel_size > 1 and not spec.torchrun else None
        self.process = context.Process(
            target=_engine_process,
            args=(spec, inbox_reader, outbox_writer, port),
            name=f"tessera-engine-{rank}",
            daemon=True,
        )
        self.process.start()
        # The other ranks of a tensor-parallel engine: no pipes, rank 0 speaks for them (torchrun starts its own).
        others = [] if spec.torchrun else range(1, spec.tensor_parallel_size)
        self.ranks = [
            context.Process(
                target=_rank_process, args=(spec, r, port), name=f"tessera-engine-{rank}-rank{r}", daemon=True
            )
            for r in others
        ]
        for process in self.ranks:
            process.start()
        inbox_reader.close()  # the child holds these ends now; closing ours lets each side see the other's EOF
        outbox_writer.close()
        self.streams: dict[str, RequestStream] = {}
        self.submitted = 0
        self.load = EngineLoad()
        self.alive = True
        self.error = ""  # why the engine ended, when it said (Failed)
        # Sends go through a thread: a full pipe (long prompts arriving during a step) must not block the loop.
        self._sends: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name=f"tessera-engine-{rank}-writer", daemon=True)
        self._writer.start()

    def send(self, message: tuple) -> None:
        self._sends.put(message)

    def _write(self) -> None:
        while (message := self._sends.get()) is not None:
            try:
                self.inbox.send(message)
            except OSError:  # the engine process is gone; the reader reports it
                return

    def wait_ready(self, timeout: float) -> tuple[EngineLimits, dict]:
        try:
            if not self.outbox.poll(timeout):
                raise EngineProcessError(f"engine process {self.rank} did not start within {timeout:.0f} s")
            message = self.outbox.recv()
        except EOFError:
            self.process.join(5)
            raise EngineProcessError(
                f"engine process {self.rank} exited while starting (exit code {self.process.exitcode})"
            ) from None
        if isinstance(message, Failed):
            raise EngineProcessError(f"engine process {self.rank} failed to start: {message.error}")
        return message.limits, message.info

    def close(self, timeout: float) -> None:
        self._sends.put(None)  # the writer sends what is queued (a Shutdown), then ends
        self._writer.join(timeout)
        with contextlib.suppress(OSError):
            self.inbox.close()  # the engine sees its pipe close and exits, whether or not a Shutdown reached it
        for process in (self.process, *self.ranks):
            process.join(timeout)
            if process.is_alive():
                process.kill()  # an engine process ignores SIGTERM (module docstring)
                process.join(5)


class AsyncEngine:
    """`data_parallel_size` engine processes for asyncio callers (the HTTP server).

    A request is read and checked here, once, in the server's process: `encode` (the prompt, through the
    tokenizer loaded here too), then `admit` (its parameters against the engines' limits). `submit` routes the
    checked request to an engine (`PrefixRouter`: the one that was sent the longest run of its prompt's pages,
    unless that one is busier than the least busy by more than a quarter of a batch; `prefix_routing=False`: the
    one with the fewest requests in flight), which trusts it, and returns its `RequestStream`.
    """

    def __init__(self, spec: EngineSpec, data_parallel_size: int = 1, prefix_routing: bool = True) -> None:
        if data_parallel_size < 1:
            raise UserError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if data_parallel_size > 1 and torch.device(spec.device).type != "cpu":
            raise UserError("data_parallel_size > 1 is for CPU serving: one engine per GPU, and a server drives one")
        if data_parallel_size > 1 and spec.tensor_parallel_size > 1:
            raise UserError("data_parallel_size and tensor_parallel_size cannot both be > 1: one sharded engine serves")
        self.spec, self.data_parallel_size, self.prefix_routing = spec, data_parallel_size, prefix_routing
        self.router: PrefixRouter | None = None
        self.tokenizer = load_tokenizer(spec.model_dir)  # for the chat template's special tokens too
        self.encoder: PromptEncoder | None = None
        self._handles: list[_EngineHandle] = []
        self._readers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._stop_lock = threading.Lock()  # shutdown may be called from two threads at once (the server's ends)
        self.limits: EngineLimits | None = None
        self._pool_pages = 0
        self.info: dict = {}

    def start(self, timeout: float = START_TIMEOUT_S) -> AsyncEngine:
        """Start the engine processes and wait until each has loaded the model; raises EngineProcessError
        with the engine's own error if one cannot start."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._handles = [_EngineHandle(context, self.spec, rank) for rank in range(self.data_parallel_size)]
        # An owner that exits without shutdown(), say on an error, must not hang there: multiprocessing's own exit
        # hook (run after this one) stops children with SIGTERM, which engine processes ignore, then waits on them.
        atexit.register(self.shutdown)
        try:
            ready = [h.wait_ready(timeout) for h in self._handles]
        except EngineProcessError:
            self.shutdown(5)
            raise
        self.limits, self.info = smallest_pools([limits for limits, _ in ready]), ready[0][1]
        self._pool_pages = sum(limits.usable_pages for limits, _ in ready)  # every engine's own pool, for kv_usage
        self.encoder = PromptEncoder(self.tokenizer, self.limits.vocab_size, self.limits.max_model_len)
        caching = self.prefix_routing and self.info["prefix_caching"]
        self.router = PrefixRouter(
            len(self._handles), self.limits.page_size, self.limits.usable_pages, caching, routing_slack(self.limits)
        )
        for h in self._handles:
            reader = threading.Thread(target=self._read, args=(h,), name=f"tessera-engine-{h.rank}-reader", daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engines; requests still in flight finish with reason "abort". A second call does nothing."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
        atexit.unregister(self.shutdown)
        for h in self._handles:
            h.send(Shutdown())
        for h in self._handles:
            h.close(timeout)
        for reader in self._readers:
            reader.join(timeout)

    # State, for /health and /metrics

    @property
    def healthy(self) -> bool:
        return bool(self._handles) and all(h.alive and all(p.is_alive() for p in h.ranks) for h in self._handles)

    @property
    def pids(self) -> list[int]:
        return [h.process.pid for h in self._handles]

    @property
    def requests_per_engine(self) -> list[int]:
        """Requests each engine has been given so far."""
        return [h.submitted for h in self._handles]

    def _total(self, field: str) -> int:
        """An EngineLoad field summed over the engines (their last reported state)."""
        return sum(getattr(h.load, field) for h in self._handles)

    @property
    def running(self) -> int:
        return self._total("running")

    @property
    def queue_depth(self) -> int:
        return self._total("waiting")

    @property
    def kv_usage(self) -> float:
        """Share of all engines' KV pages held by running requests."""
        total = self._pool_pages  # 0 until the engines have started
        return self._total("used_pages") / total if total else 0.0

    @property
    def preemptions(self) -> int:
        """Requests the engines paused for want of KV pages (Engine._preempt), since they started."""
        return self._total("preemptions")

    @property
    def prefix_queries(self) -> int:
        """Tokens of the requests the engines started, looked up in their prefix caches, since they started."""
        return self._total("prefix_queries")

    @property
    def prefix_hits(self) -> int:
        """Of `prefix_queries`, the tokens found cached."""
        return self._total("prefix_hits")

    # Requests

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def max_batch(self) -> int:
        """Requests running at once, all engines together."""
        return self.limits.max_batch * len(self._handles)

    def encode(self, prompt: str | list[int], what: str = "the prompt", special_tokens: bool = True) -> list[int]:
        """A prompt's checked token ids (PromptEncoder). Thread-safe: the server tokenises in worker threads."""
        return self.encoder(prompt, what, special_tokens)

    def admit(
        self, request_id: str, prompt: list[int], params: SamplingParams, exact_length: bool = False
    ) -> EngineRequest:
        """A request checked against the engines' limits (EngineLimits.admit), ready to `submit`."""
        return self.limits.admit(request_id, prompt, params, exact_length)

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a checked request (from the event loop's thread) on the engine the router chooses."""
        if self._stopping or not any(h.alive for h in self._handles):
            raise RuntimeError("the engine is shutting down" if self._stopping else "no engine process is running")
        self._loop = asyncio.get_running_loop()
        loads = [len(h.streams) if h.alive else None for h in self._handles]
        handle = self._handles[self.router.choose(request.prompt, loads)]
        stream = handle.streams[request.request_id] = RequestStream(handle, request.request_id)
        handle.submitted += 1
        handle.send(Add(request))
        return stream

    def _read(self, handle: _EngineHandle) -> None:
        """Reader thread of one engine: loads and outputs in, one event-loop call per step."""
        while True:
            try:
                message = handle.outbox.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Stopped):
                break
            if isinstance(message, Failed):  # the engine ended on an error (a tensor-parallel step's)
                handle.error = message.error
                break
            handle.load = message.load
            if message.outputs:
                self._call(self._deliver, handle, message.outputs)
        if not self._stopping:
            handle.alive = False  # new requests go to the other engines from now on
            handle.process.join(5)
            self._call(self._lost, handle, handle.process.exitcode)

    def _call(self, function, *args) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self._loop.call_soon_threadsafe(function, *args)

    def _deliver(self, handle: _EngineHandle, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = handle.streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its caller
            if out.finished:
                del handle.streams[out.request_id]
            stream.queue.put_nowait(out)

    def _lost(self, handle: _EngineHandle, exitcode: int | None) -> None:
        """An engine process died: its requests fail, and it runs nothing any more. It holds nothing now, but what it
        counted stays counted: a Prometheus counter that goes down reads as a restart, and rate() over it as a
        burst."""
        handle.load = replace(handle.load, running=0, waiting=0, used_pages=0)
        self.router.forget(handle.rank)
        message = f"engine process {handle.rank} exited (exit code {exitcode})"
        if handle.error:
            message = f"engine process {handle.rank} failed: {handle.error}"
        self._deliver(handle, [RequestOutput.failure(rid, message) for rid in handle.streams])
