"""Replace-1-block scoring (Puzzle §4.3) and whole-model quality on held-out text.

For each layer i and each block variant b: the parent with exactly block i swapped for b, on held-out
windows. The swap starts from the parent's cached input to layer i (nothing before it is recomputed); the
parent's layers after i and its head then run as usual. Two scores: KL(parent ‖ child) of the next-token
distributions (Puzzle found it the better guide) and the LM loss. An architecture's quality is then
approximated by the sum of its blocks' scores, which is what the MIP optimises.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tessera.runtime.model import DecoderLayer, Model
from tessera.search.activations import Activations, window_context
from tessera.search.assemble import build_layer
from tessera.search.bld import SublayerStore
from tessera.search.library import SearchSpace
from tessera.search.ranks import ONE, Ranks


def _head_logprobs(model: Model, h: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model.logits(model.norm(h)).float(), dim=-1)


def _kl_and_loss(logp_ref: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Summed KL(ref ‖ model) over tokens, summed next-token cross-entropy (both in nats)."""
    kl = F.kl_div(logp, logp_ref, log_target=True, reduction="sum").item()
    nll = F.nll_loss(logp, targets, reduction="sum").item()
    return kl, nll


@torch.no_grad()
def parent_logprobs(parent: Model, acts: Activations, chunk: int = 4) -> torch.Tensor:
    """The parent's next-token log-probabilities [n, T, V] on the recorded windows (from the cached last layer)."""
    device = parent.embed_tokens.weight.device
    out = []
    for s in range(0, acts.n_windows, chunk):
        out.append(_head_logprobs(parent, acts.inputs[-1][s : s + chunk].to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def replace_one_block(
    parent: Model,
    layer: DecoderLayer,
    layer_idx: int,
    acts: Activations,
    ref_logprobs: torch.Tensor,
    chunk: int = 4,
) -> dict[str, float]:
    """KL from the parent and LM loss (per token, nats) with parent layer `layer_idx` replaced by `layer`."""
    device = parent.embed_tokens.weight.device
    t = acts.seq_len
    kl = nll = 0.0
    for s in range(0, acts.n_windows, chunk):
        n = min(chunk, acts.n_windows - s)
        batch, cos, sin = window_context(parent, n, t)
        h = acts.inputs[layer_idx][s : s + n].reshape(n * t, -1).to(device)
        h = layer(h, batch, cos, sin)
        for later in parent.layers[layer_idx + 1 :]:
            h = later(h, batch, cos, sin)
        logp = _head_logprobs(parent, h)
        ref = ref_logprobs[s : s + n].reshape(n * t, -1).to(device)
        k, l = _kl_and_loss(ref, logp, acts.tokens[s : s + n, 1:].reshape(-1).to(device))
        kl, nll = kl + k, nll + l
    tokens = acts.n_windows * t
    return {"kl_div": kl / tokens, "lm_loss": nll / tokens}


def score_library(
    parent: Model,
    store: SublayerStore,
    space: SearchSpace,
    acts: Activations,
    progress: bool = True,
    ranks: Ranks = ONE,
) -> dict[str, dict[str, dict[str, float]]]:
    """layer_i -> variant name -> {kl_div, lm_loss} for every block variant of the search space. `ranks`: each
    scores its share (search/ranks.py) and every rank gets all the scores."""
    ref = parent_logprobs(parent, acts)
    parent_loss = -ref.gather(-1, acts.tokens[:, 1:, None]).mean().item()
    todo = [(i, b) for i in range(parent.arch.n_layers) for b in space.block_variants(parent.arch, i)]
    mine: list[tuple[int, str, dict[str, float]]] = []
    for i, block in tqdm(ranks.share(todo), desc="replace-1-block scoring", disable=not progress, dynamic_ncols=True):
        if block == parent.arch.blocks[i]:
            mine.append((i, block.name, {"kl_div": 0.0, "lm_loss": parent_loss}))  # the parent itself
            continue
        mine.append((i, block.name, replace_one_block(parent, build_layer(parent, store, i, block), i, acts, ref)))
    scores: dict[str, dict[str, dict[str, float]]] = {f"layer_{i}": {} for i in range(parent.arch.n_layers)}
    found = {(i, name): score for share in ranks.gather(mine) for i, name, score in share}
    for i, block in todo:  # in the order one process lists them
        scores[f"layer_{i}"][block.name] = found[i, block.name]
    return scores


@torch.no_grad()
def model_quality(
    model: Model,
    windows: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    chunk: int = 4,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Held-out LM loss, perplexity and (given the parent's log-probs on the same windows) KL from the parent.
    `forward` (tokens [B, T] -> logits [B, T, V]) replaces the model's own forward, e.g. with layers in parallel."""
    device = model.embed_tokens.weight.device
    forward = forward or model
    kl = nll = 0.0
    for s in range(0, windows.shape[0], chunk):
        w = windows[s : s + chunk].to(device)
        logp = F.log_softmax(forward(w[:, :-1]).float(), dim=-1).flatten(0, 1)
        if ref_logprobs is not None:
            kl += _kl_and_loss(ref_logprobs[s : s + chunk].flatten(0, 1).to(device), logp, w[:, 1:].reshape(-1))[0]
        nll += F.nll_loss(logp, w[:, 1:].reshape(-1), reduction="sum").item()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    out = {"lm_loss": nll / tokens, "perplexity": math.exp(nll / tokens)}
    if ref_logprobs is not None:
        out["kl_div"] = kl / tokens
    return out


@torch.no_grad()
def reference_logprobs(model: Model, windows: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """The model's next-token log-probabilities [n, T, V] on windows [n, T+1] (the reference for KL), on CPU."""
    device = model.embed_tokens.weight.device
    return torch.cat(
        [
            F.log_softmax(model(windows[s : s + chunk, :-1].to(device)).float(), dim=-1).cpu()
            for s in range(0, len(windows), chunk)
        ]
    )
