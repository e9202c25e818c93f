"""FFN Fusion (arXiv 2503.18908): runs of attention-free FFN layers become one wide parallel FFN.

Once Puzzle has removed attention from consecutive layers, what remains there is a chain of FFNs,
`x + f1(x) + f2(x + f1(x)) + …`, one after another. Fusion replaces it with the parallel form
`x + Σ f_i(norm_i(x))`. That step is the approximation; what follows from it is exact: parallel SwiGLUs
reading the same x are one SwiGLU whose gate and up rows are the branches' rows stacked and whose down
columns are the branches' columns side by side, with each branch's RMSNorm weight folded into its own gate
and up columns so a single (unit) norm remains. The fused model keeps every layer index, in the layout of
the released Ultra-253B: the group's other layers become empty layers and its last holds the wide FFN.

Steps, each a function here:
1. `dependency_matrix`: M[i, j] = mean cosine distance between layer j's contribution with and without
   layer i upstream (i < j). Over attention-free FFN layers it says which FFNs can run side by side; over
   all layers (whole attention+FFN blocks) it shows the paper's other observation, that some full blocks
   barely depend on their neighbour.
2. `choose_groups`: by default every attention-free run except its last FFN (the paper: fusing the last
   costs the most), or a dependency threshold, or explicit spans (`42-50,53-69`).
3. `fuse`: the transform; `parallel_forward` is the exact parallel form it must equal.
4. `heal` (GKD of the fused model against the unfused one) and `run_fusion`, the whole `tessera fuse`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tessera.config import EMPTY_BLOCK, ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.devices import device_name, dtype_name, serving_dtype
from tessera.errors import UserError
from tessera.files import replaced_folder
from tessera.runtime.loader import save_model
from tessera.runtime.model import Batch, Model
from tessera.runtime.weights import FFN, HIDDEN, INTER, pack, unpack
from tessera.search.cost import Scenario, lockstep
from tessera.search.gkd import GKDConfig, distill
from tessera.search.report import fusion_section, plot_dependency
from tessera.search.scoring import model_quality, reference_logprobs
from tessera.search.train import fixed_windows

EMPTY = EMPTY_BLOCK  # what fusion leaves in a fused group's other layers
BLOCK_PAIR_THRESHOLD = 0.05  # on the demo parent, the one pair under it loses KL 0.009 run side by side
LATENCY_ROUNDS = 5  # lockstep rounds of the fused model against the unfused
# The heat-maps `run_fusion` draws (when there is a matrix to draw), and all it writes beside the checkpoint.
DEPENDENCY_PLOTS = {
    "ffn_dependency": "FFN dependency (attention-free layers)",
    "block_dependency": "whole-block dependency",
}
FUSION_OUTPUTS = frozenset({"fusion.json", "fusion.md", *(f"{key}.png" for key in DEPENDENCY_PLOTS)})
SWIGLU = FFN["swiglu"]


class FusionError(UserError):
    """Groups that cannot be fused, named with the offending layer and what was expected."""


@dataclass(frozen=True)
class FusionGroup:
    layers: tuple[int, ...]  # the SwiGLU FFN layers fused, in order
    score: float = math.nan  # the largest dependency M[i, j] between two members (nan when unmeasured)

    @property
    def span(self) -> tuple[int, int]:
        """first..last layer: all but `last` become empty, `last` holds the wide FFN."""
        return self.layers[0], self.layers[-1]


@dataclass
class Dependency:
    """M[a, b] for layers[a] removed and layers[b] measured (a < b); NaN elsewhere."""

    layers: list[int]
    matrix: np.ndarray
    unit: str  # "ffn" (attention-free FFN layers) or "block" (whole layers)

    def get(self, i: int, j: int) -> float:
        return float(self.matrix[self.layers.index(i), self.layers.index(j)])

    def to_json(self) -> dict:
        rows = [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in self.matrix]
        return {"unit": self.unit, "layers": self.layers, "matrix": rows}


def _is_ffn_only(block: BlockConfig) -> bool:
    return block.attention.kind == "none" and block.ffn.kind == "swiglu"


def ffn_runs(arch: ArchConfig) -> list[list[int]]:
    """Maximal runs of attention-free SwiGLU layers, empty layers allowed between them (they add nothing);
    any attention, linear sublayer or FFN-less attention layer ends a run."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i, block in enumerate(arch.blocks):
        if _is_ffn_only(block):
            current.append(i)
        elif not block.is_empty:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _context(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, Batch, torch.Tensor, torch.Tensor]:
    b, t = tokens.shape
    batch = Batch.sequences([t] * b, tokens.device)
    cos, sin = model.rope_tables(batch.positions)
    return model.embed_tokens(tokens.reshape(-1)), batch, cos, sin


