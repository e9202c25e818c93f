"""`tessera optimize` end to end on a tiny random parent (seconds, not the demo's minutes)."""

from __future__ import annotations

import gc
import json
import lzma
import os
import re
import sys
import weakref
from dataclasses import replace

import pytest
import torch

from tessera.cli import main
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.demo import CORPUS_DIR, PARENT_DIR
from tessera.errors import UserError
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.runtime.parallel import free_port
from tessera.search import pipeline
from tessera.search.bld import BLDConfig, StoreMismatchError
from tessera.search.cost import CostTable, Scenario
from tessera.search.data import read_corpus
from tessera.search.gkd import GKDConfig
from tessera.search.library import SearchSpace, read_library
from tessera.search.mip import InfeasibleError, solve
from tessera.search.pipeline import Budget, OptimizeConfig, block_bounds, optimize
from tessera.search.ranks import ONE, every_core

from .conftest import tolerating_teardown_aborts


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    """A 2-layer random parent with the demo tokenizer, and a small corpus cut from the demo's."""
    root = tmp_path_factory.mktemp("optimize")
    arch = ArchConfig(
        vocab_size=8192,
        hidden_size=64,
        n_heads=4,
        head_dim=16,
        blocks=(BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 128)),) * 2,
        tie_embeddings=True,
        max_position_embeddings=512,
        eos_token_ids=(0,),
        dtype="float32",
    )
    parent = save_model(Model(arch).init_weights(seed=0), root / "parent", tokenizer_from=PARENT_DIR)
    corpus = root / "corpus"
    corpus.mkdir()
    for split, chars in (("train", 60_000), ("validation", 60_000)):
        (corpus / f"{split}.txt.xz").write_bytes(lzma.compress(read_corpus(split, CORPUS_DIR)[:chars].encode()))
    return parent, corpus


def tiny_config() -> OptimizeConfig:
    return OptimizeConfig(
        space=SearchSpace(kv_heads=(2, 1), ffn_ratios=(1.0, 0.5), ffn_multiple=64, linear_ffn=False),
        scenario=Scenario(batch=2, prompt_len=16, gen_len=8),
        bld=BLDConfig(steps=3, batch_windows=2, eval_windows=2),
        gkd=GKDConfig(steps=2, batch_size=2, seq_len=32),
        calibration_windows=8,
        score_windows=2,
        eval_windows=2,
        seq_len=32,
        pareto_speedups=(1.2,),
        validate_architectures=2,
    )


