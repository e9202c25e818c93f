"""FFN Fusion: exactness of the transform, dependency matrix against brute force, group choice, healing,
export in the Ultra-253B layout, `tessera info`/`tessera fuse`, and that empty layers cost nothing."""

from __future__ import annotations

import json
import lzma
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera import kernels
from tessera.cli import main
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, ConfigError, FFNConfig
from tessera.demo import CORPUS_DIR, PARENT_DIR
from tessera.runtime.cache import PagedKVCache
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model
from tessera.search.data import read_corpus
from tessera.search.fusion import (
    EMPTY,
    FusionConfig,
    FusionError,
    FusionGroup,
    aligned_layers,
    analyse_and_fuse,
    choose_groups,
    dependency_matrix,
    ffn_runs,
    fuse,
    heal,
    parallel_forward,
    parse_groups,
)
from tessera.search.gkd import GKDConfig
from tessera.search.scoring import model_quality, reference_logprobs
from tessera.search.train import fixed_windows

from .conftest import relative_error

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def gqa(kv: int = 2, width: int = 64) -> BlockConfig:
    return BlockConfig(AttentionConfig("gqa", kv), FFNConfig("swiglu", width))


def ffn(width: int) -> BlockConfig:
    return BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", width))


# An attention-free run 1..5 (an empty layer inside it), different widths per branch.
BLOCKS = (gqa(), ffn(48), EMPTY, ffn(80), ffn(32), ffn(64), gqa(1), ffn(40), ffn(24))


def tiny_model(blocks=BLOCKS, vocab: int = 97, seed: int = 0) -> Model:
    arch = ArchConfig(
        vocab_size=vocab, hidden_size=32, n_heads=4, head_dim=8, blocks=tuple(blocks), max_position_embeddings=64
    )
    model = Model.empty(arch).init_weights(seed=seed, std=0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norm weights away from 1, so folding them into the branches is really tested
        for layer in model.layers:
            if layer.post_attention_layernorm is not None:
                w = layer.post_attention_layernorm.weight
                w.copy_(0.5 + torch.rand(w.shape, generator=gen))
    return model.eval()


def swiglu_branch(layer, x: torch.Tensor) -> torch.Tensor:
    """f(norm(x)) for one FFN layer, written out in plain torch from its weights (not through the model)."""
    norm = layer.post_attention_layernorm
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    gate, up = F.linear(n, layer.mlp.w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, layer.mlp.w_down)


def test_fused_layer_equals_parallel_form_for_different_widths():
    model = tiny_model()
    group = FusionGroup((1, 3, 4))
    fused = fuse(model, [group])
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    expected = x + sum(swiglu_branch(model.layers[i], x) for i in group.layers)
    with torch.no_grad():
        actual = fused.layers[4].feed_forward(x)
    # Same sums in a different order (one [7, 160] GEMM instead of three): fp32 rounding only.
    assert relative_error(actual, expected) <= 1e-5
    assert fused.layers[4].mlp.w_down.shape == (32, 48 + 80 + 32)
    assert torch.equal(fused.layers[4].post_attention_layernorm.weight, torch.ones(32))


def test_fused_model_equals_parallel_forward_and_keeps_the_rest():
    model = tiny_model()
    groups = [FusionGroup((1, 3, 4)), FusionGroup((7, 8))]
    fused = fuse(model, groups)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = parallel_forward(model, tokens, [g.layers for g in groups])
        actual = fused(tokens)
        sequential = model(tokens)
    assert relative_error(actual, expected) <= 1e-5
    assert relative_error(sequential, expected) > 1e-2  # the parallel form is an approximation; fusion is not
    assert [b.name for b in fused.arch.blocks] == [
        gqa().name,
        EMPTY.name,
        EMPTY.name,
        EMPTY.name,
        ffn(160).name,
        ffn(64).name,
        gqa(1).name,
        EMPTY.name,
        ffn(64).name,
    ]
    assert fused.arch.fusion_spans == ((1, 4), (7, 8))
    assert fused.arch.sequential_depth() == model.arch.sequential_depth() - 3
    assert torch.equal(fused.layers[5].mlp.w_down, model.layers[5].mlp.w_down)  # untouched layers are copied


def test_a_calibrated_fp8_kv_cache_keeps_its_scales_through_fusion_not_into_a_child():
    """Fusion leaves every attention layer as it was, so calibrated FP8 KV-cache scales stay (fuse raised on the
    scale buffers before); an assembled child gets none (they describe the parent's own keys and values)."""
    from tessera.search.assemble import assemble_child
    from tessera.search.bld import SublayerStore

    model = tiny_model()
    model.calibrate_kv_scales(torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)))
    fused = fuse(model, [FusionGroup((1, 3, 4))])
    assert fused.arch.kv_cache_scales and fused.kv_scales() == model.kv_scales() != {}
    child = assemble_child(model, SublayerStore(Path("unused-store")), list(model.arch.blocks))
    assert not child.arch.kv_cache_scales and child.kv_scales() == {}
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(child(tokens), model(tokens))