@torch.no_grad()
def dependency_matrix(
    model: Model, windows: torch.Tensor, layers: Sequence[int], unit: str = "ffn", chunk: int = 4, progress: bool = True
) -> Dependency:
    """M[i, j] over `layers` on text windows [n, T(+1)]: the mean over tokens of 1 − cos(c_j, c_j^(−i)), where
    c_j is layer j's contribution (its output minus its input) in the model as it is and c_j^(−i) the same
    with layer i skipped. 0 means layer j does not notice layer i; 1 means its contribution turned orthogonal."""
    layers = sorted(layers)
    n_layers = len(layers)
    total = np.zeros((n_layers, n_layers))
    count = 0
    device = model.embed_tokens.weight.device
    tokens_all = windows[:, :-1] if windows.shape[1] > 1 else windows
    starts = range(0, tokens_all.shape[0], chunk)
    for start in tqdm(starts, desc=f"{unit} dependency", disable=not progress, leave=False):
        tokens = tokens_all[start : start + chunk].to(device)
        h, batch, cos, sin = _context(model, tokens)
        inputs, contrib = [], {}
        for i, layer in enumerate(model.layers):
            inputs.append(h)
            out = layer(h, batch, cos, sin)
            if i in layers:
                contrib[i] = out - h
            h = out
        for a, i in enumerate(layers[:-1]):
            h = inputs[i]  # layer i skipped: layer i + 1 reads what layer i read
            for k in range(i + 1, layers[-1] + 1):
                out = model.layers[k](h, batch, cos, sin)
                if k in contrib:
                    b = layers.index(k)
                    total[a, b] += (1 - F.cosine_similarity(out - h, contrib[k], dim=-1)).sum().item()
                h = out
        count += tokens.numel()
    matrix = total / count
    matrix[np.tril_indices(n_layers)] = np.nan
    return Dependency(layers, matrix, unit)


def parse_groups(text: str) -> list[tuple[int, int]]:
    """ "42-50,53-69" -> [(42, 50), (53, 69)] (inclusive layer spans)."""
    spans = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if not m or int(m[1]) >= int(m[2]):
            raise FusionError(f"--groups {text!r}: expected spans FIRST-LAST with FIRST < LAST, like 42-50,53-69")
        spans.append((int(m[1]), int(m[2])))
    return spans


def _score(dep: Dependency | None, members: Sequence[int]) -> float:
    if dep is None or not all(m in dep.layers for m in members):
        return math.nan
    return max(dep.get(i, j) for a, i in enumerate(members) for j in members[a + 1 :])


def choose_groups(
    arch: ArchConfig,
    dep: Dependency | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    threshold: float | None = None,
) -> list[FusionGroup]:
    """The groups to fuse, each with its score (its largest pairwise dependency).

    spans: explicit inclusive layer spans; every layer in one must be attention-free (an FFN or empty), with
    at least two FFNs. threshold: within each attention-free run, grow a group while the next FFN's largest
    dependency on the group's members stays <= threshold. Neither: each run of three or more FFNs minus its
    last FFN (the paper's rule).
    """
    if spans is not None and threshold is not None:
        raise FusionError("give explicit groups or a threshold, not both")
    groups: list[FusionGroup] = []
    if spans is not None:
        taken: set[int] = set()
        for first, last in spans:
            if last >= arch.n_layers:
                raise FusionError(f"group {first}-{last}: the model has layers 0..{arch.n_layers - 1}")
            members = []
            for i in range(first, last + 1):
                block = arch.blocks[i]
                if i in taken:
                    raise FusionError(f"group {first}-{last}: layer {i} is already in another group")
                if _is_ffn_only(block):
                    members.append(i)
                elif not block.is_empty:
                    raise FusionError(
                        f"group {first}-{last}: layer {i} is {block.name}; a fused group holds only attention-free "
                        "SwiGLU layers (and empty ones)"
                    )
                taken.add(i)
            if len(members) < 2 or members[-1] != last:
                raise FusionError(
                    f"group {first}-{last}: needs at least two SwiGLU FFNs and one at its last layer, found {members}"
                )
            groups.append(FusionGroup(tuple(members), _score(dep, members)))
        return sorted(groups, key=lambda g: g.layers)
    for run in ffn_runs(arch):
        if threshold is None:
            if len(run) >= 3:
                groups.append(FusionGroup(tuple(run[:-1]), _score(dep, run[:-1])))
            continue
        if len(run) < 2:  # one FFN: nothing to group, whatever the threshold
            continue
        if dep is None:
            raise FusionError("a dependency threshold needs the dependency matrix")
        current = [run[0]]
        for j in run[1:]:
            if max(dep.get(i, j) for i in current) <= threshold:
                current.append(j)
                continue
            if len(current) >= 2:
                groups.append(FusionGroup(tuple(current), _score(dep, current)))
            current = [j]
        if len(current) >= 2:
            groups.append(FusionGroup(tuple(current), _score(dep, current)))
    return groups


