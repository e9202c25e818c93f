"""The BLD store as a resumable store: it records what it was computed from and refuses another run's inputs,
starts over when asked, writes every file atomically, and retrains a damaged block file with a warning."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace

import pytest
import torch

import tessera.search.bld as bld
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.files import atomic_path
from tessera.runtime.model import Model
from tessera.search import activations
from tessera.search.bld import (
    BLDConfig,
    StoreError,
    StoreMismatchError,
    SublayerStore,
    run_bld,
    trainings,
    weights_sha256,
)
from tessera.search.library import SearchSpace

ARCH = ArchConfig(
    vocab_size=97,
    hidden_size=32,
    n_heads=4,
    head_dim=8,
    blocks=(BlockConfig(AttentionConfig("gqa", 2), FFNConfig("swiglu", 64)),) * 2,
    max_position_embeddings=64,
    eos_token_ids=(0,),
    dtype="float32",
)
SPACE = SearchSpace(kv_heads=(2, 1), ffn_ratios=(1.0, 0.5), ffn_multiple=16, linear_attention=False, linear_ffn=False)
CFG = BLDConfig(steps=3, batch_windows=2, eval_windows=2)
WINDOWS = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(0))
N_TRAININGS = len(trainings(ARCH, SPACE))  # 4: per layer GQA kv1 and a 32-wide FFN (not the parent's, no no-ops)


def parent(seed: int) -> Model:
    model = Model(ARCH).init_weights(std=0.1, seed=seed).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_into(store: SublayerStore, model: Model, cfg: BLDConfig = CFG, space: SearchSpace = SPACE) -> dict:
    return run_bld(model, activations.record(model, WINDOWS, progress=False), space, store, cfg, progress=False)


@pytest.fixture
def count_trainings(monkeypatch):
    """The number of sublayers trained from here on (BLD's training loop, counted)."""
    calls = []
    real = bld.train

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bld, "train", counting)
    return calls


def test_manifest_records_parent_calibration_space_and_settings(tmp_path):
    model = parent(0)
    train_into(SublayerStore(tmp_path / "bld"), model)
    manifest = json.loads((tmp_path / "bld" / "manifest.json").read_text())
    assert manifest["parent_weights_sha256"] == weights_sha256(model)
    assert manifest["calibration"]["windows"] == 8 and manifest["calibration"]["seq_len"] == 16
    assert manifest["space"]["kv_heads"] == [2, 1] and manifest["bld"]["steps"] == 3
    assert weights_sha256(parent(1)) != manifest["parent_weights_sha256"]


def test_another_parent_is_refused_naming_store_difference_and_way_out(tmp_path, count_trainings):
    root = tmp_path / "bld"
    train_into(SublayerStore(root), parent(0))
    count_trainings.clear()
    with pytest.raises(StoreMismatchError) as e:
        train_into(SublayerStore(root), parent(1))
    message = str(e.value)
    assert str(root) in message and "parent weights" in message
    assert "--out" in message and "--fresh" in message
    assert count_trainings == []


def test_the_same_weights_under_another_config_are_refused(tmp_path, count_trainings):
    """config.json edits that change the parent's activations but no weight (RoPE theta, the norms' epsilon, a
    layer's window) make the stored sublayers stale: refused, naming the architecture. Its storage dtype or EOS
    ids change nothing computed: accepted, nothing trained again."""
    root = tmp_path / "bld"
    train_into(SublayerStore(root), parent(0))
    edits = [
        {"rope": replace(ARCH.rope, theta=1e6)},
        {"rms_norm_eps": 0.1},
        {"blocks": (replace(ARCH.blocks[0], attention=replace(ARCH.blocks[0].attention, window=4)), *ARCH.blocks[1:])},
    ]
    for edit in edits:
        model = parent(0)
        model.arch = replace(ARCH, **edit)
        count_trainings.clear()
        with pytest.raises(StoreMismatchError, match=r"parent architecture \(config.json"):
            train_into(SublayerStore(root), model)
        assert count_trainings == []
    model = parent(0)
    model.arch = replace(ARCH, dtype="bfloat16" if ARCH.dtype != "bfloat16" else "float16", eos_token_ids=(5,))
    train_into(SublayerStore(root), model)
    assert count_trainings == []


