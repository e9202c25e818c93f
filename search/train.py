"""The training loop: AdamW, linear warm-up + cosine decay, gradient clipping, periodic evaluation.

One loop for every training tessera does: pretraining the demo parent (LM loss), blockwise local
distillation and global distillation (their own losses). A caller passes the parameters to train, a loss
over one batch, an endless batch iterator and optionally an evaluation; the loop owns optimisation,
progress (tqdm) and the history it returns. Defaults follow Puzzle's published recipe: AdamW
betas (0.9, 0.95), weight decay 0.1 on matrices only, 5 % warm-up, clip 1.0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tessera.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate only at the end


def lr_at(step: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    params: Iterable[tuple[str, torch.nn.Parameter]],
    loss_fn: Callable[[object], torch.Tensor],
    batches: Iterator[object],
    cfg: TrainConfig,
    evaluate: Callable[[], dict[str, float]] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Minimise loss_fn over `cfg.steps` batches; returns the history (train loss per step, evaluations)."""
    named = [(n, p) for n, p in params if p.requires_grad]
    # Weight decay on matrices only: norms and 1-D parameters are not regularised (GPT-2/Llama practice).
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    trainable = [p for _, p in named]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item()}
        last = step + 1 == cfg.steps
        if evaluate is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            record.update(evaluate())
        record["elapsed_s"] = time.perf_counter() - start
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_loss")})
    return history


# Language modelling on a token array: what the demo parent trains on and what distillation samples from.


def check_tokens(tokens: np.ndarray, seq_len: int, what: str = "the token stream") -> None:
    """Refuse, naming `what`, a token stream too short for a window of seq_len tokens and their targets."""
    if len(tokens) < seq_len + 1:
        raise UserError(f"{what} is {len(tokens)} tokens, too few for windows of {seq_len} (at least {seq_len + 1})")


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, seq_len + 1] of uniformly random windows (inputs + shifted targets)."""
    check_tokens(tokens, seq_len)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # the last window ends at the last token
        yield torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def fixed_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len + 1] covering the tokens (held-out evaluation)."""
    n = max((len(tokens) - 1) // seq_len, 0)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:  # too few tokens: no window (callers say how many they need)
        return torch.empty((0, seq_len + 1), dtype=torch.int64)
    return torch.stack(
        [torch.from_numpy(tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64)) for i in range(n)]
    )


def lm_loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on windows [B, T + 1]."""
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over the given windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        total += lm_loss(model, chunk).item() * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / count
