"""The `tessera` command line: info, generate, serve, demo, demo-parent, bench, search, calibrate, optimize, fuse.

User mistakes (a malformed config.json, a missing tensor, a prompt longer than the context, a CUDA request
on a machine without one) end in one line `tessera: error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from tessera.config import ArchConfig, ConfigError
from tessera.runtime.async_engine import EngineProcessError

DEMO_PROMPTS = ("def fibonacci(n):\n", 'class Stack:\n    """', "import os\nimport sys\n\n\ndef main(")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu or cuda")
    return torch.device(name)


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _format_info(arch: ArchConfig, source: str) -> str:
    s = arch.summary()
    lines = [
        f"{source}",
        f"  layers {s['num_layers']}, hidden {s['hidden_size']}, heads {s['num_heads']} x {s['head_dim']}, "
        f"vocab {s['vocab_size']}, tied embeddings {arch.tie_embeddings}",
        f"  parameters      {s['num_params']:,} ({_short(s['num_params'])})",
        f"  weight bytes    {s['weight_bytes']:,} ({arch.dtype})",
        f"  KV bytes/token  {s['kv_bytes_per_token']:,} ({arch.dtype})",
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
        f"  {'layer':>5}  {'attention':<12} {'ffn':<20} {'params':>16} {'KV B/token':>10}",
    ]
    fused = {f["layer"] for f in s["fused_ffns"]}
    for layer in s["layers"]:
        att = f"gqa kv={layer['n_kv_heads']}" if layer["attention"] == "gqa" else layer["attention"]
        ffn = f"swiglu {layer['intermediate_size']}" if layer["ffn"] == "swiglu" else layer["ffn"]
        ffn += " fused" if layer["layer"] in fused else ""
        lines.append(
            f"  {layer['layer']:>5}  {att:<12} {ffn:<20} {layer['num_params']:>16,} {layer['kv_bytes_per_token']:>10,}"
        )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    arch = ArchConfig.from_json(args.model)
    if args.json:
        print(json.dumps(arch.summary(), indent=2))
    else:
        print(_format_info(arch, str(args.model)))


def _generator(model_path: str, device: str, dtype: str):
    from tessera.runtime.generate import Generator
    from tessera.runtime.loader import load_model, parse_dtype
    from tessera.runtime.sampling import load_tokenizer

    model = load_model(model_path, device=resolve_device(device), dtype=parse_dtype(dtype))
    return Generator(model, load_tokenizer(model_path))


def cmd_generate(args: argparse.Namespace) -> None:
    from tessera.runtime.sampling import SamplingParams

    gen = _generator(args.model, args.device, args.dtype)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    start = time.perf_counter()
    completions = gen.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    if args.json:
        out = [
            {"prompt": p, "text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}
            for p, c in zip(args.prompt, completions)
        ]
        print(json.dumps(out, indent=2))
        return
    for prompt, c in zip(args.prompt, completions):
        print(f"{prompt}{c.text}")
        print(f"--- [{len(c.tokens)} tokens, finish: {c.finish_reason}]")
    n = sum(len(c.tokens) for c in completions)
    print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s, batch {len(completions)})", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    from tessera.demo_parent import PARENT_DIR
    from tessera.runtime.sampling import SamplingParams

    model_dir = Path(args.model or PARENT_DIR)
    print(_format_info(ArchConfig.from_json(model_dir), f"model: {model_dir}"))
    report = model_dir / "training.json"
    if report.is_file():
        r = json.loads(report.read_text())
        print(f"  trained: validation loss {r['val_loss']:.3f} (perplexity {r['val_perplexity']:.1f})\n")
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
    from tessera import demo_parent

    if args.step == "corpus":
        print(json.dumps(demo_parent.snapshot_corpus(), indent=2))
    else:
        report = demo_parent.train_parent(steps=args.steps, seed=args.seed)
        print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


