"""Replace-1-block scoring (Puzzle §4.3) and whole-model quality on held-out text.

For each layer i and each block variant b: the parent with exactly block i swapped for b, on held-out
windows. The swap starts from the parent's cached input to layer i (nothing before it is recomputed); the
parent's layers after i and its head then run as usual. Two scores: KL(parent ‖ child) of the next-token
distributions (Puzzle found it the better guide) and the LM loss. An architecture's quality is then
approximated by the sum of its blocks' scores, which is what the MIP optimises. That costs the layers after i
for every pair: V · L(L+1)/2 block forwards, the one stage of the search that grows with L².

`scoring="fisher"` estimates the same two scores from V · L block forwards: KL(parent ‖ child) ≈ ½ δᵀ F δ, the
second-order expansion of the KL in the change δ = b(h_i) − parent_i(h_i) of the residual stream the swap makes
(the parent's own output is cached, so δ is one block forward), where F is the Fisher information of the
parent's next-token distributions with respect to that residual stream (the sum over every later position a
change can reach). F is never formed: for S draws y ~ p_parent of every target token, g_s = ∇_h Σ_t log p(y_t)
(one backward pass of the parent gives it at every layer boundary), and δᵀ F δ = E_s[(g_s · δ)²]. The LM loss
is its expansion too: the parent's loss + g_data · δ + ½ δᵀ F δ (F standing for the loss's Hessian, as in
Gauss-Newton). Exact for small changes; what it costs in quality is measured on the demo (docs/optimize.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


SCORING_METHODS = ("exact", "fisher")
FISHER_SAMPLES = 16  # draws of the target tokens: the estimate's relative noise is about √(2 / (S · windows))


@dataclass(frozen=True)
class FisherDirections:
    """What the Fisher estimate needs at each layer boundary j = 1..L (the output of layer j − 1), [n, S, T, H]
    and [n, T, H] per boundary: the gradients g_s of Σ_t log p(y_t) for S draws of the targets from the parent,
    and the gradient of the data's log-likelihood."""

    sampled: list[torch.Tensor]
    data: list[torch.Tensor]

    @property
    def samples(self) -> int:
        return self.sampled[0].shape[1]


def fisher_directions(
    parent: Model, acts: Activations, samples: int = FISHER_SAMPLES, seed: int = 0, chunk: int = 4
) -> FisherDirections:
    """One forward pass of the parent per chunk of windows from its cached embeddings, then `samples` + 1
    backward passes through it (each gives the gradient at every layer boundary at once)."""
    if samples < 1:
        raise ValueError(f"fisher scoring needs at least one sample, got {samples}")
    device = parent.embed_tokens.weight.device
    n, t, h_size, n_layers = acts.n_windows, acts.seq_len, parent.arch.hidden_size, parent.arch.n_layers
    sampled = [torch.empty(n, samples, t, h_size) for _ in range(n_layers)]
    data = [torch.empty(n, t, h_size) for _ in range(n_layers)]
    gen = torch.Generator(device).manual_seed(seed)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        batch, cos, sin = window_context(parent, b, t)
        with torch.enable_grad():
            h = acts.inputs[0][s : s + b].reshape(b * t, -1).to(device).requires_grad_()
            boundaries = []
            for layer in parent.layers:
                h = layer(h, batch, cos, sin)
                boundaries.append(h)
            logp = _head_logprobs(parent, h)
            draws = torch.multinomial(logp.detach().exp(), samples, replacement=True, generator=gen)
            targets = acts.tokens[s : s + b, 1:].reshape(-1, 1).to(device)
            for k in range(samples + 1):
                chosen = targets if k == samples else draws[:, k : k + 1]
                grads = torch.autograd.grad(logp.gather(1, chosen).sum(), boundaries, retain_graph=k < samples)
                for j, g in enumerate(grads):
                    if k == samples:
                        data[j][s : s + b] = g.view(b, t, -1).float().cpu()
                    else:
                        sampled[j][s : s + b, k] = g.view(b, t, -1).float().cpu()
    return FisherDirections(sampled, data)


@torch.no_grad()
def fisher_one_block(
    parent: Model,
    layer: DecoderLayer,
    layer_idx: int,
    acts: Activations,
    directions: FisherDirections,
    parent_loss: float,
    chunk: int = 4,
) -> dict[str, float]:
    """The Fisher estimates of replace_one_block's KL and LM loss (module docstring): one forward of `layer`."""
    device = parent.embed_tokens.weight.device
    n, t = acts.n_windows, acts.seq_len
    quadratic = linear = 0.0
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        batch, cos, sin = window_context(parent, b, t)
        h = acts.inputs[layer_idx][s : s + b].reshape(b * t, -1).to(device)
        delta = layer(h, batch, cos, sin).float().cpu() - acts.inputs[layer_idx + 1][s : s + b].reshape(b * t, -1)
        delta = delta.view(b, t, -1).double()
        along = torch.einsum("wkth,wth->wk", directions.sampled[layer_idx][s : s + b].double(), delta)
        quadratic += along.pow(2).sum().item() / directions.samples
        # The log-likelihood's gradient: the loss (its negative) moves by −g_data · δ.
        linear -= torch.einsum("wth,wth->", directions.data[layer_idx][s : s + b].double(), delta).item()
    tokens = n * t
    kl = 0.5 * quadratic / tokens
    return {"kl_div": kl, "lm_loss": parent_loss + linear / tokens + kl}


def score_library(
    parent: Model,
    store: SublayerStore,
    space: SearchSpace,
    acts: Activations,
    progress: bool = True,
    ranks: Ranks = ONE,
    method: str = "exact",
    samples: int = FISHER_SAMPLES,
) -> dict[str, dict[str, dict[str, float]]]:
    """layer_i -> variant name -> {kl_div, lm_loss} for every block variant of the search space, by `method`
    (SCORING_METHODS: "exact" replace-1-block, or its "fisher" estimate from `samples` draws; module docstring).
    `ranks`: each scores its share (search/ranks.py) and every rank gets all the scores."""
    if method not in SCORING_METHODS:
        raise ValueError(f"scoring must be one of {', '.join(SCORING_METHODS)}, got {method!r}")
    ref = parent_logprobs(parent, acts)
    parent_loss = -ref.gather(-1, acts.tokens[:, 1:, None]).mean().item()
    todo = [(i, b) for i in range(parent.arch.n_layers) for b in space.block_variants(parent.arch, i)]
    if method == "fisher":
        directions = fisher_directions(parent, acts, samples)

        def score(i: int, layer: DecoderLayer) -> dict[str, float]:
            return fisher_one_block(parent, layer, i, acts, directions, parent_loss)
    else:

        def score(i: int, layer: DecoderLayer) -> dict[str, float]:
            return replace_one_block(parent, layer, i, acts, ref)

    mine: list[tuple[int, str, dict[str, float]]] = []
    desc = "replace-1-block scoring" + (" (Fisher estimate)" if method == "fisher" else "")
    for i, block in tqdm(ranks.share(todo), desc=desc, disable=not progress, dynamic_ncols=True):
        if block == parent.arch.blocks[i]:
            mine.append((i, block.name, {"kl_div": 0.0, "lm_loss": parent_loss}))  # the parent itself
            continue
        mine.append((i, block.name, score(i, build_layer(parent, store, i, block))))
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