def test_healing_recalibrates_the_fp8_kv_cache_scales():
    """Healing trains the attention layers too: the scales a healed model keeps are its own keys' and values'
    (calibrated again on the fusion's calibration windows), not the unhealed model's."""
    import copy

    model = tiny_model()
    model.calibrate_kv_scales(torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)))
    train = np.random.default_rng(0).integers(0, 97, 4000)
    cfg = FusionConfig(spans=((1, 4),), heal_steps=2, heal_lr=1e-2, seq_len=32, calibration_windows=2)
    fused, _ = analyse_and_fuse(model, train, torch.from_numpy(train[:64].reshape(2, 32)), cfg, progress=False)
    assert fused.arch.kv_cache_scales
    again = copy.deepcopy(fused)
    again.calibrate_kv_scales(fixed_windows(train, cfg.seq_len, cfg.calibration_windows))
    assert fused.kv_scales() == again.kv_scales() != model.kv_scales()


def test_fusion_refuses_windows_past_the_context_and_fp8_weights():
    model = tiny_model()  # a 64-token context
    train = np.random.default_rng(0).integers(0, 97, 4000)
    with pytest.raises(FusionError, match="seq_len 65: longer than the model's context"):
        analyse_and_fuse(model, train, None, FusionConfig(seq_len=65), progress=False)
    with pytest.raises(FusionError, match="fuse the unquantized model"):
        fuse(model.cast(kernels.FP8), [FusionGroup((1, 3, 4))])


def test_ffn_runs_and_default_groups_leave_the_last_ffn():
    arch = tiny_model().arch
    assert ffn_runs(arch) == [[1, 3, 4, 5], [7, 8]]
    # The run of two has nothing left once its last FFN stays out.
    assert [g.layers for g in choose_groups(arch)] == [(1, 3, 4)]


def brute_force_dependency(model: Model, tokens: torch.Tensor, i: int, j: int) -> float:
    """1 − cos of layer j's contribution with and without layer i, each from its own model."""

    def contribution(m: Model) -> torch.Tensor:
        seen = {}
        hook = m.layers[j].register_forward_hook(lambda mod, args, out: seen.setdefault("c", out - args[0]))
        with torch.no_grad():
            m(tokens)
        hook.remove()
        return seen["c"]

    blocks = list(model.arch.blocks)
    blocks[i] = EMPTY
    without = Model.empty(model.arch.with_blocks(blocks))
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(f"layers.{i}.")})
    return (1 - F.cosine_similarity(contribution(model), contribution(without), dim=-1)).mean().item()


def test_dependency_matrix_matches_brute_force():
    model = tiny_model()
    windows = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    layers = [1, 3, 4, 5, 7]
    dep = dependency_matrix(model, windows, layers, progress=False, chunk=2)
    for a, i in enumerate(layers):
        for b, j in enumerate(layers):
            if a >= b:
                assert np.isnan(dep.matrix[a, b])
                continue
            expected = brute_force_dependency(model, windows[:, :-1], i, j)
            assert dep.matrix[a, b] == pytest.approx(expected, rel=1e-4, abs=1e-6), (i, j)
    assert dep.matrix[0, 1] > 0.01  # layer 3 really depends on layer 1 in this random model


