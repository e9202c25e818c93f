"""Blockwise local distillation (Puzzle §4.2): every child sublayer learns its parent layer's output alone.

Decoupled BLD: an attention variant trains inside a block whose FFN is the parent's (frozen), an FFN variant
inside a block whose attention is the parent's (frozen; so it simply reads the parent's cached mid-layer
state). (m + n)·L trainings instead of m·n·L, and any attention variant combines with any FFN variant.

Each block reads the parent's cached input activations and matches the parent's output under normalised
MSE, MSE(out_child, out_parent) / MSE(out_parent, in): the normaliser is the parent block's own contribution,
not the whole residual stream, so the loss reads as "fraction of the block's update still wrong" (1.0 for a
no-op) and is comparable across layers. No gradient crosses blocks, so trainings are independent: each one
is saved when it finishes and a rerun skips what is on disk (resumable). Each training's batches are seeded
by its place among all the trainings, so a resumed run trains exactly what an uninterrupted one would.

Trained sublayers are kept in a `SublayerStore`: one safetensors file per (layer, variant) under the run's
directory, losses.json with the held-out normalised MSE before and after training, and manifest.json with
what the store was computed from (`bld_manifest`): a rerun with another parent, calibration text, search space
or BLD settings is refused rather than mixed in, unless it asks to start fresh. Every file is written under a
temporary name and renamed (`atomic_path`); a block file that still fails to read is trained again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.errors import UserError
from tessera.files import atomic_path, atomic_write_text, default_mode
from tessera.runtime.model import DecoderLayer, Model
from tessera.runtime.weights import ATTENTION, FFN
from tessera.search.activations import Activations, window_context
from tessera.search.init import ffn_channel_scores, init_layer
from tessera.search.library import SearchSpace
from tessera.search.ranks import ONE, Ranks
from tessera.search.train import TrainConfig, train

# The modules of each half of a layer (its norm and its sublayer), from the weight table.
_PREFIX = {
    part: tuple(sorted({w.param.split(".")[0] + "." for weights in table.values() for w in weights}))
    for part, table in (("attention", ATTENTION), ("ffn", FFN))
}


@dataclass(frozen=True)
class BLDConfig:
    steps: int = 150
    batch_windows: int = 4  # windows of the cached activations per step
    lr: float = 1e-3  # Puzzle uses 1e-4 over ~1B tokens; a few hundred steps need a larger step
    eval_windows: int = 8  # held out from the cached windows for the before/after normalised MSE
    seed: int = 0


MANIFEST_FORMAT = 2  # 2: the parent's config hash
_HASHES = {
    "parent_weights_sha256": "parent weights",
    "parent_config_sha256": "parent architecture (config.json: RoPE, norm epsilon, windows, ...)",
    "calibration.tokens_sha256": "calibration tokens",
}


class StoreError(UserError):
    """A BLD store that cannot be used as it is; the message names the store or file and the way out."""


class StoreMismatchError(StoreError):
    """A BLD store computed from other inputs than this run's: the message names the store, what differs, and
    the ways out (another output directory, or a fresh start that deletes it)."""


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the model as loaded (name, dtype, shape, bytes, in name order): what BLD
    learns from, so the same weights saved in another file layout or format hash the same. One pass over the
    weights (the 32 MiB demo parent: 0.03 s on the 2-core dev VM), once per `optimize` run."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def config_sha256(arch: ArchConfig) -> str:
    """SHA-256 of what in a parent's architecture shapes its activations beside its weights: RoPE, the norms'
    epsilon, each layer's block and window, the family. Not its storage dtype, token ids or quantization format
    (the weights' hash sees the values loaded)."""
    computed = replace(
        arch, dtype="float32", bos_token_id=None, eos_token_ids=(), quantization=None, kv_cache_scales=False
    )
    return hashlib.sha256(json.dumps(asdict(computed), sort_keys=True).encode()).hexdigest()


def bld_manifest(parent: Model, tokens: torch.Tensor, space: SearchSpace, cfg: BLDConfig) -> dict:
    """Everything a stored sublayer depends on: the parent's weights and the rest of its architecture (config.json
    edits that change its activations: RoPE, norm epsilon, windows), the calibration windows [n, T + 1] whose
    activations it learns from, the search space (it fixes the list of trainings, whose order seeds each
    one's batches) and the BLD settings. JSON-normalised (tuples as lists), as it reads back from disk."""
    tokens = tokens.detach().to(torch.int64).contiguous().cpu()
    manifest = {
        "format": MANIFEST_FORMAT,
        "parent_weights_sha256": weights_sha256(parent),
        "parent_config_sha256": config_sha256(parent.arch),
        "calibration": {
            "windows": tokens.shape[0],
            "seq_len": tokens.shape[1] - 1,
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        },
        "space": asdict(space),
        "bld": asdict(cfg),
    }
    return json.loads(json.dumps(manifest))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _differences(stored: dict, now: dict) -> list[str]:
    a, b = _flat(stored), _flat(now)
    diffs = []
    for key in sorted(a.keys() | b.keys(), key=lambda k: (k not in _HASHES, k)):
        if a.get(key) == b.get(key):
            continue
        if key in _HASHES:
            diffs.append(f"{_HASHES[key]} (sha256 {str(a.get(key))[:12]}… stored, {str(b.get(key))[:12]}… now)")
        else:
            diffs.append(f"{key} ({a.get(key)!r} stored, {b.get(key)!r} now)")
    return diffs


class SublayerStore:
    """Child sublayers by (layer, variant name): <root>/layer_<i>/<name>.safetensors with its record beside it
    (<name>.json), <root>/losses.json (every record, the index), and <root>/manifest.json (what they were
    computed from: `bld_manifest`). Ranks of a sharded search each write their blocks and records; the index is
    rewritten by one of them (`merge`), so a rank that died leaves blocks that count as trained on a restart.

    `run_bld` claims the store for its inputs: an empty store takes the manifest, a store with another (or
    none, beside results) raises StoreMismatchError. With fresh=True the first claim deletes the store's own
    files (the manifest, losses.json, layer_*/) and starts over; nothing else under root is touched."""

    def __init__(self, root: str | Path, fresh: bool = False) -> None:
        self.root = Path(root)
        self.fresh = fresh
        self._manifest_file = self.root / "manifest.json"
        self._losses_file = self.root / "losses.json"
        self.losses: dict[str, dict[str, dict]] = {} if fresh else self._read_losses()

    def _read_losses(self) -> dict[str, dict[str, dict]]:
        losses: dict[str, dict[str, dict]] = {}
        if self._losses_file.is_file():
            try:
                losses = json.loads(self._losses_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                warnings.warn(f"{self._losses_file}: unreadable ({e}); its sublayers are trained again", stacklevel=3)
        for record_file in self.root.glob("layer_*/*.json"):  # records the index may not have yet
            try:
                record = json.loads(record_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue  # a record cut short: its block is trained again (`damage`)
            losses.setdefault(record_file.parent.name, {})[record_file.stem] = record
        return losses

    def merge(self, write: bool = True) -> dict[str, dict[str, dict]]:
        """Read every block's record again (other ranks wrote theirs), and rewrite the index when `write`."""
        self.losses = self._read_losses()
        if write:
            atomic_write_text(self._losses_file, json.dumps(self.losses, indent=1) + "\n")
        return self.losses

    def _has_results(self) -> bool:
        return self._losses_file.exists() or any(self.root.glob("layer_*/*.safetensors"))

    def check(self, manifest: dict) -> None:
        """Raise StoreMismatchError unless the store is empty, fresh, or was computed from `manifest`; writes
        nothing (the pipeline checks before its cost model, and claims only once the budget is known to fit)."""
        if self.fresh or not self.root.exists():
            return
        way_out = (
            "use another output directory (--out), or start fresh (--fresh; fresh=True in the Python API) to "
            "delete them and train again"
        )
        if not self._manifest_file.is_file():
            if self._has_results():
                raise StoreMismatchError(
                    f"{self.root}: BLD results with no manifest.json (written before tessera recorded what a store "
                    f"was computed from), so which parent and settings they came from is unknown; {way_out}"
                )
            return
        try:
            stored = json.loads(self._manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreMismatchError(f"{self._manifest_file}: unreadable ({e}); {way_out}") from e
        diffs = _differences(stored, manifest)
        if diffs:
            raise StoreMismatchError(
                f"{self.root}: the BLD results here were computed from other inputs than this run's: "
                f"{'; '.join(diffs)}; {way_out}"
            )

    def claim(self, manifest: dict) -> None:
        """Make the store this manifest's: start over first when fresh, refuse another run's results."""
        if self.fresh:
            self._delete_contents()
            self.fresh = False
        self.check(manifest)
        if not self._manifest_file.is_file():
            atomic_write_text(self._manifest_file, json.dumps(manifest, indent=1) + "\n")

    def _delete_contents(self) -> None:
        if not self.root.exists():
            return
        for path in [self._manifest_file, self._losses_file, *self.root.glob(".*.tmp*")]:
            path.unlink(missing_ok=True)
        for layer_dir in self.root.glob("layer_*"):
            if layer_dir.is_dir():
                shutil.rmtree(layer_dir)
        self.losses = {}

    def path(self, layer: int, name: str) -> Path:
        return self.root / f"layer_{layer}" / f"{name}.safetensors"

    def damage(self, layer: int, name: str) -> str | None:
        """Why a block file on disk cannot count as trained (it does not read, or its loss record is missing);
        None when it is intact or simply absent."""
        path = self.path(layer, name)
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt"):  # parses the header and checks it covers the file: no tensor is read
                pass
        except (SafetensorError, OSError) as e:
            return f"unreadable ({e})"
        if name not in self.losses.get(f"layer_{layer}", {}):
            return "no record in losses.json beside it"
        return None

    def save(self, layer: int, name: str, tensors: dict[str, torch.Tensor], record: dict, index: bool = True) -> None:
        """The block, then its record beside it, then (`index`: one process, or rank 0 at the end) the index."""
        with atomic_path(self.path(layer, name)) as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp)
            default_mode(tmp)
        atomic_write_text(self.path(layer, name).with_suffix(".json"), json.dumps(record, indent=1) + "\n")
        self.losses.setdefault(f"layer_{layer}", {})[name] = record
        if index:
            atomic_write_text(self._losses_file, json.dumps(self.losses, indent=1) + "\n")

    def load(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        path = self.path(layer, name)
        if not path.is_file():
            raise StoreError(f"{path}: layer {layer}'s {name} has not been trained (run BLD first)")
        try:
            return load_file(path)
        except SafetensorError as e:
            raise StoreError(
                f"{path}: unreadable ({e}); run BLD into the same store again (`tessera optimize` with the same "
                "--out) to train it again"
            ) from e


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
    manifest: dict | None = None,
    ranks: Ranks = ONE,
) -> dict[str, dict[str, dict]]:
    """Train every child sublayer the search space needs (skipping those already in the store, which must have
    been computed from these same inputs: see `SublayerStore`); returns the store's losses: layer -> variant ->
    {nmse_init, nmse_final, steps}. `manifest`: bld_manifest of these inputs when the caller has it already
    (hashing the parent's weights is a pass over all of them). `ranks`: each trains its share of what is left
    (search/ranks.py), a block with the seed it has in one process; all return the same losses."""
    if acts.n_windows <= cfg.eval_windows + cfg.batch_windows:
        raise UserError(
            f"BLD needs more than {cfg.eval_windows + cfg.batch_windows} cached windows, got {acts.n_windows}"
        )
    manifest = manifest or bld_manifest(parent, acts.tokens, space, cfg)
    if ranks.main:
        store.claim(manifest)  # a fresh store is emptied here, once, before any rank looks at it
    ranks.barrier()
    if not ranks.main:
        store.fresh = False
        store.merge(write=False)
        store.check(manifest)
    eval_idx = torch.arange(acts.n_windows - cfg.eval_windows, acts.n_windows)
    train_idx = np.arange(acts.n_windows - cfg.eval_windows)
    todo = []
    for k, (i, part, variant) in enumerate(trainings(parent.arch, space)):
        path, damage = store.path(i, variant.name), store.damage(i, variant.name)
        if path.is_file() and damage is None:
            continue  # trained already
        if damage is not None:
            warnings.warn(f"{path}: {damage}; training it again", stacklevel=2)
        todo.append((k, i, part, variant))
    ranks.barrier()  # every rank has listed what is left before any writes
    scores: dict[int, torch.Tensor] = {}
    bar = tqdm(ranks.share(todo), desc="BLD", disable=not progress, dynamic_ncols=True)
    for k, i, part, variant in bar:
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
        store.save(i, variant.name, sublayer_state(task.layer, part), record, index=ranks.size == 1)
        bar.set_postfix_str(f"layer {i} {variant.name}: nmse {before:.3f} -> {after:.3f}")
    if ranks.size > 1:
        ranks.barrier()  # every share trained: the index takes every rank's records
        store.merge(write=ranks.main)
        ranks.barrier()
    return store.losses