def fused_arch(arch: ArchConfig, groups: Sequence[FusionGroup]) -> ArchConfig:
    """The architecture after fusion: per group, empty layers then one attention-free SwiGLU as wide as the
    branches together. Spans recorded earlier are kept (or absorbed by a new group that contains them)."""
    blocks = list(arch.blocks)
    spans = list(arch.fused_ffn_spans())
    for g in groups:
        first, last = g.span
        width = sum(blocks[i].ffn.intermediate_size for i in g.layers)
        blocks[first:last] = [EMPTY] * (last - first)
        blocks[last] = BlockConfig(AttentionConfig("none"), FFNConfig("swiglu", width))
        inner = [s for s in spans if first <= s[1] <= last]
        spans = [s for s in spans if s not in inner] + [(min([first] + [s[0] for s in inner]), last)]
    # Fusion touches attention-free layers only: calibrated FP8 KV-cache scales still describe every attention.
    return replace(arch.with_blocks(blocks), fusion_spans=tuple(sorted(spans)), kv_cache_scales=arch.kv_cache_scales)


def fused_ffn_weights(branches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The branches' SwiGLU weights by role (runtime/weights.py: norm [H], gate and up [I_i, H], down
    [H, I_i]) -> one SwiGLU's: each matrix the branches' side by side along its FFN-width axis, each branch's
    norm weight folded (in float32, returned in the weights' dtype) into the matrices that read the normed
    input, and a unit norm left."""
    fused = {}
    for w in SWIGLU:
        if w.role == "norm":  # folded into the branches below
            fused[w.role] = torch.ones_like(branches[0][w.role])
            continue
        parts = [b[w.role] for b in branches]
        if w.axes[-1] == HIDDEN:  # reads norm(x) = x̂ · weight: scale its input columns by the weight instead
            parts = [(t.float() * b["norm"].float()[None, :]).to(t.dtype) for t, b in zip(parts, branches)]
        fused[w.role] = torch.cat(parts, dim=w.axes.index(INTER))
    return fused


@torch.no_grad()
def fuse(model: Model, groups: Sequence[FusionGroup]) -> Model:
    """A new model with each group fused (the input model is left as it is)."""
    if model.arch.quantization is not None:  # norms fold into the gate/up columns: E4M3 codes cannot take that
        raise FusionError(f"the model's weights are {model.arch.quantization}: fuse the unquantized model")
    arch = fused_arch(model.arch, groups)
    param = model.embed_tokens.weight
    fused = Model.empty(arch, param.device, param.dtype)
    replaced = tuple(f"layers.{i}." for g in groups for i in range(g.span[0], g.span[1] + 1))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for g in groups:
        branches = [unpack(SWIGLU, dict(model.layers[i].named_parameters()), model.arch) for i in g.layers]
        packed = pack(SWIGLU, fused_ffn_weights(branches))
        state.update((f"layers.{g.span[1]}.{name}", t) for name, t in packed.items())
    fused.load_state_dict(state, strict=True)
    return fused.eval()


def parallel_forward(model: Model, tokens: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits [B, T, V] of tokens [B, T] with each group's layers reading the same input and their
    contributions summed: h + Σ_i (layer_i(h) − h). For FFN groups this is x + Σ f_i(norm_i(x)), the form a
    fused layer must equal; for whole blocks, the parallel blocks of the paper's last observation."""
    starts = {g[0]: g for g in groups}
    skip = {i for g in groups for i in g[1:]}
    h, batch, cos, sin = _context(model, tokens)
    for i, layer in enumerate(model.layers):
        if i in skip:
            continue
        if i in starts:
            h = h + sum(model.layers[k](h, batch, cos, sin) - h for k in starts[i])
        else:
            h = layer(h, batch, cos, sin)
    b, t = tokens.shape
    return model.logits(model.norm(h)).view(b, t, -1)


def aligned_layers(arch: ArchConfig) -> list[int]:
    """Layers whose output a fused model still has: all but the interiors of its fusion spans."""
    inside = {i for first, last in arch.fused_ffn_spans() for i in range(first, last)}
    return [i for i in range(arch.n_layers) if i not in inside]


@dataclass(frozen=True)
class FusionConfig:
    spans: tuple[tuple[int, int], ...] | None = None  # explicit groups
    threshold: float | None = None  # dependency threshold for growing groups
    heal_steps: int = 100  # GKD steps against the unfused model (0: no healing)
    heal_lr: float = 3e-4
    calibration_windows: int = 8  # training-split windows for the dependency matrices
    seq_len: int = 256
    block_threshold: float = BLOCK_PAIR_THRESHOLD  # whole-block pairs at or under this dependency qualify
    seed: int = 0


@dataclass
class FusionResult:
    groups: list[FusionGroup]
    ffn_dependency: Dependency | None
    block_dependency: Dependency | None = None
    block_pairs: list[dict] = field(default_factory=list)
    depth_before: int = 0
    depth_after: int = 0
    quality: dict = field(default_factory=dict)  # "unfused", "fused", "healed" -> model_quality

    def to_json(self) -> dict:
        return {
            "groups": [
                {"layers": list(g.layers), "span": list(g.span), "score": None if math.isnan(g.score) else g.score}
                for g in self.groups
            ],
            "sequential_depth": {"before": self.depth_before, "after": self.depth_after},
            "quality": self.quality,
            "block_pairs": self.block_pairs,
            "ffn_dependency": self.ffn_dependency.to_json() if self.ffn_dependency else None,
            "block_dependency": self.block_dependency.to_json() if self.block_dependency else None,
        }


def block_pairs(
    model: Model, dep: Dependency, eval_windows: torch.Tensor, ref: torch.Tensor, threshold: float
) -> list[dict]:
    """Each two consecutive non-empty layers: their whole-block dependency, and the held-out KL from the model
    when the two run side by side (both reading the first one's input). A pair qualifies for running in
    parallel when its dependency is at most `threshold`."""
    rows = []
    for i, j in zip(dep.layers, dep.layers[1:]):
        side_by_side = model_quality(
            model, eval_windows, ref, forward=lambda tokens, i=i, j=j: parallel_forward(model, tokens, [(i, j)])
        )
        score = dep.get(i, j)
        rows.append(
            {
                "layers": [i, j],
                "dependency": score,
                "parallel_kl": side_by_side["kl_div"],
                "qualifies": score <= threshold,
            }
        )
    return rows


def heal(fused: Model, unfused: Model, train_tokens: np.ndarray, cfg: GKDConfig, progress: bool = True) -> None:
    """GKD of the fused model against the unfused one (the search's GKD), aligning the layers both have."""
    for p in unfused.parameters():
        p.requires_grad_(False)
    distill(fused, unfused, train_tokens, cfg, progress=progress, aligned_layers=aligned_layers(fused.arch))


def analyse_and_fuse(
    model: Model,
    train_tokens: np.ndarray | None,
    eval_windows: torch.Tensor | None,
    cfg: FusionConfig = FusionConfig(),
    progress: bool = True,
) -> tuple[Model | None, FusionResult]:
    """Dependency matrices, group choice, fusion and healing, with held-out quality at each step. Returns the
    fused model (None when there is nothing to fuse) and what was measured; `model` is left as it is.

    Without text (`train_tokens` None) it is the pure transform: explicit groups (cfg.spans), no healing,
    nothing scored. Text is needed only to choose groups, to score and to heal."""
    arch = model.arch
    if train_tokens is not None and cfg.seq_len > arch.max_position_embeddings:
        raise FusionError(
            f"seq_len {cfg.seq_len}: longer than the model's context ({arch.max_position_embeddings} tokens)"
        )
    if train_tokens is None:
        if cfg.spans is None or cfg.heal_steps > 0:
            raise FusionError("fusing without text needs explicit groups and no healing (heal_steps 0)")
        result = FusionResult(choose_groups(arch, None, cfg.spans, None), None)
        result.depth_before = arch.sequential_depth()
        fused = fuse(model, result.groups)
        result.depth_after = fused.arch.sequential_depth()
        return fused, result
    calib = fixed_windows(train_tokens, cfg.seq_len, cfg.calibration_windows)
    ffn_layers = [i for run in ffn_runs(arch) for i in run]
    ffn_dep = dependency_matrix(model, calib, ffn_layers, "ffn", progress=progress) if len(ffn_layers) > 1 else None
    result = FusionResult(choose_groups(arch, ffn_dep, cfg.spans, cfg.threshold), ffn_dep)
    result.depth_before = result.depth_after = arch.sequential_depth()
    ref = reference_logprobs(model, eval_windows)
    result.quality["unfused"] = model_quality(model, eval_windows, ref)

    blocks = [i for i, b in enumerate(arch.blocks) if not b.is_empty]
    if len(blocks) > 1:
        result.block_dependency = dependency_matrix(model, calib, blocks, "block", progress=progress)
        result.block_pairs = block_pairs(model, result.block_dependency, eval_windows, ref, cfg.block_threshold)
    if not result.groups:
        return None, result
    fused = fuse(model, result.groups)
    result.depth_after = fused.arch.sequential_depth()
    result.quality["fused"] = model_quality(fused, eval_windows, ref)
    if cfg.heal_steps > 0:
        gkd = GKDConfig(steps=cfg.heal_steps, lr=cfg.heal_lr, seq_len=cfg.seq_len, seed=cfg.seed)
        heal(fused, model, train_tokens, gkd, progress)
        if fused.arch.kv_cache_scales:  # healing moved the keys and values the FP8 KV-cache scales describe
            fused.calibrate_kv_scales(calib)
        result.quality["healed"] = model_quality(fused, eval_windows, ref)
    return fused, result


def run_fusion(
    model: Model,
    train_tokens: np.ndarray | None,
    eval_windows: torch.Tensor | None,
    out: Path,
    cfg: FusionConfig = FusionConfig(),
    scenario: Scenario | None = None,
    tokenizer_from: Path | None = None,
    progress: bool = True,
    timing_dtype: str | None = None,
    keep_checkpoint: bool = False,
) -> dict:
    """Analyse, fuse and heal `model`; time fused against unfused on this device, in `timing_dtype` (None: the
    serving precision, devices.serving_dtype); save the fused model (bf16,
    nemotron-nas in the Ultra-253B layout) to `out` with fusion.json, fusion.md and the heat-maps. Without text
    (None) it fuses explicit groups only (analyse_and_fuse). `out` is replaced whole once everything is written
    (files.replaced_folder): nothing of an earlier output lingers, and an interrupted run leaves it as it was. When
    nothing fuses and `keep_checkpoint` (`tessera fuse`), a checkpoint in `out` (an earlier fused model) is kept
    (info["kept"]) rather than replaced by an analysis without one."""
    out, scenario = Path(out), scenario or Scenario()
    fused, result = analyse_and_fuse(model, train_tokens, eval_windows, cfg, progress)
    device = model.embed_tokens.weight.device
    info = {"device": device_name(device), "scenario": asdict(scenario), "block_threshold": cfg.block_threshold}
    info["eval_windows"] = None if eval_windows is None else len(eval_windows)  # of seq_len tokens, held out
    info |= result.to_json()
    if fused is None:
        how = (
            f"in them no FFN's dependency on the one before it is at most the threshold {cfg.threshold}"
            if cfg.threshold is not None
            else "the default fuses runs of 3 or more FFNs (all but the last); pass explicit groups or a threshold"
        )
        info["reason"] = f"the attention-free FFN runs are {ffn_runs(model.arch) or 'none'}; {how}"
        if keep_checkpoint and (out / "config.json").is_file():  # an earlier fused model stays; the analysis: returned
            info["kept"] = str(out)
            return info
    else:
        # A group over a span fused before (an empty layer first) extends that span: report the span the checkpoint
        # records (fused_arch merges them), not the group's first FFN.
        first_of = {last: first for first, last in fused.arch.fused_ffn_spans()}
        for g in info["groups"]:
            g["span"][0] = first_of.get(g["span"][1], g["span"][0])
        # In lockstep, like the search's latency phase (search/cost.py): both meet the machine's speed alike.
        dtype = serving_dtype(device, timing_dtype)
        timings = lockstep([model.cast(dtype), fused.cast(dtype)], scenario, LATENCY_ROUNDS)
        info["latency_rounds"], info["timing_dtype"] = LATENCY_ROUNDS, dtype_name(dtype)
        info["latency"] = {
            name: {"latency_ms": t.latency_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms}
            for name, t in zip(("unfused", "fused"), timings)
        }
    with replaced_folder(out) as work:
        if fused is not None:
            save_model(fused, work, dtype=torch.bfloat16, tokenizer_from=tokenizer_from)
        for key, title in DEPENDENCY_PLOTS.items():
            if info[key]:
                info[f"{key}_png"] = f"{key}.png"
                plot_dependency(info[key], work / f"{key}.png", title)
        (work / "fusion.json").write_text(json.dumps(info, indent=1) + "\n")
        (work / "fusion.md").write_text("\n".join(fusion_section(info)))
    return info