def test_threshold_and_explicit_groups():
    model = tiny_model()
    arch = model.arch
    windows = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    dep = dependency_matrix(model, windows, [1, 3, 4, 5, 7, 8], progress=False)
    # A threshold above every dependency takes each whole run; below every one, nothing.
    assert [g.layers for g in choose_groups(arch, dep, threshold=2.0)] == [(1, 3, 4, 5), (7, 8)]
    assert choose_groups(arch, dep, threshold=0.0) == []
    lone = tiny_model((gqa(), ffn(48), gqa(1))).arch  # one attention-free FFN: nothing to group, no matrix needed
    assert choose_groups(lone, None, threshold=0.1) == []
    (group,) = choose_groups(arch, dep, spans=parse_groups("3-5"))
    assert group.layers == (3, 4, 5)
    assert group.score == pytest.approx(max(dep.get(3, 4), dep.get(3, 5), dep.get(4, 5)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0-2", "layer 0 is gqa_kv2"),
        ("1-2", "at least two SwiGLU FFNs"),
        ("3-4,4-5", "layer 4 is already in another group"),
        ("7-9", "layers 0..8"),
        ("5-3", "FIRST < LAST"),
        ("a-b", "expected spans"),
    ],
)
def test_bad_groups_are_refused(text, message):
    with pytest.raises(FusionError, match=message):
        choose_groups(tiny_model().arch, spans=parse_groups(text))


def test_healing_lowers_the_kl_from_the_unfused_model():
    model = tiny_model(vocab=61)
    for p in model.parameters():
        p.requires_grad_(False)
    fused = fuse(model, [FusionGroup((1, 3, 4, 5))])
    assert aligned_layers(fused.arch) == [0, 5, 6, 7, 8]
    tokens = np.random.default_rng(0).integers(0, 61, 4000)
    held_out = fixed_windows(np.random.default_rng(1).integers(0, 61, 2000), 32, 8)
    ref = reference_logprobs(model, held_out)
    before = model_quality(fused, held_out, ref)["kl_div"]
    heal(fused, model, tokens, GKDConfig(steps=30, lr=3e-3, seq_len=32), progress=False)
    after = model_quality(fused, held_out, ref)["kl_div"]
    assert after < 0.7 * before, (before, after)


def test_fused_checkpoint_round_trips_in_the_ultra_layout(tmp_path):
    model = tiny_model()
    fused = fuse(model, [FusionGroup((1, 3, 4))])
    path = save_model(fused, tmp_path / "fused")
    config = json.loads((path / "config.json").read_text())
    assert config["ffn_fusion_spans"] == [[1, 4]]
    for i in (1, 2, 3):  # the group's other layers: attention and FFN both no-op, as in Ultra-253B
        assert config["block_configs"][i]["attention"]["no_op"] and config["block_configs"][i]["ffn"]["no_op"]
    assert config["block_configs"][4]["ffn"]["ffn_mult"] == pytest.approx(160 * 3 / (2 * 32))
    loaded = load_model(path)
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), fused(tokens))
    assert loaded.arch.fusion_spans == ((1, 4),)


def test_a_child_that_looks_fused_is_not_read_as_fused(tmp_path):
    """A Puzzle child can keep an attention-free FFN wider than every attention layer's, after an empty layer: the
    layout NVIDIA's Ultra-253B shows fused FFNs by. A config without a record is read by that layout; a child (built
    with the record: none) is not, through save and load, and a later fusion records only its own group."""
    blocks = (gqa(2, 64), EMPTY, ffn(128), gqa(1, 64), ffn(48), ffn(48), ffn(48), gqa(2, 64))
    unrecorded = tiny_model(blocks).arch
    assert unrecorded.fusion_spans is None and unrecorded.fused_ffn_spans() == ((1, 2),)  # as Ultra-253B is read
    child = Model.empty(unrecorded.with_blocks(blocks)).init_weights(seed=0)
    assert child.arch.fused_ffn_spans() == ()
    path = save_model(child, tmp_path / "child")
    assert json.loads((path / "config.json").read_text())["ffn_fusion_spans"] == []
    assert load_model(path).arch.fused_ffn_spans() == ()
    assert fuse(child, [FusionGroup((4, 5))]).arch.fusion_spans == ((4, 5),)


def test_fusion_spans_are_checked(tmp_path):
    arch = tiny_model().arch
    with pytest.raises(ConfigError, match=r"ffn_fusion_spans \[0, 1\]: layers 0..0 must be empty"):
        ArchConfig(**{**arch.__dict__, "fusion_spans": ((0, 1),)})
    config = arch.to_hf_dict()
    config["ffn_fusion_spans"] = [[1, "4"]]
    with pytest.raises(ConfigError, match="ffn_fusion_spans entry"):
        ArchConfig.from_hf_dict(config, "x/config.json")


