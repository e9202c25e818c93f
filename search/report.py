"""The human side of an optimize run: report.md, pareto.png (quality vs measured speed), layers.png (choices);
and of a fusion run: its Markdown section and the dependency heat-maps. Every file is written atomically
(`atomic_path`): a report or plot is the old one or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

from tessera.files import atomic_path, atomic_write_text
from tessera.search.cost import Scenario
from tessera.search.library import Library, block_from_name


def _quality(q: dict, key: str) -> str:
    return f"{q[key]:.3f}" if key in q else "–"


def _scoring(config: dict) -> str:
    if config.get("scoring") == "fisher":
        return (
            f"Fisher estimates of their replace-1-block KL ({config['fisher_samples']} draws of the targets; "
            "`--scoring fisher`)."
        )
    return "replace-1-block KL."


def budget_misses(results: dict) -> list[str]:
    """What the saved child, as measured, misses of the absolute budget terms (latency, throughput). The landing loop
    measures its children against them, but may end (TARGET_CHECKS children measured, or none within the space) on a
    child over the limit, and the saved child's final measurement is a fresh one."""
    budget, child, s = results["budget"], results["children"][1], results["scenario"]
    measured, predicted = child["measured_ms"], child["predicted_ms"]
    misses = []
    if (limit := budget.get("max_latency_ms")) and measured > limit:
        misses.append(f"max latency {limit:g} ms: measured {measured:.1f} ms (predicted {predicted:.1f} ms)")
    if need := budget.get("min_throughput"):
        tokens = s["batch"] * s["gen_len"]
        if (got := tokens / (measured / 1e3)) < need:
            expected = tokens / (predicted / 1e3)
            misses.append(f"min throughput {need:g} tokens/s: measured {got:.1f} (predicted {expected:.1f})")
    if not misses:
        return []
    return [
        f"**The saved child misses the budget as measured**: {'; '.join(misses)}. The landing loop's checks above "
        "say how near it came; a budget with a margin lands inside it."
    ]


def _landing(results: dict) -> list[str]:
    """The landing loop's checks (search/pipeline.land_on_budget): what was asked of the cost model, predicted and
    measured, per child measured."""
    checks, budget, scenario = results["landing_checks"], results["budget"], Scenario(**results["scenario"])
    if not checks:
        return []
    tolerance = 100 * results["target_tolerance"]
    marks = []
    if (target := budget.get("target_speedup")) is not None:
        marks.append(f"the target speedup {target:g} within {tolerance:g} %")
    if (limit := checks[0].get("asked_latency_ms")) is not None:
        source = (
            ""
            if limit == budget.get("max_latency_ms")
            else f", the min throughput {budget['min_throughput']:g} tokens/s"
        )
        marks.append(f"the latency limit {limit:.4g} ms{source} (at most it, within {2 * tolerance:g} % under it)")
    lines = [
        "",
        f"Landing on {' and '.join(marks)}: the MIP's child was timed against the parent in lockstep and what was "
        "asked of the cost model corrected by the miss. The child nearest the mark is kept (for a latency limit, "
        "of those that meet it, if any does).",
    ]
    if target is not None:
        lines += [
            "",
            "| solve | scenario | speedup asked of the cost model | predicted | measured |",
            "|---:|---|---:|---:|---:|",
        ]
        for k, r in enumerate(checks):
            for x in [{**r, "scenario": scenario.key}, *r["also"]]:
                lines.append(
                    f"| {k + 1} | {x['scenario']} | {x['asked_speedup']:.3f}x | {x['predicted_speedup']:.3f}x "
                    f"| {x['measured_speedup']:.3f}x |"
                )
    if limit is not None:
        lines += [
            "",
            f"| solve | latency ({scenario.key}) asked of the cost model, ms | predicted ms | measured ms |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k + 1} | {r['asked_latency_ms']:.4g} | {r['predicted_ms']:.4g} | {r['measured_ms']:.4g} |"
            for k, r in enumerate(checks)
        ]
    return lines


