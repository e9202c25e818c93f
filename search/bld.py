"""Blockwise local distillation (Puzzle §4.2): every child sublayer learns its parent layer's output alone.

Decoupled BLD: an attention variant trains inside a block whose FFN is the parent's (frozen), an FFN variant
inside a block whose attention is the parent's (frozen; so it simply reads the parent's cached mid-layer
state). (m + n)·L trainings instead of m·n·L, and any attention variant combines with any FFN variant.

Each block reads the parent's cached input activations and matches the parent's output under normalised
MSE, MSE(out_child, out_parent) / MSE(out_parent, in): the normaliser is the parent block's own contribution,
not the whole residual stream, so the loss reads as "fraction of the block's update still wrong" (1.0 for a
no-op) and is comparable across layers. No gradient crosses blocks, so trainings are independent: each one
is saved when it finishes and a rerun skips what is on disk (resumable).

Trained sublayers are kept in a `SublayerStore`: one safetensors file per (layer, variant) under the run's
directory, plus losses.json with the held-out normalised MSE before and after training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import DecoderLayer, Model
from tessera.search.activations import Activations, window_context
from tessera.search.init import ffn_channel_scores, init_layer
from tessera.search.library import SearchSpace
from tessera.search.train import TrainConfig, train

_PREFIX = {"attention": ("input_layernorm.", "self_attn."), "ffn": ("post_attention_layernorm.", "mlp.")}


@dataclass(frozen=True)
class BLDConfig:
    steps: int = 150
    batch_windows: int = 4  # windows of the cached activations per step
    lr: float = 1e-3  # Puzzle uses 1e-4 over ~1B tokens; a few hundred steps need a larger step
    eval_windows: int = 8  # held out from the cached windows for the before/after normalised MSE
    seed: int = 0


class SublayerStore:
    """Child sublayers by (layer, variant name): <root>/layer_<i>/<name>.safetensors + <root>/losses.json."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._losses_file = self.root / "losses.json"
        self.losses: dict[str, dict[str, dict]] = (
            json.loads(self._losses_file.read_text()) if self._losses_file.is_file() else {}
        )

    def _path(self, layer: int, name: str) -> Path:
        return self.root / f"layer_{layer}" / f"{name}.safetensors"

    def has(self, layer: int, name: str) -> bool:
        return self._path(layer, name).is_file()

    def save(self, layer: int, name: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        path = self._path(layer, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, path)
        self.losses.setdefault(f"layer_{layer}", {})[name] = record
        self._losses_file.write_text(json.dumps(self.losses, indent=1) + "\n")

    def load(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        path = self._path(layer, name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: layer {layer}'s {name} has not been trained (run BLD first)")
        return load_file(path)


def sublayer_state(layer: DecoderLayer, part: str) -> dict[str, torch.Tensor]:
    """The attention half (input norm + attention) or the FFN half (post-attention norm + FFN) of a layer."""
    return {k: v for k, v in layer.state_dict().items() if k.startswith(_PREFIX[part])}


def layer_from_parts(
    arch: ArchConfig, block: BlockConfig, layer_idx: int, parts: dict[str, torch.Tensor], like: torch.Tensor
) -> DecoderLayer:
    layer = DecoderLayer(arch, block, layer_idx).to(device=like.device, dtype=like.dtype)
    layer.load_state_dict(parts)
    return layer


def trainings(arch: ArchConfig, space: SearchSpace) -> list[tuple[int, str, AttentionConfig | FFNConfig]]:
    """Every (layer, part, variant) BLD trains: all but the parent's own sublayer and the no-ops."""
    todo: list[tuple[int, str, AttentionConfig | FFNConfig]] = []
    for i, parent in enumerate(arch.blocks):
        todo += [(i, "attention", a) for a in space.attention_variants(arch, i) if a not in (parent.attention,)]
        todo += [(i, "ffn", f) for f in space.ffn_variants(arch, i) if f not in (parent.ffn,)]
    return [t for t in todo if t[2].kind != "none"]


def _nmse(out: torch.Tensor, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / (target - base).pow(2).mean().clamp_min(1e-12)


class _BlockTask:
    """One child block against its parent layer on the cached activations."""

    def __init__(self, parent: Model, acts: Activations, layer_idx: int, part: str, variant, scores) -> None:
        arch, parent_block = parent.arch, parent.arch.blocks[layer_idx]
        self.part, self.i, self.acts = part, layer_idx, acts
        block = (
            BlockConfig(variant, parent_block.ffn)
            if part == "attention"
            else BlockConfig(AttentionConfig("none"), variant)
        )
        self.layer = init_layer(arch, parent.layers[layer_idx], block, layer_idx, scores).float()
        for name, p in self.layer.named_parameters():
            p.requires_grad_(name.startswith(_PREFIX[part]))  # the parent's other half stays frozen
        self.device = next(self.layer.parameters()).device
        self.parent = parent

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        n, t = len(idx), self.acts.seq_len
        source = self.acts.inputs[self.i] if self.part == "attention" else self.acts.mids[self.i]
        x = source[idx].reshape(n * t, -1).to(self.device)
        target = self.acts.inputs[self.i + 1][idx].reshape(n * t, -1).to(self.device)
        if self.part == "attention":
            batch, cos, sin = window_context(self.parent, n, t)
            out = self.layer(x, batch, cos, sin)
        else:
            out = self.layer.feed_forward(x)
        return _nmse(out, target, x)

    @torch.no_grad()
    def evaluate(self, idx: torch.Tensor) -> float:
        return sum(self.loss(idx[k : k + 4]).item() * len(idx[k : k + 4]) for k in range(0, len(idx), 4)) / len(idx)


def _batches(train_idx: np.ndarray, size: int, seed: int) -> Iterator[torch.Tensor]:
    rng = np.random.default_rng(seed)
    while True:
        yield torch.from_numpy(rng.choice(train_idx, size=size, replace=False))


def run_bld(
    parent: Model,
    acts: Activations,
    space: SearchSpace,
    store: SublayerStore,
    cfg: BLDConfig = BLDConfig(),
    progress: bool = True,
) -> dict[str, dict[str, dict]]:
    """Train every child sublayer the search space needs (skipping those already in the store); returns the
    store's losses: layer -> variant -> {nmse_init, nmse_final, steps}."""
    if acts.n_windows <= cfg.eval_windows + cfg.batch_windows:
        raise ValueError(
            f"BLD needs more than {cfg.eval_windows + cfg.batch_windows} cached windows, got {acts.n_windows}"
        )
    eval_idx = torch.arange(acts.n_windows - cfg.eval_windows, acts.n_windows)
    train_idx = np.arange(acts.n_windows - cfg.eval_windows)
    todo = [t for t in trainings(parent.arch, space) if not store.has(t[0], t[2].name)]
    scores: dict[int, torch.Tensor] = {}
    bar = tqdm(todo, desc="BLD", disable=not progress, dynamic_ncols=True)
    for k, (i, part, variant) in enumerate(bar):
        bar.set_postfix_str(f"layer {i} {variant.name}")
        if part == "ffn" and variant.kind == "swiglu" and i not in scores:
            mids = acts.mids[i][train_idx].reshape(-1, acts.inputs[0].shape[-1])
            scores[i] = ffn_channel_scores(parent.layers[i], mids.to(next(parent.parameters()).device))
        task = _BlockTask(parent, acts, i, part, variant, scores.get(i))
        before = task.evaluate(eval_idx)
        history = train(
            task.layer.named_parameters(),
            task.loss,
            _batches(train_idx, cfg.batch_windows, cfg.seed + k),
            TrainConfig(steps=cfg.steps, lr=cfg.lr),
            desc=f"BLD layer {i} {variant.name}",
            progress=False,
        )
        after = task.evaluate(eval_idx)
        record = {"part": part, "nmse_init": before, "nmse_final": after, "steps": cfg.steps, **asdict(cfg)}
        record["train_loss_last"] = history[-1]["loss"]
        store.save(i, variant.name, sublayer_state(task.layer, part), record)
        bar.set_postfix_str(f"layer {i} {variant.name}: nmse {before:.3f} -> {after:.3f}")
    return store.losses