def test_info_reports_ultra_fused_ffns_and_empty_layers(capsys):
    path = CONFIGS / "llama-3_1-nemotron-ultra-253b-v1.json"
    arch = ArchConfig.from_json(path)
    spans = arch.fused_ffn_spans()
    widths = sorted(arch.blocks[last].ffn.intermediate_size for _, last in spans)
    assert widths == [301_056, 343_040, 399_360, 425_984]
    assert len(arch.empty_layers()) == 81
    assert main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "empty layers    81" in out
    assert "fused FFNs      4 (widths 301,056 to 425,984)" in out
    # Puzzle models without fusion show none: Super-49B's attention-free FFNs are no wider than its others.
    assert ArchConfig.from_json(CONFIGS / "llama-3_3-nemotron-super-49b-v1.json").fused_ffn_spans() == ()


def test_empty_layers_cost_nothing_and_fused_ffn_is_one_kernel_call(monkeypatch):
    fused = fuse(tiny_model(), [FusionGroup((1, 3, 4))])
    assert not any(n.startswith(("layers.1.", "layers.2.", "layers.3.")) for n, _ in fused.named_parameters())
    cache = PagedKVCache(fused.arch, num_pages=2, page_size=8)
    assert cache.k[1] is cache.v[3] is None
    calls = []
    real_ffn, real_norm = kernels.swiglu_ffn, kernels.rms_norm
    monkeypatch.setattr(
        kernels, "swiglu_ffn", lambda x, gu, d, *rest: calls.append(d.shape[1]) or real_ffn(x, gu, d, *rest)
    )
    monkeypatch.setattr(kernels, "rms_norm", lambda *a, **k: calls.append("norm") or real_norm(*a, **k))
    with torch.no_grad():
        fused(torch.randint(0, 97, (1, 5)))
    widths = [c for c in calls if c != "norm"]
    # One call per SwiGLU that exists (the fused one is 48 + 80 + 32 wide), none for the empty layers.
    assert widths == [64, 160, 64, 64, 40, 24]
    assert calls.count("norm") == 2 + 1 + 1 + 2 + 1 + 1 + 1  # the sublayers' norms and the final norm


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random model with an attention-free run, the demo tokenizer, and a small corpus cut from the demo's."""
    root = tmp_path_factory.mktemp("fuse")
    blocks = (gqa(), ffn(64), ffn(48), ffn(64), ffn(32), gqa())
    arch = ArchConfig(
        vocab_size=8192,
        hidden_size=32,
        n_heads=4,
        head_dim=8,
        blocks=blocks,
        tie_embeddings=True,
        max_position_embeddings=512,
        dtype="float32",
    )
    path = save_model(Model(arch).init_weights(seed=0), root / "model", tokenizer_from=PARENT_DIR)
    corpus = root / "corpus"
    corpus.mkdir()
    for split in ("train", "validation"):
        (corpus / f"{split}.txt.xz").write_bytes(lzma.compress(read_corpus(split, CORPUS_DIR)[:40_000].encode()))
    return path, corpus


def fuse_args(path: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fuse",
        "--model",
        str(path),
        "--out",
        str(out),
        "--corpus",
        str(corpus),
        "--heal-steps",
        "2",
        "--eval-windows",
        "2",
        "--batch",
        "1",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        *extra,
    ]


def test_fuse_cli_writes_fused_checkpoint_and_report(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """`tessera fuse` writes the fused checkpoint and its report, timing fused against unfused in the precision
    asked (--timing-dtype; the serving one by default)."""
    from tessera.search import fusion

    path, corpus = tiny_checkpoint
    out = tmp_path / "fused"
    timed, lockstep = set(), fusion.lockstep
    monkeypatch.setattr(
        fusion,
        "lockstep",
        lambda models, *a: timed.update(m.lm_head_weight.dtype for m in models) or lockstep(models, *a),
    )
    assert main([*fuse_args(path, corpus, out), "--timing-dtype", "bfloat16"]) == 0
    assert timed == {torch.bfloat16}
    info = json.loads((out / "fusion.json").read_text())
    assert info["timing_dtype"] == "bfloat16" and "in bfloat16" in (out / "fusion.md").read_text()
    assert info["eval_windows"] == 2
    assert info["groups"][0]["layers"] == [1, 2, 3]  # the run 1-4 without its last FFN
    assert info["sequential_depth"] == {"before": 8, "after": 6}
    assert set(info["quality"]) == {"unfused", "fused", "healed"}
    assert set(info["latency"]) == {"unfused", "fused"}
    assert len(info["block_pairs"]) == 5 and info["block_dependency"]["layers"] == [0, 1, 2, 3, 4, 5]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "fusion.md", "ffn_dependency.png"):
        assert (out / name).is_file(), name
    assert load_model(out).arch.fusion_spans == ((1, 3),)
    assert "| 1, 2, 3 | 1-3 | 3 |" in capsys.readouterr().out


