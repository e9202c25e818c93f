"""`tessera optimize` end to end on a tiny random parent (seconds, not the demo's minutes)."""

from __future__ import annotations

import json
import lzma

import pytest

from tessera.cli import main
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.demo_parent import PARENT_DIR, read_corpus
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.search.bld import BLDConfig
from tessera.search.cost import Scenario
from tessera.search.gkd import GKDConfig
from tessera.search.library import SearchSpace, read_library
from tessera.search.mip import InfeasibleError
from tessera.search.pipeline import Budget, OptimizeConfig, optimize


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
        (corpus / f"{split}.txt.xz").write_bytes(lzma.compress(read_corpus(split)[:chars].encode()))
    return parent, corpus


def tiny_config() -> OptimizeConfig:
    return OptimizeConfig(
        space=SearchSpace(kv_heads=(2, 1), ffn_ratios=(1.0, 0.5), linear_ffn=False),
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


def test_optimize_writes_child_library_costs_report(tiny_parent, tmp_path, capsys):
    parent, corpus = tiny_parent
    out = tmp_path / "run"
    results = optimize(parent, out, Budget(target_speedup=1.1), tiny_config(), corpus, progress=False)
    for name in ("library.json", "cost.json", "report.md", "results.json", "pareto.png", "layers.png"):
        assert (out / name).is_file(), name
    methods = [c["method"] for c in results["children"]]
    assert methods[0] == "parent" and methods.count("mip") >= 2 and "greedy" in methods
    main_child = results["children"][1]
    # The saved child is the main MIP solution, loads in the runtime, and is within the budget as predicted.
    child = load_model(out / "child")
    assert [b.name for b in child.arch.blocks] == main_child["blocks"]
    assert main_child["predicted_ms"] <= results["children"][0]["predicted_ms"] / 1.1 + 1e-6
    for c in results["children"]:
        assert c["measured_ms"] > 0 and c["quality_bld"]["perplexity"] > 1
    # The library follows the published schema and the CLI solver accepts it.
    library = read_library(out / "library.json")
    entry = library["layer_0"]["gqa_kv1+ffn_64"]
    assert {"runtime_ms", "memory_mib", "num_params", "num_kv_heads", "ffn_intermediate_size"} <= set(entry["stats"])
    assert {"kl_div", "lm_loss", "bld_nmse_attention", "bld_nmse_ffn"} <= set(entry["metrics"])
    assert main(["search", "solve", "--library", str(out / "library.json"), "--json"]) == 0
    (best,) = json.loads(capsys.readouterr().out)
    assert best["objective"] == 0.0  # unconstrained: the parent's own blocks, KL 0
    assert main(["generate", "--model", str(out / "child"), "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0
    report = (out / "report.md").read_text()
    assert "## Cost model" in report and "mean absolute error" in report


def test_infeasible_budget_fails_before_training(tiny_parent, tmp_path):
    parent, corpus = tiny_parent
    out = tmp_path / "run"
    with pytest.raises(InfeasibleError, match=r"stats\.memory_mib ≤ .* cannot be met: the smallest total is"):
        optimize(parent, out, Budget(max_memory_mib=0.3), tiny_config(), corpus, progress=False)
    assert (out / "cost.json").is_file() and not (out / "bld").exists()


def test_budget_and_cli_errors(tiny_parent, tmp_path, capsys):
    with pytest.raises(ValueError, match="target speedup must be >= 1"):
        Budget(target_speedup=0.5)
    parent, _ = tiny_parent
    with pytest.raises(SystemExit) as e:
        main(["optimize", "--model", str(parent), "--out", str(tmp_path / "x"), "--prompt-len", "500"])
    assert e.value.code == 2
    assert "exceeds the model's context (512" in capsys.readouterr().err


def test_kv_head_budget_and_fusion_step(tiny_parent, tmp_path):
    """A KV-cache budget the parent's 2 + 2 heads exceed; `fusion` runs after the search and reports in report.md."""
    from dataclasses import replace

    from tessera.search.fusion import FusionConfig

    parent, corpus = tiny_parent
    out = tmp_path / "run"
    cfg = replace(tiny_config(), pareto_speedups=(), fusion=FusionConfig(heal_steps=1, seq_len=32))
    results = optimize(parent, out, Budget(max_kv_heads=1), cfg, corpus, progress=False)
    child = load_model(out / "child").arch
    assert sum(b.attention.n_kv_heads or 0 for b in child.blocks) <= 1
    fusion = results["fusion"]
    assert fusion["groups"] == [] and "reason" in fusion  # two layers: no run of three FFNs to fuse
    assert fusion["block_dependency"]["layers"] == [0, 1] and len(fusion["block_pairs"]) == 1
    assert (out / "fused" / "fusion.json").is_file() and (out / "fused" / "block_dependency.png").is_file()
    assert "## FFN Fusion" in (out / "report.md").read_text()