def write_report(results: dict, library: Library, out: Path) -> Path:
    parent = results["children"][0]
    children = results["children"][1:]
    s, cm = results["scenario"], results["cost_model"]
    also = [a["key"] for a in results["also_scenarios"]]
    lines = [
        "# tessera optimize",
        "",
        f"Parent `{results['parent']}` on {results['device']}, timed in {results.get('timing_dtype', 'float32')}; "
        f"scenario batch {s['batch']}, prompt {s['prompt_len']},"
        f" generate {s['gen_len']} tokens. Budget: {', '.join(f'{k} {v}' for k, v in results['budget'].items() if v)}.",
        "",
        "## Children (measured on this device; quality on held-out text)",
        "",
        "Speedup = the parent's measured generation latency / the child's, the two timed together in one lockstep "
        f"(their engines taking steps in turn, {results['measure_rounds']} rounds; the speedup is from each step's "
        "median over the rounds, which drops a step another process interrupted, the range from whole single "
        "rounds, so the speedup may lie outside it; the parent's ms is its median over the pairs). "
        "KL = mean per-token KL(parent ‖ child). Σ block KL = the MIP's objective, the sum of the blocks' "
        + _scoring(results.get("config", {})),
        "",
        "| child | measured ms | speedup (range) | "
        + "".join(f"speedup at {k} | " for k in also)
        + "predicted ms | Σ block KL | ppl (BLD) | KL (BLD) | ppl (GKD) | KL (GKD) |",
        "|---|---:|---:|" + "---:|" * len(also) + "---:|---:|---:|---:|---:|---:|",
    ]
    for c in [parent, *children]:
        bld, gkd = c["quality_bld"], c["quality_gkd"]
        spread = c["speedup_rounds"]
        lines.append(
            f"| {c['label']} | {c['measured_ms']:.1f} | {c['measured_speedup']:.3f}x ({min(spread):.3f}–"
            f"{max(spread):.3f}) | "
            + "".join(f"{c['also_speedups'][k]:.3f}x | " for k in also)
            + f"{c['predicted_ms']:.1f} | {c['kl_sum']:.3f} | {_quality(bld, 'perplexity')} "
            f"| {_quality(bld, 'kl_div')} | {_quality(gkd, 'perplexity')} | {_quality(gkd, 'kl_div')} |"
        )
    lines += _landing(results)
    main = children[0]
    lines += [f"\n{miss}" for miss in budget_misses(results)]
    lines += [
        "",
        f"The child saved in `child/` is **{main['label']}**; its layers:",
        "",
        "| layer | block | runtime ms | "
        + ("KL (Fisher estimate)" if results.get("config", {}).get("scoring") == "fisher" else "KL (replace-1-block)")
        + " |",
        "|---:|---|---:|---:|",
    ]
    for i, name in enumerate(main["blocks"]):
        entry = library[f"layer_{i}"][name]
        lines.append(f"| {i} | {name} | {entry['stats']['runtime_ms']:.2f} | {entry['metrics']['kl_div']:.4f} |")
    lines += [
        "",
        "## Cost model",
        "",
        f"Non-block part {results['non_block_ms']:.1f} ms. Predicted vs measured generation latency of the parent "
        f"and {len(cm['architectures']) - 1} random architectures from the library, measured in the lockstep that "
        f"timed the blocks ({cm['rounds']} rounds): mean absolute error {100 * cm['mean_abs_error']:.1f} %, max "
        f"{100 * cm['max_abs_error']:.1f} %, mean signed {100 * cm['mean_signed_error']:+.1f} %. The round spread is "
        "(slowest − fastest round) / median: how much the machine's speed moved while it was measured.",
        "",
        "| architecture | predicted ms | measured ms | error | round spread |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {'parent' if k == 0 else f'random {k}'} | {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} "
        f"| {100 * r['error']:+.1f} % | {100 * r['round_spread']:.0f} % |"
        for k, r in enumerate(cm["architectures"])
    ]
    for key, other in zip(also, results["also_cost_models"]):
        lines += [
            "",
            f"Scenario {key}, the same check: mean absolute error {100 * other['mean_abs_error']:.1f} %, max "
            f"{100 * other['max_abs_error']:.1f} %, mean signed {100 * other['mean_signed_error']:+.1f} %.",
        ]
    if "fusion" in results:
        lines += ["", *fusion_section(results["fusion"], level="##")]
    peaks = results["stage_peak_mib"]  # every stage but the total
    lines += ["", "## Stages", "", "| stage | seconds | peak memory MiB |", "|---|---:|---:|"]
    lines += [
        f"| {k} | {v:.1f} | {peaks[k]:.0f} |" if k in peaks else f"| {k} | {v:.1f} | |"
        for k, v in results["stage_seconds"].items()
    ]
    if left_out := results.get("pareto_left_out"):
        speedups = ", ".join(f"{x:g}" for x in left_out)
        lines += ["", f"Left out of the Pareto front: speedup {speedups} (no architecture in the space is that fast)."]
    lines += ["", "![quality vs speed](pareto.png)", "", "![per-layer choices](layers.png)", ""]
    path = atomic_write_text(out / "report.md", "\n".join(lines))
    plot_pareto(results, out / "pareto.png")
    plot_layers(results, library, out / "layers.png")
    return path