def test_fusing_a_fused_span_again_reports_the_span_the_checkpoint_records(tiny_checkpoint, tmp_path, capsys):
    """Layers 1-2 fused (layer 1 empty), then 1-3: the group's FFNs are layers 2 and 3, and its span is 1-3 as the
    checkpoint records it (fusion.json once said 2-3)."""
    path, corpus = tiny_checkpoint
    assert main(fuse_args(path, corpus, tmp_path / "a", "--groups", "1-2", "--heal-steps", "0")) == 0
    assert main(fuse_args(tmp_path / "a", corpus, tmp_path / "b", "--groups", "1-3", "--heal-steps", "0")) == 0
    [group] = json.loads((tmp_path / "b" / "fusion.json").read_text())["groups"]
    assert (group["layers"], group["span"]) == ([2, 3], [1, 3])
    assert "| 2, 3 | 1-3 | 2 |" in capsys.readouterr().out
    # More windows than the validation split holds: said, and the number used recorded.
    args = fuse_args(tmp_path / "a", corpus, tmp_path / "c", "--groups", "1-3", "--heal-steps", "0")
    args[args.index("--eval-windows") + 1] = "100000"
    assert main(args) == 0
    used = json.loads((tmp_path / "c" / "fusion.json").read_text())["eval_windows"]
    assert (
        0 < used < 100000
        and f"--eval-windows 100000: the validation split holds {used} windows" in capsys.readouterr().err
    )
    assert load_model(tmp_path / "b").arch.fusion_spans == ((1, 3),)