def _benchmarks():
    """The checkout's benchmarks/ as a package. Loaded by path under its own name: putting the repository
    root on sys.path would also make kernels/ importable as a top-level `kernels`, which transformers probes."""
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (root / "run.py").is_file():
        raise FileNotFoundError(f"tessera bench runs the suites of a source checkout; {root} has none")
    if "tessera_benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "tessera_benchmarks", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["tessera_benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("tessera_benchmarks.run")


def cmd_bench(args: argparse.Namespace) -> None:
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _benchmarks()
    if args.what == "kernels":
        paths = run.run_kernels(device, args.suite)
    elif args.what == "serving":
        paths = [run.run_serving(device)]
    else:
        paths = [run.run_model(device) if args.what == "model" else run.run_fusion(device)]
    for path in paths:
        print(f"\n{path.with_suffix('.md').read_text()}wrote {path} and {path.with_suffix('.md').name}")


def cmd_serve(args: argparse.Namespace) -> None:
    from tessera.demo_parent import PARENT_DIR
    from tessera.runtime.server import build_server, run

    for flag in ("port", "max_batch", "data_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    threads = None
    if args.device == "cpu":
        # The cores are split between the engine processes; the HTTP side (its own process) needs little. On the
        # 2-core dev VM at 16 concurrent streams, 2 threads served 1,302 output tokens/s and 1 thread 958 (issue 6).
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.data_parallel_size)
    model = args.model or str(PARENT_DIR)
    kv_bytes = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    server = build_server(
        model, resolve_device(args.device), args.dtype, args.max_batch, args.max_model_len, kv_bytes,
        args.served_model_name, args.data_parallel_size, threads,
    )  # fmt: skip
    info, dp = server.engine.info, args.data_parallel_size
    threads = info["threads"]
    engines = f"{dp} engine process{'es' if dp > 1 else ''} of {threads} thread{'s' if threads > 1 else ''}"
    print(
        f"tessera serve: {server.model_name} on {info['device']} ({info['dtype']}, {engines}); "
        f"max batch {args.max_batch} "
        f"per engine, context {info['max_model_len']}, KV pool {info['pages']} pages of {info['page_size']} tokens "
        f"({info['kv_mib']:.1f} MiB) per engine{', CUDA graphs' if info['cuda_graphs'] else ''}",
        file=sys.stderr,
    )
    run(server, args.host, args.port, args.graceful_timeout)


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


