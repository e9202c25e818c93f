"""The `tessera` command line: info, generate, serve, quantize, demo, demo-parent, bench, search, calibrate, optimize,
fuse.

User mistakes (a malformed config.json, a missing tensor, a prompt longer than the context, a CUDA request
on a machine without one) raise a `UserError` (tessera/errors.py) and end in one line `tessera: error: ...`
and exit status 2, never a traceback; any other exception is a bug and shows its traceback. Flags are
checked where they enter, before any work: numbers against their ranges (argparse `type=` functions below), text
for UTF-8, output paths by `check_output`. Ctrl-C ends in one line `tessera: interrupted` and exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tessera.config import FP8_NAME, ArchConfig, ConfigError, activation_dtype
from tessera.devices import RUN_DTYPES, parse_dtype, resolve_device, serving_dtype
from tessera.errors import UserError, UserFileNotFound
from tessera.files import atomic_write_text
from tessera.runtime.async_engine import EngineProcessError
from tessera.runtime.loader import is_checkpoint_file


def _ranged(
    kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> Callable[[str], int | float]:
    """An argparse `type`: a finite int or float in [low, high] ((low, high] with open_low). argparse reports a bad
    value as `tessera CMD: error: argument --FLAG: must be >= 1, got 0` with exit status 2."""
    fmt = "d" if kind is int else "g"
    if low is not None and high is not None:
        rule = f"in {'(' if open_low else '['}{low:{fmt}}, {high:{fmt}}]"
    elif low is not None:
        rule = f"{'>' if open_low else '>='} {low:{fmt}}"

    def parse(text: str) -> int | float:
        value = _convert(text, kind)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


def _convert(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


positive_int = _ranged(int, 1)
nonnegative_int = _ranged(int, 0)
port_number = _ranged(int, 1, 65535)
positive_float = _ranged(float, 0, open_low=True)
nonnegative_float = _ranged(float, 0)
cosine_distance = _ranged(float, 0, 2)  # FFN Fusion's dependency: 1 - cos, 0 (independent) to 2 (opposite)


def _field(where: str, name: str, kind: type) -> Callable[[str], int | float]:
    """An argparse `type` for a flag that sets dataclass field `name` of `where` ("module:Class"): the value is
    checked by the dataclass itself (the one place its range is written), and argparse names the flag."""

    def parse(text: str) -> int | float:
        value = _convert(text, kind)
        module, cls = where.split(":")
        try:
            getattr(importlib.import_module(module), cls)(**{name: value})
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name}: ")) from None
        return value

    return parse


def _sampling(name: str, kind: type) -> Callable[[str], int | float]:
    return _field("tessera.runtime.sampling:SamplingParams", name, kind)


def _scenario_field(name: str) -> Callable[[str], int]:
    return _field("tessera.search.cost:Scenario", name, int)


def scenario_spec(text: str):
    """'1x128x64' -> Scenario, as an argparse type (a bad one is a one-line usage error)."""
    from tessera.search.cost import Scenario

    try:
        return Scenario.parse(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(name: str, kind: type = float) -> Callable[[str], int | float]:
    return _field("tessera.search.pipeline:Budget", name, kind)


def speedup_list(text: str) -> tuple[float, ...]:
    """'1.25,2.0' -> (1.25, 2.0); '' -> ()."""
    return tuple(_budget("target_speedup")(x) for x in text.split(",") if x.strip())


def positive_ints(text: str) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16): each a positive integer, at least one (layer counts, attention windows)."""
    counts = tuple(positive_int(x) for x in text.split(",") if x.strip())
    if not counts:
        raise argparse.ArgumentTypeError(f"expected positive integers like 4,8,16, got {text!r}")
    return counts


def _add_windows(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--windows",
        type=positive_ints,
        default=(),
        metavar="N,N,...",
        help="attention windows (keys) offered beside each KV-head count, e.g. 128,512 (default: none)",
    )


def utf8_text(text: str) -> str:
    """Text from argv, refused (naming the byte) when it is not UTF-8: sampling.check_text as an argparse type."""
    from tessera.runtime.sampling import check_text

    try:
        check_text(text, "the text")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("the text is ")) from None
    return text