@pytest.mark.parametrize(
    "cfg, space, differs",
    [
        (BLDConfig(steps=4, batch_windows=2, eval_windows=2), SPACE, "bld.steps (3 stored, 4 now)"),
        (BLDConfig(steps=3, batch_windows=2, eval_windows=2, lr=3e-3), SPACE, "bld.lr (0.001 stored, 0.003 now)"),
        (CFG, SearchSpace(kv_heads=(2,), ffn_ratios=(1.0, 0.5), ffn_multiple=16), "space.kv_heads"),
    ],
)
def test_other_settings_are_refused(tmp_path, cfg, space, differs):
    root = tmp_path / "bld"
    train_into(SublayerStore(root), parent(0))
    with pytest.raises(StoreMismatchError, match=re.escape(differs)):
        train_into(SublayerStore(root), parent(0), cfg, space)


def test_other_calibration_text_is_refused(tmp_path):
    root = tmp_path / "bld"
    model = parent(0)
    train_into(SublayerStore(root), model)
    other = activations.record(model, WINDOWS.roll(1, dims=1), progress=False)
    with pytest.raises(StoreMismatchError, match="calibration tokens"):
        run_bld(model, other, SPACE, SublayerStore(root), CFG, progress=False)


def test_fresh_deletes_the_stale_store_and_trains_again(tmp_path, count_trainings):
    root = tmp_path / "bld"
    train_into(SublayerStore(root), parent(0))
    (root / "notes.txt").write_text("mine")  # not the store's: kept
    count_trainings.clear()
    model = parent(1)
    losses = train_into(SublayerStore(root, fresh=True), model)
    assert len(count_trainings) == N_TRAININGS
    assert json.loads((root / "manifest.json").read_text())["parent_weights_sha256"] == weights_sha256(model)
    assert sum(len(v) for v in losses.values()) == N_TRAININGS
    assert (root / "notes.txt").read_text() == "mine"


def test_store_without_manifest_is_refused(tmp_path):
    """A store written before stores recorded their inputs: what it came from is unknown."""
    root = tmp_path / "bld"
    train_into(SublayerStore(root), parent(0))
    (root / "manifest.json").unlink()
    with pytest.raises(StoreMismatchError, match=r"no manifest\.json"):
        train_into(SublayerStore(root), parent(0))


def test_truncated_block_is_retrained_with_a_warning_naming_it(tmp_path, count_trainings):
    root = tmp_path / "bld"
    model = parent(0)
    train_into(SublayerStore(root), model)
    victim = sorted(root.glob("layer_1/*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(StoreError, match=re.escape(str(victim))):
        SublayerStore(root).load(1, victim.stem)
    count_trainings.clear()
    store = SublayerStore(root)
    with pytest.warns(UserWarning, match=re.escape(str(victim)) + ".*training it again"):
        train_into(store, model)
    assert len(count_trainings) == 1
    assert store.load(1, victim.stem)  # whole again


def test_interrupted_save_leaves_nothing_half_written_and_resumes(tmp_path, monkeypatch, count_trainings):
    root = tmp_path / "bld"
    real_save = bld.save_file
    saved = []

    def dies_on_the_third(tensors, path):
        if len(saved) == 2:
            path.write_bytes(b"\x00" * 100)  # a partial write, then the process is interrupted
            raise KeyboardInterrupt
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(bld, "save_file", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        train_into(SublayerStore(root), parent(0))
    monkeypatch.setattr(bld, "save_file", real_save)
    assert len(list(root.glob("layer_*/*.safetensors"))) == 2
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]
    count_trainings.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged: a clean resume, no warning
        losses = train_into(SublayerStore(root), parent(0))
    assert len(count_trainings) == N_TRAININGS - 2
    assert sum(len(v) for v in losses.values()) == N_TRAININGS


def test_resumed_run_trains_exactly_what_an_uninterrupted_one_does(tmp_path):
    """Each training's batch order is seeded by its place among all trainings, not among those left to do."""
    model = parent(0)
    whole = SublayerStore(tmp_path / "whole")
    train_into(whole, model)
    resumed = SublayerStore(tmp_path / "resumed")
    train_into(resumed, model)
    last = trainings(ARCH, SPACE)[-1]
    (resumed.root / f"layer_{last[0]}" / f"{last[2].name}.safetensors").unlink()
    train_into(SublayerStore(resumed.root), model)
    for name, t in whole.load(last[0], last[2].name).items():
        assert torch.equal(t, resumed.load(last[0], last[2].name)[name]), name


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".md"  # beside it (same filesystem), same type
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