def _scenario(args: argparse.Namespace):
    from tessera.search.cost import Scenario

    return Scenario(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from tessera.search.cost import calibrate, random_architectures, validate
    from tessera.search.library import SearchSpace

    device = resolve_device(args.device)
    arch = ArchConfig.from_json(args.model)
    space = SearchSpace()
    variants = [space.block_variants(arch, i) for i in range(arch.n_layers)]
    table = calibrate(arch, [b for v in variants for b in v], _scenario(args), device, torch.float32)
    if args.validate:
        validate(table, arch, random_architectures(variants, args.validate), device, torch.float32)
    Path(args.out).write_text(json.dumps(table.to_json(), indent=1) + "\n")
    print(f"{table.device}: non-block {table.non_block_ms:.2f} ms")
    for name, t in table.blocks.items():
        times = f"prefill {t['prefill_ms']:8.3f} ms  decode {t['decode_ms']:7.3f} ms  total {t['runtime_ms']:9.2f} ms"
        print(f"  {name:<26} {times}")
    if table.validation:
        v = table.validation
        print(
            f"predicted vs measured on {len(v['architectures'])} random architectures: "
            f"mean abs error {100 * v['mean_abs_error']:.1f} %, max {100 * v['max_abs_error']:.1f} %"
        )
    print(f"wrote {args.out}")


def cmd_optimize(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from tessera.demo_parent import CORPUS_DIR, PARENT_DIR
    from tessera.search.bld import BLDConfig
    from tessera.search.fusion import FusionConfig
    from tessera.search.gkd import GKDConfig
    from tessera.search.library import SearchSpace
    from tessera.search.pipeline import Budget, OptimizeConfig, optimize

    budget = Budget(
        args.target_speedup, args.max_latency_ms, args.max_memory_mib, args.min_throughput, args.max_kv_heads
    )
    if budget == Budget():
        budget = Budget(target_speedup=1.5)
    cfg = OptimizeConfig(
        space=SearchSpace(linear_attention=not args.no_linear_attention),
        scenario=_scenario(args),
        bld=replace(BLDConfig(), steps=args.bld_steps),
        gkd=replace(GKDConfig(), steps=args.gkd_steps),
        pareto_speedups=tuple(float(x) for x in args.pareto.split(",") if x) if args.pareto else (),
        fusion=FusionConfig(heal_steps=args.gkd_steps) if args.fuse else None,
        device=str(resolve_device(args.device)),
    )
    results = optimize(args.model or PARENT_DIR, args.out, budget, cfg, args.corpus or CORPUS_DIR)
    print((Path(args.out) / "report.md").read_text())
    print(f"child checkpoint: {results['child_dir']}")
    if results.get("fusion", {}).get("groups"):
        print(f"fused child checkpoint: {Path(args.out) / 'fused'}")


def cmd_fuse(args: argparse.Namespace) -> None:
    from tessera.demo_parent import CORPUS_DIR, encode_split
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import load_tokenizer
    from tessera.search.fusion import FusionConfig, FusionError, parse_groups, run_fusion
    from tessera.search.train import fixed_windows

    cfg = FusionConfig(
        spans=tuple(parse_groups(args.groups)) if args.groups else None,
        threshold=args.threshold,
        heal_steps=args.heal_steps,
        block_threshold=args.block_threshold,
    )
    if cfg.spans is not None and cfg.threshold is not None:
        raise FusionError("give --groups or --threshold, not both")
    model = load_model(args.model, resolve_device(args.device), torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    corpus = Path(args.corpus) if args.corpus else CORPUS_DIR
    tok = load_tokenizer(args.model)
    train_ids, val_ids = encode_split(tok, "train", corpus), encode_split(tok, "validation", corpus)
    info = run_fusion(
        model, train_ids, fixed_windows(val_ids, cfg.seq_len, args.eval_windows), Path(args.out), cfg,
        _scenario(args), tokenizer_from=Path(args.model),
    )  # fmt: skip
    print((Path(args.out) / "fusion.md").read_text())
    if not info["groups"]:
        raise FusionError(f"{args.model}: nothing to fuse ({info['reason']}); the analysis is in {args.out}")
    print(f"fused checkpoint: {args.out}")


def _add_scenario(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8, help="scenario: sequences generated together")
    p.add_argument("--prompt-len", type=int, default=128, help="scenario: prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=64, help="scenario: generated tokens per sequence")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="per-layer architecture and costs of a checkpoint or config.json")
    p.add_argument("--model", required=True, help="checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string; repeatable")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="show the bundled demo parent and generate from it")
    p.add_argument("--model", default=None, help="checkpoint directory (default: demo/parent)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="kernels vs torch, model decode, fused vs unfused FFNs, or serving under load; JSON + Markdown"
    )
    p.add_argument("what", choices=["kernels", "model", "fusion", "serving"])
    p.add_argument("--suite", action="append", choices=["norm", "ffn", "attention"], help="kernels: repeatable")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo parent)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool size (default: room for --max-batch requests of --max-model-len)")  # fmt: skip
    p.add_argument("--served-model-name", default=None, help="the `model` clients name (default: the folder name)")
    p.add_argument("--graceful-timeout", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads per engine (default: cores / data-parallel size, at least 1)",
    )
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="CPU: engine processes, each serving its share of the requests (default 1)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_serve)

    search = sub.add_parser("search", help="Puzzle search steps").add_subparsers(dest="step", required=True)
    p = search.add_parser("solve", help="choose one variant per layer from a block library (MIP, scipy HiGHS)")
    p.add_argument("--library", required=True, help="block library JSON: {layer: {variant: {stats, metrics}}}")
    p.add_argument("--objective", default="metrics.kl_div", help="key summed over layers (default metrics.kl_div)")
    p.add_argument("--maximize", action="store_true", help="maximise the objective (default: minimise)")
    p.add_argument("--max", action="append", metavar="KEY=V", help="upper bound on a layer sum; repeatable")
    p.add_argument("--min", action="append", metavar="KEY=V", help="lower bound on a layer sum; repeatable")
    p.add_argument("--solutions", type=int, default=1, help="how many diverse solutions")
    p.add_argument("--min-diversity", type=int, default=1, help="layers each solution must change vs earlier ones")
    p.add_argument("--json", action="store_true", help="a JSON list of {objective, choices, totals}")
    p.set_defaults(func=cmd_search_solve)

    p = sub.add_parser("calibrate", help="time every block variant of a model on this device; write the cost table")
    p.add_argument("--model", required=True, help="checkpoint directory or config.json (weights are not needed)")
    p.add_argument("--out", default="cost.json")
    p.add_argument("--validate", type=int, default=5, help="random architectures to check predictions against")
    _add_scenario(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("optimize", help="Puzzle end to end: a faster child of a parent under a budget")
    p.add_argument("--model", default=None, help="parent checkpoint (default: the bundled demo parent)")
    p.add_argument("--corpus", default=None, help="directory with train.txt.xz and validation.txt.xz (default: demo)")
    p.add_argument("--out", default="runs/optimize", help="output directory")
    p.add_argument("--target-speedup", type=float, default=None, help="× the parent's speed (default 1.5)")
    p.add_argument("--max-latency-ms", type=float, default=None, help="generation latency of the scenario")
    p.add_argument("--max-memory-mib", type=float, default=None, help="weights + KV cache of the scenario")
    p.add_argument("--min-throughput", type=float, default=None, help="generated tokens/s in the scenario")
    p.add_argument("--bld-steps", type=int, default=150, help="training steps per BLD variant")
    p.add_argument("--gkd-steps", type=int, default=100, help="GKD steps per child")
    p.add_argument("--pareto", default="1.25,2.0", help="extra target speedups solved for the curve ('' for none)")
    p.add_argument("--max-kv-heads", type=int, default=None, help="KV heads summed over all layers (KV-cache budget)")
    p.add_argument("--no-linear-attention", action="store_true", help="search space without linear attention")
    p.add_argument("--fuse", action="store_true", help="FFN Fusion of the chosen child afterwards (into OUT/fused)")
    _add_scenario(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("fuse", help="FFN Fusion: fuse runs of attention-free FFN layers into wide parallel FFNs")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--out", required=True, help="directory for the fused checkpoint, fusion.json/.md and heat-maps")
    p.add_argument("--groups", default=None, help="explicit inclusive layer spans, e.g. 42-50,53-69")
    p.add_argument("--threshold", type=float, default=None, help="grow groups while the dependency stays <= X")
    p.add_argument("--heal-steps", type=int, default=100, help="GKD steps against the unfused model (0: none)")
    p.add_argument("--block-threshold", type=float, default=0.05, help="block pairs qualify at <= X")
    p.add_argument("--corpus", default=None, help="directory with train.txt.xz and validation.txt.xz (default: demo)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of 256 tokens for KL/perplexity")
    _add_scenario(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("demo-parent", help="rebuild the demo corpus snapshot or retrain the demo parent")
    p.add_argument("step", choices=["corpus", "train"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, EngineProcessError) as e:
        parser.exit(2, f"tessera: error: {e}\n")
    except BrokenPipeError:  # `tessera info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