def _holds(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return folder == path or folder in path.parents


def check_output(
    path: str | Path,
    flag: str,
    *,
    folder: bool,
    command: str | None = None,
    ours: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    inputs: dict[str, Path] | None = None,
    writes: Callable[[str], bool] | None = None,
) -> Path:
    """Check an output path before any work starts, so a long run never fails (or destroys something) at its end.

    folder: the output is a folder (created with its parents) or a file (its folder must exist). ours: recognises
    a previous output of `command`; an existing output it does not recognise (a non-empty folder, a file) is
    refused unless `overwrite`. writes: the names `command` writes in a folder it replaces whole; a previous
    output that also holds others (a user's notes) is refused unless `overwrite`, as they would be lost.
    inputs: {flag: path} the output folder must not hold, whatever `overwrite` says."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    if not folder and not path.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    start = path if folder else path.parent
    nearest = next(p for p in (start, *start.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(f"{flag} {path}: {nearest} is a file, not a folder")
    try:  # a folder made and removed: permission bits say nothing for root, nor of /proc or a full disk
        os.rmdir(tempfile.mkdtemp(prefix=".tessera-probe-", dir=nearest))
    except OSError as e:
        raise UserError(f"{flag} {path}: {nearest} is not writable ({e.strerror})") from None
    for name, given in (inputs or {}).items():
        if folder and _holds(path, given):
            raise UserError(f"{flag} {path}: holds {name} {given}; write the output somewhere else")
    in_use = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if ours is not None and in_use and not overwrite and not ours(path):
        what = "a non-empty folder" if folder else "an existing file"
        raise UserError(
            f"{flag} {path}: {what} that is not the output of a previous `tessera {command}`; "
            "pass --overwrite to replace it"
        )
    replaced = writes is not None and folder and path.is_dir() and not overwrite  # a previous output of ours
    others = sorted(entry.name for entry in path.iterdir() if not writes(entry.name)) if replaced else []
    if others:
        raise UserError(
            f"{flag} {path}: the output of a previous `tessera {command}` that also holds {', '.join(others)}, "
            f"which `tessera {command}` would delete (it replaces the folder whole); move them, or pass --overwrite"
        )
    return path


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _weights_in(dtype: str) -> str:
    if dtype == activation_dtype(dtype):
        return dtype
    return f"{dtype} projections and LM head copy, {activation_dtype(dtype)} embeddings and stored head"


def _format_info(arch: ArchConfig, source: str) -> str:
    s = arch.summary()
    lines = [
        f"{source}",
        f"  {s['family']} family, layers {s['num_layers']}, hidden {s['hidden_size']}, heads {s['num_heads']} x "
        f"{s['head_dim']}, vocab {s['vocab_size']}, tied embeddings {arch.tie_embeddings}",
        f"  parameters      {s['num_params']:,} ({_short(s['num_params'])})",
        f"  weight bytes    {s['weight_bytes']:,} ({_weights_in(arch.run_dtype)})",
        f"  KV bytes/token  {s['kv_bytes_per_token']:,} ({activation_dtype(arch.run_dtype)}; "
        f"{arch.kv_bytes_per_token(kv_dtype=FP8_NAME):,} with --kv-cache-dtype fp8, "
        f"{'calibrated scales' if arch.kv_cache_scales else 'uncalibrated: scale 1.0'})",
        f"  FLOPs/token     {s['flops_per_token']:,} (no context)",
        f"  depth           {s['sequential_depth']} sequential sublayers (attention and FFN count one each)",
        f"  empty layers    {len(s['empty_layers'])} (attention and FFN both no-op: no weights, no launch, no cache)",
    ]
    if s["fused_ffns"]:
        widths = [f["intermediate_size"] for f in s["fused_ffns"]]
        lines.append(
            f"  fused FFNs      {len(widths)} (widths {min(widths):,} to {max(widths):,}), each replacing the FFNs of "
            f"its span: " + ", ".join(f"layers {f['span'][0]}-{f['span'][1]}" for f in s["fused_ffns"])
        )
    lines += [
        "",
        f"  {'layer':>5}  {'attention':<18} {'ffn':<20} {'params':>16} {'KV B/token':>10}",
    ]
    fused = {f["layer"] for f in s["fused_ffns"]}
    for layer in s["layers"]:
        att = f"gqa kv={layer['n_kv_heads']}" if layer["attention"] == "gqa" else layer["attention"]
        att += "" if layer["window"] is None else f" w={layer['window']}"
        ffn = f"swiglu {layer['intermediate_size']}" if layer["ffn"] == "swiglu" else layer["ffn"]
        ffn += " fused" if layer["layer"] in fused else ""
        lines.append(
            f"  {layer['layer']:>5}  {att:<18} {ffn:<20} {layer['num_params']:>16,} {layer['kv_bytes_per_token']:>10,}"
        )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    arch = ArchConfig.from_json(args.model)
    try:
        tp = arch.tensor_parallel_summary(args.tensor_parallel_size) if args.tensor_parallel_size else None
    except ConfigError as e:
        raise ConfigError(f"{args.model}: --tensor-parallel-size: {e}") from None
    if args.json:
        print(json.dumps(arch.summary() | ({"tensor_parallel": tp} if tp else {}), indent=2))
        return
    print(_format_info(arch, str(args.model)))
    if tp:
        replicated = tp["replicated_kv_layers"]
        print(
            f"\n  tensor parallel over {tp['tensor_parallel_size']} ranks, per rank: {tp['rank_num_params']:,} "
            f"parameters ({_short(tp['rank_num_params'])}), {tp['rank_weight_bytes'] / 2**30:.2f} GiB of weights "
            f"({_weights_in(arch.run_dtype)}), {tp['rank_kv_bytes_per_token']:,} KV bytes/token; KV heads "
            f"replicated on {len(replicated)} layers with fewer than {tp['tensor_parallel_size']}"
        )


def _rank_device(device: torch.device, launch) -> torch.device:
    """The device this process checks memory on: under torchrun on GPUs its machine's GPU LOCAL_RANK, the one its
    rank will use (join_group sets it), not GPU 0, where every rank would also leave a CUDA context."""
    from tessera.runtime.parallel import torchrun_local

    if launch.torchrun and device.type == "cuda":
        return torch.device("cuda", torchrun_local()[0])
    return device


def _generator(model_path: str, device: str, dtype: str, kv_cache_dtype: str = "auto"):
    from tessera.runtime.generate import Generator
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import load_tokenizer

    # The tokenizer before the weights: a checkpoint folder without one is said at once, not after the load (a
    # path that is no folder gets the loader's own error, which comes first then).
    tokenizer = load_tokenizer(model_path) if Path(model_path).is_dir() else None
    model = load_model(model_path, device=resolve_device(device), dtype=parse_dtype(dtype))
    return Generator(model, tokenizer, kv_cache_dtype)


def _note_kv_scales(model_dir: str | Path, kv_cache_dtype: str) -> None:
    """An FP8 KV cache without calibrated scales runs at UNCALIBRATED_KV_SCALE: say so, and how to fix it. (A
    folder without config.json is left to the loader, which names what is missing.)"""
    from tessera.runtime.cache import UNCALIBRATED_KV_SCALE

    config = Path(model_dir) / "config.json"
    if kv_cache_dtype == "fp8" and config.is_file() and not ArchConfig.from_json(config).kv_cache_scales:
        print(
            "note: the checkpoint has no FP8 KV-cache scales; keys and values are stored at scale "
            f"{UNCALIBRATED_KV_SCALE} (values past ±448 clip). Calibrate them with "
            "`tessera quantize --kv-cache-scales`.",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from tessera.runtime.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        logprobs=args.logprobs,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )  # checked before the model loads
    from tessera.runtime.loader import check_memory
    from tessera.runtime.parallel import Launch

    device, launch = resolve_device(args.device), Launch.of(args.tensor_parallel_size)
    # Tensor-parallel ranks on the CPU share its memory; on GPUs each holds a device of their own.
    copies = launch.local if device.type == "cpu" else 1
    check_memory(args.model, _rank_device(device, launch), parse_dtype(args.dtype), launch.size, copies)
    if launch.rank == 0:
        _note_kv_scales(args.model, args.kv_cache_dtype)
    start = time.perf_counter()
    if launch.torchrun:  # torchrun started the ranks (one node or several): rank 0 prints
        from tessera.runtime.parallel import generate_with_torchrun

        kv = args.kv_cache_dtype
        completions = generate_with_torchrun(launch, args.model, args.prompt, params, device, args.dtype, kv)
        if launch.rank > 0:
            return
    elif launch.size > 1:
        from tessera.runtime.parallel import generate_on_ranks

        kv = args.kv_cache_dtype
        completions = generate_on_ranks(args.model, args.prompt, params, launch.size, device, args.dtype, kv)
    else:
        completions = _generator(args.model, args.device, args.dtype, args.kv_cache_dtype).generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    if args.json:
        out = [
            {"prompt": p, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}
            for p, c in zip(args.prompt, completions)
        ]
        if args.logprobs is not None:
            for o, c in zip(out, completions):
                o["logprobs"] = [{"token": e.token_id, "logprob": e.logprob, "top": e.top} for e in c.logprobs]
        print(json.dumps(out, indent=2))
        return
    tok = None
    if args.logprobs is not None:
        from tessera.runtime.sampling import load_tokenizer

        tok = load_tokenizer(args.model)
    for prompt, c in zip(args.prompt, completions):
        print(f"{prompt}{c.text}")
        print(f"--- [{len(c.tokens)} tokens, finish: {c.finish_reason}]")
        if c.logprobs is not None:
            _print_logprobs(c.logprobs, tok)
    n = sum(len(c.tokens) for c in completions)
    print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s, batch {len(completions)})", file=sys.stderr)


def _print_logprobs(entries, tok) -> None:
    """Each token's log-probability and its likeliest alternatives, a line per token."""

    def shown(token: int) -> str:
        return f"{tok.decode([token], skip_special_tokens=False)!r} ({token})"

    for e in entries:
        top = ", ".join(f"{shown(t)} {lp:.3f}" for t, lp in e.top)
        print(f"    {shown(e.token_id)}: {e.logprob:.3f}" + (f"; likeliest: {top}" if top else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from tessera.demo import DEMO_PROMPTS, PARENT_DIR
    from tessera.runtime.sampling import SamplingParams

    model_dir = Path(args.model or PARENT_DIR)
    print(_format_info(ArchConfig.from_json(model_dir), f"model: {model_dir}"))
    report = model_dir / "training.json"
    if report.is_file():  # the demo parent's training report; another model's file of that name is passed over
        try:
            r = json.loads(report.read_text())
            print(f"  trained: validation loss {r['val_loss']:.3f} (perplexity {r['val_perplexity']:.1f})\n")
        except (OSError, ValueError, TypeError, KeyError):
            print(f"  ({report} is not a tessera training report: not shown)\n")
    gen = _generator(str(model_dir), args.device, "float32")
    for title, params in (
        ("greedy", SamplingParams(max_new_tokens=args.max_new_tokens)),
        ("sampled (T=0.8, top-p 0.95, seed 0)", SamplingParams(args.max_new_tokens, 0.8, top_p=0.95, seed=0)),
    ):
        start = time.perf_counter()
        completions = gen.generate(list(DEMO_PROMPTS), params)
        elapsed = time.perf_counter() - start
        n = sum(len(c.tokens) for c in completions)
        print(f"=== {title}: batch of {len(DEMO_PROMPTS)} prompts, {n} tokens, {n / elapsed:.0f} tokens/s")
        for prompt, c in zip(DEMO_PROMPTS, completions):
            print(f"{prompt}\033[1m{c.text}\033[0m" if sys.stdout.isatty() else f"{prompt}{c.text}")
            print(f"--- finish: {c.finish_reason}")


def cmd_demo_parent(args: argparse.Namespace) -> None:
    from tessera.demo import build as demo_parent

    if args.step == "corpus":
        print(json.dumps(demo_parent.snapshot_corpus(), indent=2))
    else:
        report = demo_parent.train_parent(steps=args.steps, seed=args.seed)
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


def cmd_bench(args: argparse.Namespace) -> None:
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from tessera.benchmarks import run

    if args.pdl and args.what != "model":
        raise UserError(f"--pdl compares decode steps: it goes with `bench model`, not `bench {args.what}`")
    if args.profile and args.what != "model":
        raise UserError(f"--profile profiles decode steps: it goes with `bench model`, not `bench {args.what}`")
    if args.profile and args.pdl:
        raise UserError("--profile and --pdl: one at a time (each is its own run of `bench model`)")
    results = check_output(args.results or run.results_dir(), "--results", folder=True)
    if args.what == "kernels":
        paths = run.run_kernels(device, args.suite, out=results)
    elif args.what == "serving":
        paths = [run.run_serving(device, out=results)]
    elif args.what == "parallel":
        paths = [run.run_parallel(device, out=results)]
    elif args.what == "search-scale":
        paths = [run.run_search_scale(device, out=results, depths=args.depths, shape=args.shape, scoring=args.scoring)]
    elif args.what == "cost-model":
        paths = [run.run_cost_model(device, out=results)]
    elif args.what == "prefix":
        paths = [run.run_prefix(device, out=results)]
    elif args.what == "model":
        if args.profile:
            paths = [run.run_model_profile(device, out=results)]
        else:
            paths = [run.run_model_pdl(device, out=results) if args.pdl else run.run_model(device, out=results)]
    else:
        paths = [run.run_fusion(device, out=results)]
    for path in paths:
        print(f"\n{path.with_suffix('.md').read_text()}wrote {path} and {path.with_suffix('.md').name}")


def cmd_serve(args: argparse.Namespace) -> None:
    from tessera.demo import PARENT_DIR
    from tessera.runtime.loader import check_memory, checkpoint_dir
    from tessera.runtime.parallel import Launch
    from tessera.runtime.server import addresses, build_server, engine_spec, listening_sockets, run

    # Under torchrun (several nodes, docs/runtime.md) every rank it started is one rank of the model: rank 0
    # serves HTTP, the others follow its engine.
    launch, dp = Launch.of(args.tensor_parallel_size), args.data_parallel_size
    tp, local = launch.size, launch.local  # the model's ranks, those on this machine
    if launch.torchrun and dp > 1:
        raise UserError("--data-parallel-size under torchrun: torchrun's ranks shard one engine (tensor parallel)")
    cores = os.cpu_count() or 1
    if args.threads is not None and args.threads > cores:  # 5,000 threads on 2 cores kept an engine from starting
        raise UserError(f"--threads {args.threads}: this machine has {cores} cores; more threads than cores contend")
    threads = None
    if args.device == "cpu":
        # The cores are split between the engine processes; the HTTP side (its own process) needs little. On the
        # 2-core dev VM at 16 concurrent streams, 2 threads served 1,302 output tokens/s and 1 thread 958 (issue 6).
        threads = args.threads or max(1, cores // (dp * local))
    if args.served_model_name == "":
        raise UserError("--served-model-name: empty (clients name the model by it; leave it out for the folder's name)")
    model = str(checkpoint_dir(args.model or PARENT_DIR))
    device = resolve_device(args.device)
    # Each engine process loads its weights: on one GPU or the CPU their copies share the memory; tensor-parallel
    # ranks on GPUs each hold a device of their own.
    copies = dp * local if device.type == "cpu" else dp
    check_memory(model, _rank_device(device, launch), parse_dtype(args.dtype), tp, copies)
    if launch.rank == 0:
        _note_kv_scales(model, args.kv_cache_dtype)
    engine = dict(
        device=device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30),
        threads=threads,
        tensor_parallel_size=tp,
        torchrun=launch.torchrun,
        kv_cache_dtype=args.kv_cache_dtype,
        page_size=args.page_size,
        prefix_caching=not args.no_prefix_caching,
        async_scheduling=False if args.no_async_scheduling else None,
    )
    if launch.rank > 0:
        from tessera.runtime.async_engine import follow

        print(f"tessera serve: rank {launch.rank} of {tp} (torchrun) follows rank 0's engine", file=sys.stderr)
        # Ctrl-C reaches every process of the node, this one too: it waits for the Shutdown rank 0's server then
        # broadcasts, rather than leaving rank 0's collective without it. SIGTERM still stops it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if why := follow(engine_spec(model, **engine), launch.rank):
            raise UserError(f"tessera serve: rank {launch.rank} of {tp}: {why}")
        return
    sockets = listening_sockets(args.host, args.port)  # an address in use is said before the engines load
    # SIGTERM while the engines start (loading can take minutes): an interrupt, so the engine processes, which
    # ignore SIGTERM, are shut down at exit instead of outliving the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = build_server(
        model,
        served_model_name=args.served_model_name,
        data_parallel_size=dp,
        max_request_bytes=None if args.max_request_mib is None else int(args.max_request_mib * 2**20),
        **engine,
    )
    info = server.engine.info
    threads, packed = info["threads"], info["packed_matrices"]
    engines = f"{dp} engine process{'es' if dp > 1 else ''} of {threads} thread{'s' if threads > 1 else ''}"
    if dp > 1 and info["prefix_caching"]:
        engines += ", requests routed by cached prefix"
    if tp > 1:
        ranks = f"{tp} torchrun ranks" if launch.torchrun else f"{tp} processes"
        engines = f"1 engine sharded over {ranks} of {threads} thread{'s' if threads > 1 else ''}"
    print(
        f"tessera serve: {server.model_name} on {info['device']} ({info['dtype']}, {engines}); "
        f"max batch {args.max_batch} "
        f"per engine, context {info['max_model_len']}, KV pool {info['pages']} pages of {info['page_size']} tokens "
        f"({info['kv_mib']:.1f} MiB, {info['kv_dtype']}) per engine{', CUDA graphs' if info['cuda_graphs'] else ''}"
        f"{', async scheduling' if info['async_scheduling'] else ''}"
        f"{f', {packed} matrices packed for oneDNN' if packed else ''}; listening on {addresses(sockets)}",
        file=sys.stderr,
    )
    run(server, sockets, args.graceful_timeout)


def cmd_search_solve(args: argparse.Namespace) -> None:
    from tessera.search.library import read_library
    from tessera.search.mip import merge_bounds, parse_bound, solve

    library = read_library(args.library)
    bounds = merge_bounds(
        [parse_bound(t, upper=True) for t in args.max or ()] + [parse_bound(t, upper=False) for t in args.min or ()]
    )
    start = time.perf_counter()
    found = solve(library, args.objective, args.maximize, bounds, args.solutions, args.min_diversity)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps([s.to_json() for s in found], indent=2))
        return
    sense = "max" if args.maximize else "min"
    print(f"{args.library}: {len(library)} layers; {sense} {args.objective}; solved in {elapsed:.2f} s")
    for k, s in enumerate(found, start=1):
        totals = ", ".join(f"{key} {v:.4g}" for key, v in s.totals.items())
        print(f"\nsolution {k}: objective {s.objective:.6g} ({totals})")
        for layer, variant in s.choices.items():
            print(f"  {layer:>10}  {variant}")


def _optimize_resume_hint(args: argparse.Namespace) -> str:
    """How to resume an interrupted `optimize`: --fresh again would delete what it distilled."""
    kept = f"the blocks distilled so far, if any, are kept in {args.out}/bld"
    if args.fresh:  # run again, --fresh would delete them
        return f"rerun the command without --fresh to resume ({kept}; with it they are deleted and distilled again)"
    return f"rerun the same command to resume ({kept})"


def _scenario(args: argparse.Namespace):
    from tessera.search.cost import Scenario

    return Scenario(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len)


def _is_cost_table(path: Path) -> bool:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(table, dict) and {"device", "scenario", "non_block_ms", "blocks"} <= table.keys()


def _other_rank(command: str, why: str) -> bool:
    """Under torchrun, whether this is a rank other than 0 of a command that runs on rank 0 alone (said once)."""
    from tessera.runtime.parallel import torchrun_world

    rank = torchrun_world()[0]
    if rank > 0:
        print(f"tessera {command}: rank {rank} has nothing to do: {why}; rank 0 runs it", file=sys.stderr)
    return rank > 0


def cmd_calibrate(args: argparse.Namespace) -> None:
    from tessera.search.cost import blocks_to_time, calibrate
    from tessera.search.library import SearchSpace

    if _other_rank("calibrate", "blocks timed by processes or devices apart would not compose into one table"):
        return

    out = check_output(
        args.out, "--out", folder=False, command="calibrate", ours=_is_cost_table, overwrite=args.overwrite
    )
    device = resolve_device(args.device)
    arch = ArchConfig.from_json(args.model)
    space = SearchSpace(windows=args.windows)
    blocks, check = blocks_to_time(arch, space, args.validate)
    dtype = serving_dtype(device, args.timing_dtype)
    table = calibrate(arch, blocks, _scenario(args), device, dtype, check if args.validate else [])
    atomic_write_text(out, json.dumps(table.to_json(), indent=1) + "\n")
    print(f"{table.device}: non-block {table.non_block_ms:.2f} ms")
    for name, t in table.blocks.items():
        times = f"prefill {t['prefill_ms']:8.3f} ms  decode {t['decode_ms']:7.3f} ms  total {t['runtime_ms']:9.2f} ms"
        print(f"  {name:<26} {times}")
    if table.validation:
        v = table.validation
        print(
            f"predicted vs measured on the model and {len(v['architectures']) - 1} random architectures: "
            f"mean abs error {100 * v['mean_abs_error']:.1f} %, max {100 * v['max_abs_error']:.1f} %"
        )
    if table.non_block_ms < 0:  # optimize refuses to budget latency with such a table (pipeline.block_bounds)
        print(
            f"warning: the non-block part came out negative ({table.non_block_ms:.2f} ms: the blocks' times add up to "
            "more than the whole model's), a sign of noisy timings (another process on the device?); `tessera "
            "optimize` refuses a latency budget whose fastest architecture it predicts at 0 ms or less",
            file=sys.stderr,
        )
    print(f"wrote {args.out}")


# What `tessera optimize` writes into --out (search/pipeline.py). The first three mark a run, finished or not:
# cost.json is its first output (before any training), bld/ the resumable store of distilled blocks.


def _is_optimize_run(path: Path) -> bool:
    from tessera.search.pipeline import RUN_MARKS

    return any((path / name).exists() for name in RUN_MARKS)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def cmd_optimize(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from tessera.demo import CORPUS_DIR, PARENT_DIR
    from tessera.search.bld import BLDConfig
    from tessera.search.fusion import FusionConfig
    from tessera.search.gkd import GKDConfig
    from tessera.search.library import SearchSpace
    from tessera.search.pipeline import Budget, OptimizeConfig, is_run_output, optimize

    model, corpus = Path(args.model or PARENT_DIR), Path(args.corpus or CORPUS_DIR)
    inputs = {"--model": model, "--corpus": corpus, "the current folder": Path.cwd()}
    out = check_output(
        args.out,
        "--out",
        folder=True,
        command="optimize",
        ours=_is_optimize_run,
        overwrite=args.overwrite,
        inputs=inputs,
    )
    # Its child/ and fused/ are replaced whole (or removed): a file of the user's there is refused as at the top.
    from tessera.search.fusion import FUSION_OUTPUTS

    for name, writes in (
        ("child", lambda file: is_checkpoint_file(file, model)),
        ("fused", lambda file: is_checkpoint_file(file, model) or file in FUSION_OUTPUTS),
    ):
        if (out / name).is_dir():
            check_output(out / name, "--out", folder=True, command="optimize", overwrite=args.overwrite, writes=writes)
    _corpus(args)
    # --overwrite: what the folder held that a run does not write goes once the run has finished.
    leftovers = [p for p in out.iterdir() if not is_run_output(p.name)] if args.overwrite and out.is_dir() else []
    budget = Budget(
        args.target_speedup, args.max_latency_ms, args.max_memory_mib, args.min_throughput, args.max_kv_heads
    )
    if budget == Budget():
        budget = Budget(target_speedup=1.5)
    scenario = _scenario(args)
    cfg = OptimizeConfig(
        space=SearchSpace(
            linear_attention=not args.no_linear_attention, ffn_multiple=args.ffn_multiple, windows=args.windows
        ),
        scenario=scenario,
        also_scenarios=tuple(s for s in dict.fromkeys(args.also_scenario) if s != scenario),  # once each
        bld=replace(BLDConfig(), steps=args.bld_steps),
        gkd=replace(GKDConfig(), steps=args.gkd_steps, batch_size=args.gkd_batch_size, seq_len=args.seq_len),
        pareto_speedups=args.pareto,
        fusion=FusionConfig(heal_steps=args.gkd_steps, seq_len=args.seq_len) if args.fuse else None,
        device=str(resolve_device(args.device)),
        timing_dtype=args.timing_dtype,
        scoring=args.scoring,
        fisher_samples=args.fisher_samples,
        seq_len=args.seq_len,
    )
    results = optimize(model, out, budget, cfg, corpus, fresh=args.fresh)
    if results is None:  # another rank than 0 of a sharded search (torchrun): rank 0 reports
        return
    for path in leftovers:
        _remove(path)
    print((out / "report.md").read_text())
    print(f"child checkpoint: {results['child_dir']}")
    if results.get("fusion", {}).get("groups"):
        print(f"fused child checkpoint: {out / 'fused'}")


def _is_fuse_output(path: Path) -> bool:
    return (path / "fusion.json").is_file()


def cmd_fuse(args: argparse.Namespace) -> None:
    if _other_rank("fuse", "FFN Fusion is not sharded over ranks"):
        return
    from dataclasses import replace

    from tessera.demo import CORPUS_DIR
    from tessera.search.data import load_frozen, load_parent
    from tessera.search.fusion import FUSION_OUTPUTS, FusionConfig, FusionError, parse_groups, run_fusion
    from tessera.search.train import check_tokens, fixed_windows

    # Text is needed to choose groups, to heal and to score: explicit --groups with --heal-steps 0 and no
    # --corpus is the pure transform, for a checkpoint without a tokenizer or a corpus.
    uses_text = args.groups is None or args.heal_steps > 0 or args.corpus is not None
    model_dir, corpus = Path(args.model), Path(args.corpus or CORPUS_DIR)
    inputs = {"--model": model_dir, "the current folder": Path.cwd()} | ({"--corpus": corpus} if uses_text else {})
    out = check_output(
        args.out,
        "--out",
        folder=True,
        command="fuse",
        ours=_is_fuse_output,
        overwrite=args.overwrite,
        inputs=inputs,
        writes=lambda name: is_checkpoint_file(name, model_dir) or name in FUSION_OUTPUTS,
    )
    # Loading for fusion dequantizes an FP8 checkpoint (float32 for training), which run_fusion's own check then
    # cannot see: the fused model would be written unquantized, its quantization dropped without a word.
    if (quantization := ArchConfig.from_json(model_dir).quantization) is not None:
        raise FusionError(
            f"--model {model_dir}: its weights are {quantization}; fuse the unquantized model, then quantize the "
            "fused one"
        )
    if uses_text:
        _corpus(args)
    cfg = FusionConfig(
        spans=tuple(parse_groups(args.groups)) if args.groups is not None else None,
        threshold=args.threshold,
        heal_steps=args.heal_steps,
        block_threshold=args.block_threshold,
    )
    if cfg.spans is not None and cfg.threshold is not None:
        raise FusionError("give --groups or --threshold, not both")
    device = resolve_device(args.device)
    if uses_text:
        parent = load_parent(model_dir, corpus, device, keep_kv_scales=True)  # fusion keeps attention as it is
        model, train_ids = parent.model, parent.train_ids
        # Windows as long as the model's context allows (a checkpoint of a shorter context than the default).
        cfg = replace(cfg, seq_len=min(cfg.seq_len, model.arch.max_position_embeddings))
        for split, tokens in (("train", train_ids), ("validation", parent.val_ids)):
            check_tokens(tokens, cfg.seq_len, f"--corpus {corpus}: its {split} split")
        eval_windows = fixed_windows(parent.val_ids, cfg.seq_len, args.eval_windows)
        if len(eval_windows) < args.eval_windows:  # said, and fusion.json records how many
            print(
                f"--eval-windows {args.eval_windows}: the validation split holds {len(eval_windows)} windows of "
                f"{cfg.seq_len} tokens; evaluating on those",
                file=sys.stderr,
            )
    else:
        model, train_ids, eval_windows = load_frozen(model_dir, device, keep_kv_scales=True), None, None
    # run_fusion replaces --out whole once complete: an earlier output (or, with --overwrite, another model's
    # training.json and plots) never lingers beside the new checkpoint, and Ctrl-C leaves --out as it was.
    scenario, timing = _scenario(args), args.timing_dtype
    info = run_fusion(
        model,
        train_ids,
        eval_windows,
        out,
        cfg,
        scenario,
        model_dir,
        timing_dtype=timing,
        keep_checkpoint=not args.overwrite,
    )
    if "kept" in info:
        raise FusionError(f"{model_dir}: nothing to fuse ({info['reason']}); {out} keeps the fused model it held")
    print((out / "fusion.md").read_text())
    if not info["groups"]:
        raise FusionError(f"{model_dir}: nothing to fuse ({info['reason']}); the analysis is in {out}")
    print(f"fused checkpoint: {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from tessera.kernels import FP8
    from tessera.runtime.loader import check_memory, load_model, save_model

    model_dir = Path(args.model)
    if args.corpus is not None and not args.kv_cache_scales:
        raise UserError("--corpus is read only to calibrate KV-cache scales: add --kv-cache-scales")
    corpus = _corpus(args) if args.kv_cache_scales else None
    inputs = {"--model": model_dir, "the current folder": Path.cwd()} | ({"--corpus": corpus} if corpus else {})
    out = check_output(
        args.out,
        "--out",
        folder=True,
        command="quantize",
        ours=_quantize_output,
        overwrite=args.overwrite,
        inputs=inputs,
        writes=lambda name: is_checkpoint_file(name, model_dir),
    )
    device = resolve_device(args.device)
    windows = None
    if corpus is not None:  # the text first: a tokenizer or corpus that cannot calibrate is said before the load
        from tessera.runtime.sampling import load_tokenizer
        from tessera.search.data import encode_split
        from tessera.search.train import check_tokens, fixed_windows

        arch = ArchConfig.from_json(model_dir)
        # The FP8 model's own keys and values (as they will be served), on text the evaluation does not use.
        seq_len = min(KV_CALIBRATION_LEN, arch.max_position_embeddings)
        tokens = encode_split(load_tokenizer(model_dir), "train", corpus, arch.eos_token_ids)
        check_tokens(tokens, seq_len, f"--corpus {corpus}: its train split")
        windows = fixed_windows(tokens, seq_len, KV_CALIBRATION_WINDOWS)
    # Built in FP8 and quantized a sublayer at a time as it is read (Model.load_packed): FP8's bytes, not bf16's.
    check_memory(model_dir, device, FP8, remedy="quantize on a device with more free memory (--device)")
    model = load_model(model_dir, device, FP8)
    what = "E4M3 weights, per-channel scales"
    if windows is not None:
        scales = model.calibrate_kv_scales(windows[:, :-1])
        what += f", FP8 KV-cache scales of {len(scales)} layers from {windows.shape[0]} x {seq_len} tokens of {corpus}"
    save_model(model, out, tokenizer_from=model_dir, carry_over=False)  # nothing in an old --out is this model's
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"FP8 checkpoint ({what}; compressed-tensors layout): {out} ({size / 2**20:.1f} MiB of safetensors)")


def _quantize_output(folder: Path) -> bool:
    """Whether `folder` is an earlier `tessera quantize` output: a checkpoint whose config.json holds exactly the
    quantization_config tessera writes. Any other checkpoint (every one has a config.json), an FP8 one
    llm-compressor wrote included (it records its version, compression ratio, ...), is not."""
    from tessera.hf_config import quantization_config

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    written = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(written, dict) and written == quantization_config(True, "kv_cache_scheme" in written)


KV_CALIBRATION_WINDOWS, KV_CALIBRATION_LEN = 32, 512  # `quantize --kv-cache-scales`: 16k tokens of the train split


def _add_device(p: argparse.ArgumentParser, dtype: bool = False) -> None:
    """--device (and --dtype, --kv-cache-dtype) as every command that runs a model takes them."""
    from tessera.runtime.engine import KV_CACHE_DTYPES

    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    if dtype:
        p.add_argument("--dtype", default="float32", choices=list(RUN_DTYPES))
        p.add_argument(
            "--kv-cache-dtype",
            default="auto",
            choices=list(KV_CACHE_DTYPES),
            help="auto: K/V in the compute dtype; fp8: E4M3 with the checkpoint's per-layer scales (half of bf16's "
            "bytes: twice the tokens in the same KV budget)",
        )


def _corpus(args: argparse.Namespace) -> Path:
    """--corpus (default: the demo's), checked before any work."""
    from tessera.demo import CORPUS_DIR
    from tessera.search.data import check_corpus

    if args.corpus is not None:
        return check_corpus(args.corpus)
    try:
        return check_corpus(CORPUS_DIR)
    except UserFileNotFound as e:
        raise UserFileNotFound(
            f"{e}; the demo corpus ships with the repository: restore demo/corpus from git"
        ) from None


def _add_scenario(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_scenario_field("batch"), default=8, help="scenario: sequences generated together")
    p.add_argument(
        "--prompt-len", type=_scenario_field("prompt_len"), default=128, help="scenario: prompt tokens per sequence"
    )
    p.add_argument(
        "--gen-len", type=_scenario_field("gen_len"), default=64, help="scenario: generated tokens per sequence"
    )
    _add_device(p)
    p.add_argument(
        "--timing-dtype",
        default=None,
        choices=list(RUN_DTYPES),
        help="precision blocks and models are timed in, the one the child is served in "
        "(default: bfloat16 on CUDA, float32 on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="per-layer architecture and costs of a checkpoint or config.json")
    p.add_argument("--model", required=True, help="checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="also each rank's weights and KV bytes/token when sharded over N ranks (Megatron-style, as vLLM)",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, action="append", type=utf8_text, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=_sampling("max_new_tokens", int), default=64)
    p.add_argument("--temperature", type=_sampling("temperature", float), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_sampling("top_k", int), default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=_sampling("top_p", float), default=1.0, help="in (0, 1]; 1 = no nucleus cut")
    p.add_argument("--seed", type=_sampling("seed", int), default=None)
    p.add_argument("--stop", action="append", type=utf8_text, help="stop string; repeatable")
    p.add_argument(
        "--logprobs",
        type=_sampling("logprobs", int),
        default=None,
        metavar="K",
        help="print each token's log-probability under the model, and the K likeliest tokens' (0-20)",
    )
    for name, default, what in (
        ("presence", 0.0, "subtracted once from the logit of each token generated so far, in [-2, 2]"),
        ("frequency", 0.0, "times each generated token's count, subtracted from its logit, in [-2, 2]"),
        ("repetition", 1.0, "divides a seen token's positive logit (prompt or generated), multiplies a negative one"),
    ):
        p.add_argument(f"--{name}-penalty", type=_sampling(f"{name}_penalty", float), default=default, help=what)
    _add_device(p, dtype=True)
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="shard the model over N processes on this machine (gloo on CPU, NCCL on N GPUs)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "quantize",
        help="write an FP8 copy of a checkpoint (E4M3 weights with per-channel scales, the layout vLLM reads)",
    )
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="folder for the FP8 checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds something else")
    p.add_argument(
        "--kv-cache-scales",
        action="store_true",
        help="also calibrate per-layer FP8 KV-cache scales on the corpus's train split (for --kv-cache-dtype fp8)",
    )
    p.add_argument("--corpus", default=None, help="with --kv-cache-scales: train.txt.xz's folder (default: demo)")
    _add_device(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("demo", help="show the bundled demo parent and generate from it")
    p.add_argument("--model", default=None, help="checkpoint directory (default: demo/parent)")
    p.add_argument("--max-new-tokens", type=_sampling("max_new_tokens", int), default=48)
    _add_device(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="kernels vs torch, model decode, fused vs unfused FFNs, serving under load, tensor-parallel "
        "all-reduce cost, how the search scales, how well the cost model predicts, or what prefix caching saves; "
        "JSON + Markdown",
    )
    p.add_argument(
        "what", choices=["kernels", "model", "fusion", "serving", "parallel", "search-scale", "cost-model", "prefix"]
    )
    p.add_argument(
        "--depths",
        type=positive_ints,
        default=(4, 8, 16),
        help="search-scale: parent depths, e.g. 4,8,16 (layers of the --shape)",
    )
    p.add_argument(
        "--shape",
        default="llama-3.2-1b",
        choices=["llama-3.2-1b", "llama-3.1-8b"],
        help="search-scale: the parent's block (hidden size, heads, FFN width) (default: llama-3.2-1b)",
    )
    p.add_argument(
        "--scoring",
        default="exact",
        choices=["exact", "fisher"],
        help="search-scale: how blocks are scored (tessera optimize --scoring)",
    )
    p.add_argument(
        "--suite", action="append", choices=["norm", "ffn", "attention", "ffn_served"], help="kernels: repeatable"
    )
    p.add_argument(
        "--pdl",
        action="store_true",
        help="model: the decode step with and without programmatic dependent launch (Hopper GPUs), alternating",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="model: where the decode step's time goes (its kernels by kind, the idle time between them)",
    )
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--results",
        default=None,
        help="folder for the JSON and Markdown results (default: $TESSERA_BENCH_RESULTS, else runs/bench/ in the "
        "checkout, which git ignores; benchmarks/results/ holds the committed ones)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo parent)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together")
    p.add_argument(
        "--max-model-len", type=positive_int, default=None, help="prompt + output tokens (default: the model's)"
    )
    p.add_argument(
        "--kv-cache-gib",
        type=positive_float,
        default=None,
        help="KV pool size (default: room for --max-batch requests of --max-model-len)",
    )
    p.add_argument(
        "--page-size",
        type=positive_int,
        default=None,
        help="tokens per KV page (default: 16; prefix caching shares whole pages)",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt in full, never from the K/V of an earlier one's same first tokens",
    )
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="on CUDA, plan each decode step after the last one's tokens are on the host, not while the GPU runs it",
    )
    p.add_argument(
        "--served-model-name", type=utf8_text, default=None, help="the `model` clients name (default: the folder name)"
    )
    p.add_argument(
        "--max-request-mib",
        type=positive_float,
        default=None,
        help="largest request body, larger ones get 413 (default: 32 bytes a context token, at least 1 MiB)",
    )
    p.add_argument(
        "--graceful-timeout", type=nonnegative_float, default=10.0, help="seconds in-flight requests get at shutdown"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU: torch threads per engine (default: cores / data-parallel size, at least 1)",
    )
    p.add_argument(
        "--data-parallel-size",
        type=positive_int,
        default=1,
        help="CPU: engine processes, each serving its share of the requests (default 1)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="one engine sharded over N processes on this machine (gloo on CPU, NCCL on N GPUs)",
    )
    _add_device(p, dtype=True)
    p.set_defaults(func=cmd_serve)

    search = sub.add_parser("search", help="Puzzle search steps").add_subparsers(dest="step", required=True)
    p = search.add_parser("solve", help="choose one variant per layer from a block library (MIP, scipy HiGHS)")
    p.add_argument("--library", required=True, help="block library JSON: {layer: {variant: {stats, metrics}}}")
    p.add_argument("--objective", default="metrics.kl_div", help="key summed over layers (default metrics.kl_div)")
    p.add_argument("--maximize", action="store_true", help="maximise the objective (default: minimise)")
    p.add_argument("--max", action="append", metavar="KEY=V", help="upper bound on a layer sum; repeatable")
    p.add_argument("--min", action="append", metavar="KEY=V", help="lower bound on a layer sum; repeatable")
    p.add_argument("--solutions", type=positive_int, default=1, help="how many diverse solutions")
    p.add_argument(
        "--min-diversity", type=nonnegative_int, default=1, help="layers each solution must change vs earlier ones"
    )
    p.add_argument("--json", action="store_true", help="a JSON list of {objective, choices, totals}")
    p.set_defaults(func=cmd_search_solve)

    p = sub.add_parser("calibrate", help="time every block variant of a model on this device; write the cost table")
    p.add_argument("--model", required=True, help="checkpoint directory or config.json (weights are not needed)")
    p.add_argument("--out", default="cost.json", help="the cost table (JSON); its folder must exist")
    p.add_argument("--overwrite", action="store_true", help="replace an --out file that is not a cost table")
    _add_windows(p)
    p.add_argument(
        "--validate",
        type=nonnegative_int,
        default=10,
        help="random architectures to check predictions against, besides the model itself (0: none)",
    )
    _add_scenario(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("optimize", help="Puzzle end to end: a faster child of a parent under a budget")
    p.add_argument("--model", default=None, help="parent checkpoint (default: the bundled demo parent)")
    p.add_argument("--corpus", default=None, help="directory with train.txt.xz and validation.txt.xz (default: demo)")
    p.add_argument(
        "--out",
        default="runs/optimize",
        help="output folder; a previous run's folder resumes it (its distilled blocks are reused)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="use an --out folder that holds something else (what it held goes when the run ends)",
    )
    p.add_argument(
        "--target-speedup",
        type=_budget("target_speedup"),
        default=None,
        help="× the parent's speed, >= 1 (default 1.5); measured against the parent, the loop aiming within 2 %%",
    )
    p.add_argument(
        "--max-latency-ms",
        type=_budget("max_latency_ms"),
        default=None,
        help="generation latency (ms) of the scenario here; measured, the child aimed into the 4 %% below it",
    )
    p.add_argument(
        "--max-memory-mib", type=_budget("max_memory_mib"), default=None, help="weights + KV cache of the scenario"
    )
    p.add_argument(
        "--min-throughput",
        type=_budget("min_throughput"),
        default=None,
        help="generated tokens/s in the scenario, aimed at as the latency it allows",
    )
    p.add_argument(
        "--also-scenario",
        type=scenario_spec,
        action="append",
        default=[],
        help="a further throughput scenario BATCHxPROMPTxGEN (e.g. 1x128x64; repeatable): timed, priced in the "
        "library, and the target speedup must hold in it too",
    )
    p.add_argument("--bld-steps", type=positive_int, default=150, help="training steps per BLD variant")
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=256,
        help="tokens per window of text for BLD, scoring, GKD and evaluation (at least twice any --windows)",
    )
    p.add_argument("--gkd-steps", type=nonnegative_int, default=100, help="GKD steps per child (0: none)")
    p.add_argument(
        "--scoring",
        choices=["exact", "fisher"],
        default="exact",
        help="block scores: the exact replace-1-block KL (V·L(L+1)/2 block forwards), or its second-order Fisher "
        "estimate (V·L block forwards and --fisher-samples backward passes of the parent: for deep parents)",
    )
    p.add_argument(
        "--fisher-samples", type=positive_int, default=16, help="--scoring fisher: draws of the target tokens"
    )
    p.add_argument(
        "--gkd-batch-size",
        type=positive_int,
        default=4,
        help="GKD windows per step (under torchrun, a multiple of the ranks: each takes an equal share)",
    )
    p.add_argument(
        "--pareto",
        type=speedup_list,
        default="1.25,2.0",
        help="extra target speedups solved for the curve ('' for none)",
    )
    p.add_argument(
        "--max-kv-heads",
        type=_budget("max_kv_heads", int),
        default=None,
        help="KV heads summed over all layers (KV-cache budget)",
    )
    p.add_argument(
        "--no-linear-attention",
        action="store_true",
        help="no linear attention replacing a GQA layer (a parent's own linear layers stay choices)",
    )
    p.add_argument(
        "--ffn-multiple",
        type=positive_int,
        default=256,
        help="pruned FFN widths are multiples of N (256: what other runtimes load; another N: tessera-only children)",
    )
    _add_windows(p)
    p.add_argument("--fuse", action="store_true", help="FFN Fusion of the chosen child afterwards (into OUT/fused)")
    p.add_argument(
        "--fresh", action="store_true", help="delete the distilled blocks of an earlier run in --out and train again"
    )
    _add_scenario(p)
    p.set_defaults(
        func=cmd_optimize,
        on_interrupt=_optimize_resume_hint,
    )

    p = sub.add_parser("fuse", help="FFN Fusion: fuse runs of attention-free FFN layers into wide parallel FFNs")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument(
        "--out", required=True, help="folder for the fused checkpoint, fusion.json/.md and heat-maps, replaced whole"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --out folder that is not a previous fuse output"
    )
    p.add_argument("--groups", default=None, help="explicit inclusive layer spans, e.g. 42-50,53-69")
    p.add_argument(
        "--threshold",
        type=cosine_distance,
        default=None,
        help="grow groups while the dependency (cosine distance, 0 to 2) stays <= X",
    )
    p.add_argument(
        "--heal-steps", type=nonnegative_int, default=100, help="GKD steps against the unfused model (0: none)"
    )
    p.add_argument("--block-threshold", type=cosine_distance, default=0.05, help="block pairs qualify at <= X")
    p.add_argument("--corpus", default=None, help="directory with train.txt.xz and validation.txt.xz (default: demo)")
    p.add_argument(
        "--eval-windows", type=positive_int, default=32, help="held-out windows of 256 tokens for KL/perplexity"
    )
    _add_scenario(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("demo-parent", help="rebuild the demo corpus snapshot or retrain the demo parent")
    p.add_argument("step", choices=["corpus", "train"])
    p.add_argument("--steps", type=positive_int, default=1200)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.set_defaults(func=cmd_demo_parent)
    return parser


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[threading.Event]:
    """An event set when Ctrl-C arrives (SIGINT still raises KeyboardInterrupt): a KeyboardInterrupt raised inside
    native code can come out as another exception (safetensors reading a tensor: "ValueError: could not determine
    the shape of object type 'torch.storage.UntypedStorage'"), which is then an interrupt all the same. Only in
    the main thread, and only over Python's own handler."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield seen
        return

    def note(signum, frame):
        seen.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# OSErrors that are the machine's state, not a bug: said in one line (the error names its file where it has one).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE}


def _environment_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def interrupted() -> None:  # Ctrl-C: the user knows; a traceback would only bury the one useful line
        hint = getattr(args, "on_interrupt", None)  # a command's advice, from its arguments
        parser.exit(130, f"tessera: interrupted{'; ' + hint(args) if hint else ''}\n")

    with _noting_interrupts() as ctrl_c:
        try:
            args.func(args)
        except KeyboardInterrupt:
            interrupted()
        except BrokenPipeError:  # `tessera info ... | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except Exception as e:
            if ctrl_c.is_set():
                interrupted()
            if isinstance(e, (UserError, EngineProcessError)) or _environment_error(e):
                parser.exit(2, f"tessera: error: {e}\n")
            raise  # anything else is a bug: its traceback is what to see
    return 0


if __name__ == "__main__":
    sys.exit(main())