def _save(plt, fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(results: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    parent = results["children"][0]
    ax.axhline(parent["quality_bld"]["perplexity"], color="gray", ls=":", label="parent")
    style = {"mip": ("o", "C0"), "uniform": ("s", "C1"), "greedy": ("^", "C2")}
    for method, (marker, color) in style.items():
        group = sorted((c for c in results["children"] if c["method"] == method), key=lambda c: c["measured_speedup"])
        if not group:
            continue
        x = [c["measured_speedup"] for c in group]
        ax.plot(
            x,
            [c["quality_bld"]["perplexity"] for c in group],
            marker,
            color=color,
            mfc="none",
            ls="--" if method == "mip" else "",
            label=f"{method}, BLD only",
        )
        if all(c["quality_gkd"] for c in group):
            ax.plot(
                x,
                [c["quality_gkd"]["perplexity"] for c in group],
                marker,
                color=color,
                ls="-" if method == "mip" else "",
                label=f"{method}, after GKD",
            )
    ax.set_xlabel("measured speedup over the parent (this device)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("quality vs measured speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def plot_layers(results: dict, library: Library, path: Path) -> Path:
    """Per layer of each MIP child (and the parent): its block's runtime as a bar, labelled with its attention (KV
    heads, or linear/none) and FFN width."""
    plt = _pyplot()
    mips = [c for c in results["children"] if c["method"] in ("parent", "mip")]
    fig, axes = plt.subplots(1, len(mips), figsize=(3 * len(mips), 3.4), dpi=100, sharey=True)
    for ax, child in zip(axes if len(mips) > 1 else [axes], mips):
        runtimes = [library[f"layer_{i}"][n]["stats"]["runtime_ms"] for i, n in enumerate(child["blocks"])]
        ax.barh(range(len(runtimes)), runtimes, color="C0")
        for i, name in enumerate(child["blocks"]):
            b = block_from_name(name)
            att = f"kv{b.attention.n_kv_heads}" if b.attention.kind == "gqa" else b.attention.kind
            ffn = str(b.ffn.intermediate_size) if b.ffn.kind == "swiglu" else b.ffn.kind
            ax.text(0.01, i, f" {att} | {ffn}", va="center", fontsize=7, color="black")
        ax.set_title(f"{child['label']}\n{child['measured_speedup']:.2f}x measured", fontsize=8)
        ax.set_xlabel("block runtime (ms)")
        ax.invert_yaxis()
    axes_list = axes if len(mips) > 1 else [axes]
    axes_list[0].set_ylabel("layer")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def fusion_section(f: dict, level: str = "#") -> list[str]:
    """Markdown for a fusion run's JSON (`search.fusion.run_fusion`): groups, depth, quality, latency, pairs."""
    lines = [f"{level} FFN Fusion", ""]
    if f["groups"]:
        lines += ["| group (layers) | span | FFNs | score (max dependency) |", "|---|---|---:|---:|"]
        for g in f["groups"]:
            lines.append(
                f"| {', '.join(map(str, g['layers']))} | {g['span'][0]}-{g['span'][1]} | {len(g['layers'])} "
                f"| {_fmt(g['score'])} |"
            )
    else:
        lines.append(f"Nothing fused: {f.get('reason', 'no group was chosen')}.")
    d = f["sequential_depth"]
    lines += ["", f"Sequential depth (attention and FFN sublayers in a row): {d['before']} → {d['after']}.", ""]
    if f["quality"]:
        lines += ["| model | perplexity | KL from unfused |", "|---|---:|---:|"]
        for name, q in f["quality"].items():
            lines.append(f"| {name} | {q['perplexity']:.3f} | {_fmt(q.get('kl_div'), '.4f')} |")
    else:
        lines.append("Not scored: fused without text (explicit groups, no healing).")
    if f.get("latency"):
        s = f["scenario"]
        lines += [
            "",
            f"Latency on {f['device']} in {f.get('timing_dtype', 'float32')} (batch {s['batch']}, "
            f"prompt {s['prompt_len']}, {s['gen_len']} generated tokens; "
            f"both models in one lockstep of {f['latency_rounds']} rounds, each engine step's median; decode step = "
            "the mean decode-only step):",
            "",
            "| model | generation ms | prefill ms | decode step ms |",
            "|---|---:|---:|---:|",
        ]
        for name, t in f["latency"].items():
            lines.append(f"| {name} | {t['latency_ms']:.1f} | {t['prefill_ms']:.2f} | {t['decode_ms']:.3f} |")
    if f["block_pairs"]:
        lines += [
            "",
            f"Whole attention+FFN blocks, consecutive pairs (qualify at dependency ≤ {f['block_threshold']:g}; "
            "parallel KL = held-out KL from the model with the two blocks reading the same input):",
            "",
            "| blocks | dependency | parallel KL | qualifies |",
            "|---|---:|---:|---|",
        ]
        for p in f["block_pairs"]:
            lines.append(
                f"| {p['layers'][0]}, {p['layers'][1]} | {p['dependency']:.3f} | {p['parallel_kl']:.4f} "
                f"| {'yes' if p['qualifies'] else 'no'} |"
            )
    for key, title in (("ffn_dependency", "FFN dependency"), ("block_dependency", "block dependency")):
        if f.get(key) and f.get(f"{key}_png"):
            lines += ["", f"![{title}]({f[f'{key}_png']})"]
    return [*lines, ""]


def plot_dependency(dep: dict, path: Path, title: str) -> Path:
    """Heat-map of a dependency matrix's JSON: row = layer removed, column = layer measured."""
    import numpy as np

    plt = _pyplot()
    m = np.array([[np.nan if v is None else v for v in row] for row in dep["matrix"]], dtype=float)
    n = len(dep["layers"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.4 * n), dpi=100)
    im = ax.imshow(m, cmap="viridis", vmin=0)
    ax.set_xticks(range(n), dep["layers"], fontsize=7)
    ax.set_yticks(range(n), dep["layers"], fontsize=7)
    ax.set_xlabel("layer j (contribution measured)")
    ax.set_ylabel("layer i (removed upstream)")
    ax.set_title(title, fontsize=9)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, label="cosine distance")
    fig.tight_layout()
    _save(plt, fig, path)
    return path