def test_optimize_writes_child_library_costs_report(tiny_parent, tmp_path, capsys, monkeypatch):
    parent, corpus = tiny_parent
    out = tmp_path / "run"
    batch1 = Scenario(batch=1, prompt_len=16, gen_len=8)  # a further throughput scenario: its own costs and bound
    # A Pareto point far past the target: its child differs from the target's whatever this machine's timings (at
    # 1.2 both often came out as the same child: the space's two FFN widths give few distinct speeds).
    cfg = replace(tiny_config(), also_scenarios=(batch1,), pareto_speedups=(1.6,))
    # The children are built one at a time: when one is realised, no earlier one is still alive.
    realised: list[weakref.ref] = []
    realise = pipeline.Optimizer.realise

    def one_at_a_time(self, child, ref, gkd):
        gc.collect()
        assert not [r for r in realised if r() is not None], "an earlier child is still in memory"
        model = realise(self, child, ref, gkd)
        realised.append(weakref.ref(model))
        return model

    monkeypatch.setattr(pipeline.Optimizer, "realise", one_at_a_time)
    results = optimize(parent, out, Budget(target_speedup=1.1), cfg, corpus, progress=False)
    assert len(realised) == len({tuple(c["blocks"]) for c in results["children"][1:]}) >= 2
    for name in ("library.json", "cost.json", "cost_b1_p16_g8.json", "report.md", "results.json", "pareto.png"):
        assert (out / name).is_file(), name
    methods = [c["method"] for c in results["children"]]
    assert methods[0] == "parent" and methods.count("mip") >= 2 and "greedy" in methods
    main_child = results["children"][1]
    # The saved child is the main MIP solution, loads in the runtime, and is within the budget as predicted.
    child = load_model(out / "child")
    assert [b.name for b in child.arch.blocks] == main_child["blocks"]
    # Within the bound it was solved under: the target, or what the landing loop asked of the cost model instead.
    (check,) = [c for c in results["landing_checks"] if c["blocks"] == main_child["blocks"]][:1]
    assert main_child["predicted_ms"] <= results["children"][0]["predicted_ms"] / check["asked_speedup"] + 1e-6
    for c in results["children"]:
        assert c["measured_ms"] > 0 and c["quality_bld"]["perplexity"] > 1
    # Each baseline has the MIP's child at its own predicted runtime beside it, never of a larger Σ KL.
    by_label = {c["label"]: c for c in results["children"]}
    for c in results["children"]:
        if c["method"] in ("uniform", "greedy"):
            twin = by_label[f"MIP (= {c['method']}'s runtime)"]
            assert twin["kl_sum"] <= c["kl_sum"] + 1e-9 and twin["predicted_ms"] <= c["predicted_ms"] + 1e-6
    # The library follows the published schema and the CLI solver accepts it.
    library = read_library(out / "library.json")
    entry = library["layer_0"]["gqa_kv1+ffn_64"]
    stats = {"runtime_ms", "runtime_ms_b1_p16_g8", "memory_mib", "num_params", "num_kv_heads", "ffn_intermediate_size"}
    assert stats <= set(entry["stats"])
    also = CostTable.from_json(json.loads((out / "cost_b1_p16_g8.json").read_text()))
    assert (
        also.scenario == batch1
        and entry["stats"]["runtime_ms_b1_p16_g8"] == also.blocks["gqa_kv1+ffn_64"]["runtime_ms"]
    )
    assert {c["method"]: set(c["also_speedups"]) for c in results["children"]}["mip"] == {"b1_p16_g8"}
    assert {"kl_div", "lm_loss", "bld_nmse_attention", "bld_nmse_ffn"} <= set(entry["metrics"])
    assert main(["search", "solve", "--library", str(out / "library.json"), "--json"]) == 0
    (best,) = json.loads(capsys.readouterr().out)
    assert best["objective"] == 0.0  # unconstrained: the parent's own blocks, KL 0
    assert main(["generate", "--model", str(out / "child"), "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0
    report = (out / "report.md").read_text()
    assert "## Cost model" in report and "mean absolute error" in report and "speedup at b1_p16_g8" in report
    # A Pareto speedup past the space (1.6x: on some machines' tables) is said in the report, not on stdout (which
    # `search solve --json` above has to itself).
    assert set(results["pareto_left_out"]) <= {1.6}
    assert ("Left out of the Pareto front: speedup 1.6 " in report) == bool(results["pareto_left_out"])
    # Landing on the target: every check is reported, in both scenarios.
    assert results["landing_checks"] and results["landing_checks"][0]["also"][0]["scenario"] == "b1_p16_g8"
    # The Fisher estimate compared with this run's exact scores (benchmarks/compare_scoring.py) reads the run back.
    from tessera.benchmarks.compare_scoring import compare, table

    # At the speedups this run's cost table proved feasible, which compare reuses: the target and the Pareto point
    # where the run built its child (the demo's 2x is past what this 2-layer model reaches on some machines' tables:
    # 1.92x once on the AMD EPYC VM).
    speedups = (1.1, 1.6) if "MIP (speedup 1.6)" in by_label else (1.1,)
    compared = compare(out, [8], corpus, speedups=speedups)
    exact, fisher = compared["rows"]
    assert exact["seconds"] == results["stage_seconds"]["replace-1-block scoring"]
    assert compared["pairs"] == sum(len(v) for v in library.values()) and -1 <= fisher["spearman"] <= 1
    for row in (exact, fisher):
        assert [c["speedup"] for c in row["children"]] == list(speedups)
        assert all(c["kl_div"] >= 0 and len(c["blocks"]) == 2 for c in row["children"])
    assert "| fisher, 8 samples |" in table(compared)


def test_infeasible_budget_fails_before_training(tiny_parent, tmp_path):
    parent, corpus = tiny_parent
    out = tmp_path / "run"
    with pytest.raises(InfeasibleError, match=r"max memory 0\.3 MiB cannot be met: the smallest architecture") as e:
        optimize(parent, out, Budget(max_memory_mib=0.3), tiny_config(), corpus, progress=False)
    assert not NEGATIVE.search(str(e.value)), str(e.value)
    # Nothing written: cost files only once a budget is accepted (an earlier run's would otherwise disagree with its
    # report), no block trained.
    assert not (out / "cost.json").exists() and not (out / "bld").exists()


NEGATIVE = re.compile(r"(?<![\w.])-\d")  # a negative number anywhere in a message


def test_unreachable_speedup_names_the_fastest_in_the_space(tiny_parent, tmp_path, monkeypatch):
    """`--target-speedup 1000` once read "stats.runtime_ms ≤ -2.2 cannot be met": the budget minus the non-block
    time went negative. It must say, in the budget's own terms, what the search space can reach. Fixed costs
    (non-block 2 ms, 1 ms a block, no-ops free): real timings on a loaded 2-core machine gave a negative
    non-block part once, under which any speedup looks reachable (next test)."""

    def fixed_costs(arch, blocks, scenario, device, dtype, validate, progress):
        ms = {
            b.name: dict.fromkeys(("prefill_ms", "decode_ms", "runtime_ms"), 0.0 if b.is_empty else 1.0) for b in blocks
        }
        return CostTable("cpu", "float32", scenario, 2.0, 1.0, ms)

    monkeypatch.setattr(pipeline, "calibrate", fixed_costs)
    parent, corpus = tiny_parent
    out = tmp_path / "run"
    with pytest.raises(InfeasibleError, match=r"target speedup 1000 cannot be met: the fastest architecture") as e:
        optimize(parent, out, Budget(target_speedup=1000), tiny_config(), corpus, progress=False)
    assert not NEGATIVE.search(str(e.value)), str(e.value)
    assert "predicted at 2 ms, 2× the parent's 4 ms" in str(e.value)  # both layers no-ops; the parent 2 + 2·1
    assert not (out / "bld").exists()


def test_budget_to_bounds_in_the_budgets_own_terms():
    """Parent 2 + 5 + 4 = 11 ms; the fastest choice 2 + 1 + 0.5 = 3.5 ms (3.142×, 2·8 tokens in 3.5 ms = 4571 tok/s);
    the smallest 10 + 2 + 1 = 13 MiB."""
    table = CostTable("cpu", "float32", Scenario(batch=2, prompt_len=16, gen_len=8), 2.0, 10.0, {})
    lib = {
        "layer_0": {"big": entry(5.0, 8.0), "small": entry(1.0, 2.0)},
        "layer_1": {"big": entry(4.0, 8.0), "small": entry(0.5, 1.0)},
    }
    cases = {
        Budget(target_speedup=1000): r"target speedup 1000 cannot be met: .* predicted at 3\.5 ms, 3\.142× the "
        r"parent's 11 ms",
        Budget(max_latency_ms=3): r"max latency 3 ms cannot be met: .* predicted at 3\.5 ms",
        Budget(min_throughput=5000): r"min throughput 5000 tokens/s cannot be met: .* at most 4571 tokens/s",
        Budget(max_memory_mib=5): r"max memory 5 MiB cannot be met: .* needs 13 MiB, 10 MiB of it outside",
    }
    for budget, message in cases.items():
        with pytest.raises(InfeasibleError, match=message) as e:
            block_bounds(budget, table, 11.0, lib)
        assert not NEGATIVE.search(str(e.value)), str(e.value)
    noisy = CostTable("cpu", "float32", table.scenario, -2.0, 10.0, {})  # timings gone wrong: negative non-block
    with pytest.raises(ValueError, match=r"predicts -0\.5 ms for the fastest .* too noisy"):
        block_bounds(Budget(target_speedup=1.5), noisy, 7.5, lib)
    assert block_bounds(Budget(max_kv_heads=2), noisy, 7.5, lib)  # no latency term: nothing depends on timings
    # Just within reach: the bounds are positive and the MIP finds the fastest choice.
    (bound,) = block_bounds(Budget(target_speedup=3.14), table, 11.0, lib)
    assert bound.upper == pytest.approx(11 / 3.14 - 2)
    (sol,) = solve(lib, "stats.runtime_ms", bounds=[bound])
    assert sol.choices == {"layer_0": "small", "layer_1": "small"}


def entry(runtime_ms: float, memory_mib: float) -> dict:
    return {"stats": {"runtime_ms": runtime_ms, "memory_mib": memory_mib, "num_kv_heads": 1}, "metrics": {"kl_div": 0}}


def test_budget_and_cli_errors(tiny_parent, tmp_path, capsys):
    with pytest.raises(ValueError, match="target speedup must be >= 1"):
        Budget(target_speedup=0.5)
    parent, _ = tiny_parent
    with pytest.raises(SystemExit) as e:
        main(["optimize", "--model", str(parent), "--out", str(tmp_path / "x"), "--prompt-len", "500"])
    assert e.value.code == 2
    assert "exceeds the model's context (512" in capsys.readouterr().err


def test_kv_head_budget_and_fusion_step_timed_in_bf16(tiny_parent, tmp_path, monkeypatch):
    """A KV-cache budget the parent's 2 + 2 heads exceed; `fusion` runs after the search and reports in report.md.
    Timed in bfloat16 (the default on CUDA): the cost table, the library's memory and every model the
    children's lockstep times are bf16, while training stays fp32. Blocks scored by the Fisher estimate
    (`--scoring fisher`), which the report says."""
    from dataclasses import replace

    from tessera.search.cost import block_memory_mib
    from tessera.search.fusion import FusionConfig

    parent, corpus = tiny_parent
    out = tmp_path / "run"
    cfg = replace(tiny_config(), pareto_speedups=(), fusion=FusionConfig(heal_steps=1, seq_len=32))
    cfg = replace(cfg, timing_dtype="bfloat16", scoring="fisher", fisher_samples=4)
    timed_dtypes, lockstep = set(), pipeline.lockstep

    def spy(models, *args, **kwargs):
        timed_dtypes.update(m.embed_tokens.weight.dtype for m in models)
        return lockstep(models, *args, **kwargs)

    monkeypatch.setattr(pipeline, "lockstep", spy)
    results = optimize(parent, out, Budget(max_kv_heads=1), cfg, corpus, progress=False)
    assert timed_dtypes == {torch.bfloat16}
    table = CostTable.from_json(json.loads((out / "cost.json").read_text()))
    assert table.dtype == "bfloat16" and results["timing_dtype"] == "bfloat16"
    arch = load_model(parent).arch
    entry = read_library(out / "library.json")["layer_0"]["gqa_kv1+ffn_64"]
    block = next(b for b in cfg.space.block_variants(arch, 0) if b.name == "gqa_kv1+ffn_64")
    assert entry["stats"]["memory_mib"] == pytest.approx(block_memory_mib(arch, block, cfg.scenario, torch.bfloat16))
    # The entry says how its runtimes were measured (Puzzle's "FP8, batch 256").
    assert {k: entry["stats"][k] for k in ("runtime_dtype", "runtime_device", "runtime_scenario")} == {
        "runtime_dtype": "bfloat16",
        "runtime_device": table.device,
        "runtime_scenario": cfg.scenario.key,
    }
    assert "timed in bfloat16" in (out / "report.md").read_text()
    assert "Fisher estimates of their replace-1-block KL (4 draws" in (out / "report.md").read_text()
    assert results["config"]["scoring"] == "fisher" and entry["metrics"]["kl_div"] > 0
    child = load_model(out / "child").arch
    assert sum(b.attention.n_kv_heads or 0 for b in child.blocks) <= 1
    fusion = results["fusion"]
    assert fusion["groups"] == [] and "reason" in fusion  # two layers: no run of three FFNs to fuse
    assert fusion["block_dependency"]["layers"] == [0, 1] and len(fusion["block_pairs"]) == 1
    assert (out / "fused" / "fusion.json").is_file() and (out / "fused" / "block_dependency.png").is_file()
    assert "## FFN Fusion" in (out / "report.md").read_text()


def test_bld_store_of_another_parent_is_refused_then_fresh_starts_over(tiny_parent, tmp_path):
    """A second `optimize` with another --model into the same --out once trained nothing and built the new
    parent's child from the old parent's blocks."""
    from dataclasses import replace

    parent, corpus = tiny_parent
    other_weights = Model(load_model(parent).arch).init_weights(seed=1)
    other = save_model(other_weights, tmp_path / "other", tokenizer_from=PARENT_DIR)
    out = tmp_path / "run"
    cfg = replace(tiny_config(), pareto_speedups=(), baseline_gkd=False)
    optimize(parent, out, Budget(max_kv_heads=2), cfg, corpus, progress=False)
    manifest = json.loads((out / "bld" / "manifest.json").read_text())
    cost_written = (out / "cost.json").stat().st_mtime_ns
    with pytest.raises(StoreMismatchError, match=r"bld: .*parent weights.*--fresh"):
        optimize(other, out, Budget(max_kv_heads=2), cfg, corpus, progress=False)
    assert (out / "cost.json").stat().st_mtime_ns == cost_written  # refused before the cost model's half minute
    # What the first run left that this one would not write: a fused copy of its child (this run fuses nothing),
    # a further scenario's costs it drops, a file in its child/: none of it stays beside the new child.
    (out / "fused").mkdir()
    (out / "fused" / "fusion.json").write_text("{}")
    (out / "cost_b9_p9_g9.json").write_text("{}")
    (out / "cost_h100.json").write_text("{}")  # a user's own table (`tessera calibrate --out`): not the run's
    (out / "child" / "generation_config.json").write_text('{"from": "the first parent"}')
    # A rerun whose budget is refused (after the cost model) leaves the earlier run's cost files as they were: they
    # agree with its report and library.
    with pytest.raises(UserError, match="cannot be met"):
        optimize(other, out, Budget(target_speedup=1000), cfg, corpus, progress=False, fresh=True)
    assert (out / "cost.json").stat().st_mtime_ns == cost_written and (out / "cost_b9_p9_g9.json").exists()
    optimize(other, out, Budget(max_kv_heads=2), cfg, corpus, progress=False, fresh=True)
    assert not (out / "fused").exists() and not (out / "cost_b9_p9_g9.json").exists()
    assert (out / "cost_h100.json").read_text() == "{}"
    assert "the first parent" not in (out / "child" / "generation_config.json").read_text()
    again = json.loads((out / "bld" / "manifest.json").read_text())
    assert again["parent_weights_sha256"] != manifest["parent_weights_sha256"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # Under torchrun every rank checks the store before the cost model: with --fresh a rank past 0 passes over
    # the old run's manifest too (rank 0 deletes the store later, before any rank reads it). Rank 1 raised here.
    from tessera.runtime.parallel import TensorParallel
    from tessera.search.bld import bld_manifest
    from tessera.search.ranks import Ranks

    rank_1 = pipeline.Optimizer(parent, corpus, out, cfg, progress=False, fresh=True, ranks=Ranks(TensorParallel(1, 2)))
    rank_1.store.check(bld_manifest(rank_1.parent, rank_1.calibration, cfg.space, cfg.bld))
    assert json.loads((out / "bld" / "manifest.json").read_text()) == again  # nothing deleted by a rank past 0
    # GKD's batch must split over the ranks: said as the run starts, not after BLD, scoring and the MIP.
    with pytest.raises(UserError, match=r"GKD's batch of 2 windows \(--gkd-batch-size\) does not split over 3"):
        pipeline.Optimizer(parent, corpus, out, cfg, progress=False, ranks=Ranks(TensorParallel(1, 3)))
    # Text windows past the parent's context (512 tokens): said as the run starts.
    with pytest.raises(UserError, match=r"seq_len 513: the parent's context is 512 tokens"):
        pipeline.Optimizer(parent, corpus, out, replace(cfg, seq_len=513), progress=False)
    # A window BLD and scoring could not see cut anything.
    with pytest.raises(UserError, match=r"attention windows 17, 32 need text at least twice as long .* 32-token"):
        replace(cfg, space=replace(cfg.space, windows=(8, 16, 17, 32)))


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_the_whole_search_and_fusion_on_a_qwen_parent(tiny_parent, tmp_path, family):
    """Puzzle end to end on a Qwen parent (Qwen3: q/k norms, head_dim 32 at hidden 64; Qwen2: q/k/v biases)
    with windowed attention in the space: windowed variants are distilled, scored and priced (at the scenario's
    24 tokens the served window_pages hold every token, so a window costs the memory full attention
    does), and the child keeps its family (tessera's format when heterogeneous), loads and generates; FFN Fusion
    runs on it after the search."""
    from tessera.search.fusion import FusionConfig

    _, corpus = tiny_parent
    base = load_model(tiny_parent[0]).arch
    arch = replace(base, family=family, head_dim=32 if family == "qwen3" else base.head_dim)
    parent = save_model(Model(arch).init_weights(seed=0), tmp_path / "parent", tokenizer_from=PARENT_DIR)
    cfg = replace(
        tiny_config(),
        space=replace(tiny_config().space, windows=(8,)),
        pareto_speedups=(),
        baseline_gkd=False,
        fusion=FusionConfig(heal_steps=1, seq_len=32),
    )
    results = optimize(parent, tmp_path / "run", Budget(target_speedup=1.1), cfg, corpus, progress=False)
    library = read_library(tmp_path / "run" / "library.json")
    full, windowed = library["layer_0"]["gqa_kv2+ffn_128"], library["layer_0"]["gqa_kv2_w8+ffn_128"]
    assert windowed["stats"]["memory_mib"] == full["stats"]["memory_mib"]
    assert windowed["stats"]["attention_window"] == 8 and windowed["stats"]["runtime_ms"] > 0
    assert "kl_div" in windowed["metrics"] and "bld_nmse_attention" in windowed["metrics"]
    child = load_model(tmp_path / "run" / "child")
    assert child.arch.family == family and [b.name for b in child.arch.blocks] == results["children"][1]["blocks"]
    assert "fusion" in results
    child_dir = str(tmp_path / "run" / "child")
    assert main(["generate", "--model", child_dir, "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0


# The search sharded over ranks (search/ranks.py), as `torchrun --nproc-per-node 2 tessera optimize` runs it: two
# spawned processes with torchrun's environment, gloo. Costs are fixed (timing is rank 0's alone and never equal
# between runs); one torch thread everywhere, so both runs sum their products in the same order. The ranks'
# function lives in a module written to a temporary folder: a spawned process imports it by name, and the
# tests folder is no importable package there.
RANK_MODULE = """
import copy, json, os
import torch
from tessera.search import pipeline
from tessera.search.bld import SublayerStore
from tessera.search.cost import CostTable
from tessera.search.data import load_parent
from tessera.search.gkd import GKDConfig, distill
from tessera.search.pipeline import Budget, OptimizeConfig
from tessera.search.ranks import Ranks


def torchrun_environment(rank, size, port):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def fixed_costs(arch, blocks, scenario, device, dtype, validate, progress):
    ms = {b.name: dict.fromkeys(("prefill_ms", "decode_ms", "runtime_ms"), 0.0 if b.is_empty else 1.0) for b in blocks}
    return CostTable("cpu", "float32", scenario, 2.0, 1.0, ms)


def library(parent, corpus, out, cfg, ranks):
    pipeline.calibrate = fixed_costs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    optimizer = pipeline.Optimizer(parent, corpus, out, cfg, progress=False, ranks=ranks)
    table, _ = optimizer.check_budget(Budget(target_speedup=1.1))
    return optimizer.distil_and_score(table)


def rank_main(rank, size, port, parent, corpus, out, cfg, fail_after):
    torchrun_environment(rank, size, port)
    trained, real_save = [], SublayerStore.save

    def save(self, layer, name, *args, **kwargs):
        if fail_after is not None and rank == 1 and len(trained) == fail_after:
            raise RuntimeError("rank 1 fails here")  # as a process killed mid-BLD: its other blocks never land
        trained.append(f"layer_{layer}/{name}")
        return real_save(self, layer, name, *args, **kwargs)

    SublayerStore.save = save
    ranks = Ranks.from_environment(torch.device("cpu"))
    built = library(parent, corpus, out, cfg, ranks)
    (out / f"trained_rank{rank}.json").write_text(json.dumps(trained))
    (out / f"library_rank{rank}.json").write_text(json.dumps(built))
    ranks.leave()


def gkd_gradients(parent_dir, corpus, ranks):
    # One GKD step of a perturbed copy of the parent toward it (4 windows): the gradient it applied.
    torch.set_num_threads(1)
    loaded = load_parent(parent_dir, corpus, torch.device("cpu"))
    child, noise = copy.deepcopy(loaded.model), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in child.parameters():
            p.requires_grad_(True)
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    cfg = GKDConfig(steps=1, batch_size=4, seq_len=32)
    distill(child, loaded.model, loaded.train_ids, cfg, progress=False, ranks=ranks)
    return {n: p.grad.clone() for n, p in child.named_parameters()}


def gkd_rank(rank, size, port, parent_dir, corpus, out):
    torchrun_environment(rank, size, port)
    ranks = Ranks.from_environment(torch.device("cpu"))
    torch.save(gkd_gradients(parent_dir, corpus, ranks), out / f"grads_rank{rank}.pt")
    ranks.leave()
"""


@pytest.fixture
def rank_module(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("rank_module")
    (folder / "sharded_search_rank.py").write_text(RANK_MODULE)
    monkeypatch.syspath_prepend(str(folder))  # spawned processes start with this process's sys.path
    import sharded_search_rank

    yield sharded_search_rank
    sys.modules.pop("sharded_search_rank", None)


def test_the_sharded_search_builds_the_same_library_and_resumes_a_dead_ranks_share(
    tiny_parent, tmp_path, rank_module, monkeypatch
):
    """Two ranks share BLD and scoring and build the library one process builds, exactly; when a rank dies mid-BLD
    (the launch fails), a restart trains only the blocks that never landed, whichever rank had them."""
    parent, corpus = tiny_parent
    cfg = tiny_config()

    def sharded(out, fail_after=None):
        args = (2, free_port(), parent, corpus, out, cfg, fail_after)
        with tolerating_teardown_aborts():  # what each rank wrote is checked below
            torch.multiprocessing.spawn(rank_module.rank_main, args=args, nprocs=2, join=True)

    monkeypatch.setattr(pipeline, "calibrate", rank_module.fixed_costs)  # put back after the test
    threads = torch.get_num_threads()
    try:
        expected = rank_module.library(parent, corpus, tmp_path / "one", cfg, ONE)
    finally:
        torch.set_num_threads(threads)
    expected = json.loads(json.dumps(expected))  # as the ranks wrote it
    out = tmp_path / "two"
    sharded(out)
    trained = [set(json.loads((out / f"trained_rank{r}.json").read_text())) for r in range(2)]
    assert trained[0] and trained[1] and not trained[0] & trained[1]  # each block trained once, by one rank
    for r in range(2):
        assert json.loads((out / f"library_rank{r}.json").read_text()) == expected
    assert read_library(out / "library.json") == expected
    all_blocks = trained[0] | trained[1]

    again = tmp_path / "again"
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 fails here"):
        sharded(again, fail_after=1)
    landed = {f"{p.parent.name}/{p.stem}" for p in (again / "bld").glob("layer_*/*.safetensors")}
    assert landed < all_blocks
    sharded(again)
    retrained = set().union(*(json.loads((again / f"trained_rank{r}.json").read_text()) for r in range(2)))
    assert retrained == all_blocks - landed
    assert read_library(again / "library.json") == expected


def test_rank_0_times_with_every_core_and_gives_the_shared_count_back() -> None:
    """BLD shares a machine's cores out among its ranks (parallel.join_group); rank 0's timings (Ranks.on_main, the
    children's measurement) take them all, the threads a child is served with, then give the share back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with every_core():
            assert torch.get_num_threads() == os.cpu_count()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_gkd_over_two_ranks_takes_one_process_step(tiny_parent, tmp_path, rank_module):
    """Data-parallel GKD (DistributedDataParallel, each rank 2 of the step's 4 windows) applies the gradient one
    process computes on all 4, on both ranks (up to the order of the sums: 1e-5 relative)."""
    parent, corpus = tiny_parent
    threads = torch.get_num_threads()
    try:
        expected = rank_module.gkd_gradients(parent, corpus, ONE)
    finally:
        torch.set_num_threads(threads)
    args = (2, free_port(), parent, corpus, tmp_path)
    with tolerating_teardown_aborts():  # each rank's gradients are checked below
        torch.multiprocessing.spawn(rank_module.gkd_rank, args=args, nprocs=2, join=True)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads_rank{rank}.pt")
        assert grads.keys() == expected.keys()
        for name, g in expected.items():
            assert g.abs().max() > 0, name  # a real step: every weight moves
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)


def test_load_parent_reads_the_text_before_the_weights(tmp_path, monkeypatch) -> None:
    """A corpus that cannot be read fails before the parent's weights are loaded (minutes for a large parent)."""
    import tessera.search.data as data
    from tessera.demo import PARENT_DIR
    from tessera.errors import UserFileNotFound

    monkeypatch.setattr(data, "load_frozen", lambda *a, **k: pytest.fail("the weights were loaded first"))
    with pytest.raises(UserFileNotFound, match=r"missing/train\.txt\.xz: no such file"):
        data.load_parent(PARENT_DIR, tmp_path / "missing", torch.device("cpu"))


def test_the_report_says_when_the_saved_child_misses_an_absolute_budget_as_measured() -> None:
    """The landing loop measures its children against --max-latency-ms and --min-throughput, but may keep one past
    them (none it measured met them), and the saved child's final measurement is a fresh one: a child that measures
    past them (42.0 ms against 40, seen on a loaded machine) is said in the report, not left for the reader."""
    from tessera.search.report import budget_misses

    def results(measured_ms: float, **budget) -> dict:
        child = {"measured_ms": measured_ms, "predicted_ms": 39.8}
        return {"budget": budget, "children": [{}, child], "scenario": {"batch": 4, "prompt_len": 32, "gen_len": 16}}

    [line] = budget_misses(results(42.0, max_latency_ms=40.0, min_throughput=None))
    assert "max latency 40 ms: measured 42.0 ms (predicted 39.8 ms)" in line
    assert budget_misses(results(39.9, max_latency_ms=40.0)) == []
    # 4 x 16 tokens in 42 ms: 1,523.8 tokens/s, short of 1,600; the prediction said 1,608.0.
    [line] = budget_misses(results(42.0, min_throughput=1600.0))
    assert "min throughput 1600 tokens/s: measured 1523.8 (predicted 1608.0)" in line
    assert budget_misses(results(42.0, target_speedup=1.5)) == []  # corrected by the landing, reported there


def test_the_report_gives_each_landing_check_on_a_latency_limit() -> None:
    """Landing on --max-latency-ms: the report's table gives each check's asked, predicted and measured latency,
    and names the limit with its window; no speedup table is made for a budget without a target speedup."""
    from tessera.search.report import _landing

    checks = [
        {"asked_latency_ms": 45.0, "predicted_ms": 45.0, "measured_ms": 57.0, "blocks": []},
        {"asked_latency_ms": 34.82, "predicted_ms": 34.5, "measured_ms": 42.5, "blocks": []},
    ]
    scenario = {"batch": 4, "prompt_len": 32, "gen_len": 16}
    results = {"landing_checks": checks, "budget": {"max_latency_ms": 45.0}, "scenario": scenario}
    text = "\n".join(_landing({**results, "target_tolerance": 0.02}))
    assert "the latency limit 45 ms (at most it, within 4 % under it)" in text
    throughput = {**results, "budget": {"min_throughput": 1422.2}, "target_tolerance": 0.02}
    assert "the latency limit 45 ms, the min throughput 1422.2 tokens/s (at most" in "\n".join(_landing(throughput))
    assert "| 1 | 45 | 45 | 57 |" in text and "| 2 | 34.82 | 34.5 | 42.5 |" in text
    assert "speedup asked" not in text
    assert _landing({**results, "landing_checks": [], "target_tolerance": 0.02}) == []