def test_fuse_cli_errors(tiny_checkpoint, tmp_path, capsys):
    path, corpus = tiny_checkpoint
    with pytest.raises(SystemExit) as e:
        main(fuse_args(path, corpus, tmp_path / "a", "--groups", "1-3", "--threshold", "0.1"))
    assert e.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(fuse_args(path, corpus, tmp_path / "b", "--groups", "0-2"))
    assert "layer 0 is gqa_kv2+ffn_64" in capsys.readouterr().err
    # An FP8 checkpoint is refused before any work: loaded for fusion it is dequantized, and the fused model was
    # written in bf16, its quantization dropped without a word.
    assert main(["quantize", "--model", str(path), "--out", str(tmp_path / "fp8")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(fuse_args(tmp_path / "fp8", corpus, tmp_path / "f", "--groups", "1-3", "--heal-steps", "0"))
    assert e.value.code == 2 and "its weights are fp8; fuse the unquantized model" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    # Nothing to fuse: the analysis is still written, and the exit status says so.
    with pytest.raises(SystemExit):
        main(fuse_args(path, corpus, tmp_path / "c", "--threshold", "0", "--heal-steps", "0"))
    assert "nothing to fuse" in capsys.readouterr().err
    assert (tmp_path / "c" / "fusion.json").is_file() and not (tmp_path / "c" / "config.json").exists()
    assert (
        "no FFN's dependency on the one before it is at most the threshold 0.0"
        in (tmp_path / "c/fusion.md").read_text()
    )
    # A rerun into an earlier fused checkpoint that fuses nothing keeps that checkpoint (it once left the analysis
    # alone, the weights deleted).
    assert main(fuse_args(path, corpus, tmp_path / "e", "--groups", "1-3", "--heal-steps", "0")) == 0
    before = sorted(p.name for p in (tmp_path / "e").iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(fuse_args(path, corpus, tmp_path / "e", "--threshold", "0", "--heal-steps", "0"))
    assert "keeps the fused model it held" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == before and load_model(tmp_path / "e").arch.fusion_spans
    short = tmp_path / "short"  # a corpus shorter than one window: said, not a torch.cat traceback
    short.mkdir()
    for split in ("train", "validation"):
        (short / f"{split}.txt.xz").write_bytes(lzma.compress(b"def f(x):\n    return x\n"))
    with pytest.raises(SystemExit):
        main(fuse_args(path, short, tmp_path / "d", "--threshold", "0.1"))
    assert "its train split is" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_fuse_with_explicit_groups_and_no_healing_is_a_pure_transform(tiny_checkpoint, tmp_path, capsys):
    """No tokenizer, no corpus (issue 17): explicit --groups and --heal-steps 0 need no text. The result is
    exactly `fuse` of the loaded model, stored in bf16; nothing is scored. A run that needs text still says so."""
    path, _ = tiny_checkpoint
    bare = tmp_path / "bare"
    shutil.copytree(path, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert not (bare / "tokenizer.json").exists()
    out = tmp_path / "fused"
    argv = ["fuse", "--model", str(bare), "--out", str(out), "--groups", "1-3", "--heal-steps", "0"]
    assert main([*argv, "--batch", "1", "--prompt-len", "8", "--gen-len", "4"]) == 0
    info = json.loads((out / "fusion.json").read_text())
    assert info["quality"] == {} and info["ffn_dependency"] is None and set(info["latency"]) == {"unfused", "fused"}
    assert "Not scored" in (out / "fusion.md").read_text()
    expected = fuse(load_model(bare), [FusionGroup((1, 2, 3))])
    got = load_model(out)
    assert got.arch == replace(expected.arch, dtype="bfloat16")
    for (name, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv[:4], str(tmp_path / "empty"), "--groups", "", "--heal-steps", "0"])
    assert e.value.code == 2 and "--groups '': expected spans" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # healing needs text: the missing tokenizer is named
        main(["fuse", "--model", str(bare), "--out", str(tmp_path / "healed"), "--groups", "1-3"])
    assert e.value.code == 2 and "tokenizer.json: no such file" in capsys.readouterr().err


def test_fuse_cli_keeps_fp8_kv_cache_scales(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint with calibrated FP8 KV-cache scales keeps them through `tessera fuse` (fusion leaves attention
    as it is; the command's load had dropped them, so an FP8 cache served the output at scale 1)."""
    path, _ = tiny_checkpoint
    model = load_model(path)
    scales = model.calibrate_kv_scales(torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0)))
    calibrated = save_model(model, tmp_path / "calibrated", tokenizer_from=path)
    out = tmp_path / "fused"
    argv = ["fuse", "--model", str(calibrated), "--out", str(out), "--groups", "1-3", "--heal-steps", "0"]
    assert main([*argv, "--batch", "1", "--prompt-len", "8", "--gen-len", "4"]) == 0
    assert load_model(out).kv_scales() == scales != {}
    assert "kv_cache_scheme" in json.loads((out / "config.json").read_text())["quantization_config"]
    capsys.readouterr()


def test_fuse_cli_on_a_context_shorter_than_its_default_windows(tmp_path, capsys):
    """Windows as long as the model's context allows: a 64-token model (the default windows are 256 tokens) is
    analysed, fused and healed (this raised a ValueError traceback after the dependency matrices)."""
    arch = ArchConfig(
        vocab_size=8192, hidden_size=32, n_heads=4, head_dim=8, blocks=(gqa(), ffn(64), ffn(48), ffn(64), gqa()),
        tie_embeddings=True, max_position_embeddings=64, dtype="float32",
    )  # fmt: skip
    path = save_model(Model(arch).init_weights(seed=0), tmp_path / "short", tokenizer_from=PARENT_DIR)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "validation"):
        (corpus / f"{split}.txt.xz").write_bytes(lzma.compress(read_corpus(split, CORPUS_DIR)[:20_000].encode()))
    out = tmp_path / "fused"
    assert main(fuse_args(path, corpus, out, "--groups", "1-2")) == 0
    assert load_model(out).arch.fusion_spans == ((1, 2),)
    capsys.readouterr()


def test_run_fusion_replaces_its_folder_whole_or_not_at_all(tiny_checkpoint, tmp_path, monkeypatch):
    """An earlier model's files (training.json, a plot) do not linger beside the fused checkpoint; a run
    interrupted while writing leaves the old folder as it was, and no temporary folder beside it."""
    import tessera.search.fusion as fusion

    path, _ = tiny_checkpoint
    model = load_model(path)
    out = tmp_path / "out"
    shutil.copytree(path, out)
    (out / "training.json").write_text("{}\n")
    before = sorted(p.name for p in out.iterdir())
    cfg = fusion.FusionConfig(spans=((1, 3),), heal_steps=0)
    scenario = fusion.Scenario(batch=1, prompt_len=8, gen_len=4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fusion.run_fusion(model, None, None, out, cfg, scenario, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    fusion.run_fusion(model, None, None, out, cfg, scenario, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "fusion.json", "fusion.md", "model.safetensors"]
