"""Global knowledge distillation (Puzzle §4.4): the assembled child learns from the parent end to end.

loss = Σ_layers (1 − cos(h_child_l, h_parent_l)) + KL(p_parent ‖ p_child), both averaged over tokens. The
cosine terms align every layer's output (the child has one layer per parent layer), the KL the next-token
distributions; Puzzle found that adding the LM loss hurts, so there is none. Training runs through the
reference kernels (autograd is recording), with tessera's one training loop.

Over the ranks of a sharded search (search/ranks.py) GKD runs data-parallel: torch's DistributedDataParallel
around the child, each rank the same share of every batch one process would draw (batch_size divisible by the
ranks), the gradients averaged in the backward pass, so each step is one process's step up to the order of the
sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import UserError
from tessera.runtime.model import Batch, Model
from tessera.search.ranks import ONE, Ranks
from tessera.search.scoring import model_quality
from tessera.search.train import TrainConfig, random_windows, train


@dataclass(frozen=True)
class GKDConfig:
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    seed: int = 0


def check_batch(cfg: GKDConfig, ranks: int) -> None:
    """Data-parallel GKD gives each rank an equal share of every batch: the batch must split over the ranks."""
    if cfg.batch_size % ranks:
        raise UserError(
            f"GKD's batch of {cfg.batch_size} windows (--gkd-batch-size) does not split over {ranks} ranks: give a "
            "multiple of the ranks, or --gkd-steps 0"
        )


def _forward(model: Model, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's output [N, H] and the logits [N, V] for windows [B, T]."""
    b, t = inputs.shape
    outputs: list[torch.Tensor] = []
    hidden = model.forward_packed(inputs.reshape(-1), Batch.sequences([t] * b, inputs.device), outputs)
    return outputs, model.logits(hidden)


class Student(nn.Module):
    """The child's forward as GKD needs it (each layer's output and the logits) as one module call: what
    DistributedDataParallel wraps."""

    def __init__(self, child: Model) -> None:
        super().__init__()
        self.child = child

    def forward(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return _forward(self.child, inputs)


def gkd_loss(
    student: nn.Module, parent: Model, inputs: torch.Tensor, aligned_layers: Sequence[int] | None = None
) -> torch.Tensor:
    """The GKD loss on windows [B, T] of the child `student` (`Student(child)`, or its DistributedDataParallel
    wrapper over several ranks) against the parent; the cosine terms cover `aligned_layers` (default: every
    layer)."""
    with torch.no_grad():
        parent_layers, parent_logits = _forward(parent, inputs)
    child_layers, child_logits = student(inputs)
    aligned = range(len(child_layers)) if aligned_layers is None else aligned_layers
    cosine = sum((1 - F.cosine_similarity(child_layers[i], parent_layers[i], dim=-1)).mean() for i in aligned)
    logp_parent = F.log_softmax(parent_logits.float(), dim=-1)
    kl = F.kl_div(F.log_softmax(child_logits.float(), dim=-1), logp_parent, log_target=True, reduction="batchmean")
    return cosine + kl


def distill(
    child: Model,
    parent: Model,
    train_tokens: np.ndarray,
    cfg: GKDConfig = GKDConfig(),
    val_windows: torch.Tensor | None = None,
    parent_logprobs: torch.Tensor | None = None,
    progress: bool = True,
    aligned_layers: Sequence[int] | None = None,
    ranks: Ranks = ONE,
) -> list[dict[str, float]]:
    """Train every child weight (embedding and head included) in place; returns the loop's history, the last
    record holding the held-out quality when val_windows is given. `aligned_layers` limits the cosine terms
    to the layers whose outputs the child can match (a fused FFN group has no intermediate outputs). `ranks`:
    data-parallel over them (every rank calls this with the same child and arguments)."""
    if child.arch.n_layers != parent.arch.n_layers:
        raise ValueError(f"GKD pairs layers one to one: child has {child.arch.n_layers}, parent {parent.arch.n_layers}")
    check_batch(cfg, ranks.size)
    device = parent.embed_tokens.weight.device
    batches = random_windows(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    student = Student(child)
    if ranks.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        batches = (windows[ranks.rank :: ranks.size] for windows in batches)  # this rank's share of each batch
    parent.eval()
    child.train()

    def evaluate() -> dict[str, float]:
        child.eval()
        q = model_quality(child, val_windows, parent_logprobs) if val_windows is not None else {}
        child.train()
        return {f"val_{k}": v for k, v in q.items()}

    history = train(
        child.named_parameters(),
        lambda w: gkd_loss(student, parent, w[:, :-1].to(device), aligned_layers),
        batches,
        TrainConfig(steps=cfg.steps, lr=cfg.lr),
        evaluate=evaluate if val_windows is not None and ranks.main else None,
        desc="GKD",
        progress=progress and ranks.main,
    )
    child.eval()
    return history
