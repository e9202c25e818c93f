"""The training loop: schedule shape, and that it actually learns (the loss falls on a learnable task)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import Model
from tessera.search.train import TrainConfig, evaluate_lm, fixed_windows, lm_loss, lr_at, random_windows, train


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_learns_a_repeating_sequence() -> None:
    torch.manual_seed(0)
    block = BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 64))
    arch = ArchConfig(
        vocab_size=32, hidden_size=32, n_heads=2, head_dim=16, blocks=(block,) * 2, max_position_embeddings=64
    )
    model = Model(arch).init_weights(seed=0).train()
    # A period-7 sequence: predictable from context, impossible from unigram statistics alone.
    tokens = np.tile(np.array([3, 1, 4, 15, 9, 2, 6], dtype=np.uint16), 400)
    held_out = fixed_windows(tokens, 24, 8)
    before = evaluate_lm(model, held_out)
    history = train(
        model.named_parameters(),
        lambda w: lm_loss(model, w),
        random_windows(tokens, 8, 24, seed=0),
        TrainConfig(steps=120, lr=3e-3, eval_every=60),
        evaluate=lambda: {"val_loss": evaluate_lm(model, held_out)},
        progress=False,
    )
    after = history[-1]["val_loss"]
    assert before > 2.5  # ~ln(32) at init
    assert after < 0.1, f"loss {before:.3f} -> {after:.3f}"
    assert [h["step"] for h in history if "val_loss" in h] == [60, 120]


def test_training_is_reproducible() -> None:
    block = BlockConfig(AttentionConfig("gqa", 1), FFNConfig("swiglu", 64))
    arch = ArchConfig(vocab_size=32, hidden_size=32, n_heads=2, head_dim=16, blocks=(block,) * 2)
    tokens = np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16)

    def run() -> list[float]:
        model = Model(arch).init_weights(seed=0).train()
        batches = random_windows(tokens, 4, 16, seed=0)
        history = train(
            model.named_parameters(), lambda w: lm_loss(model, w), batches, TrainConfig(steps=5), progress=False
        )
        return [h["loss"] for h in history]

    assert run() == run()


def test_random_windows_are_seeded() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = next(random_windows(tokens, 4, 16, seed=3)), next(random_windows(tokens, 4, 16, seed=3))
    assert torch.equal(a, b) and a.shape == (4, 17)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.int64))


def test_random_windows_reach_both_ends_of_the_stream() -> None:
    """Windows of 16 inputs and their targets over 19 tokens can start at 0, 1 or 2: each start is drawn, the last
    one included (whose targets end on the stream's last token), and none past it."""
    tokens = np.arange(19, dtype=np.uint16)
    starts = {int(w[0]) for w in next(random_windows(tokens, 200, 16, seed=0))}
    assert starts == {0, 1, 2}


def test_diverging_loss_is_reported() -> None:
    p = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train([("p", p)], lambda _: p.sum() * float("nan"), iter(range(5)), TrainConfig(steps=5), progress=False)


def test_a_large_vocabulary_corpus_is_separated_by_the_models_eos(tmp_path) -> None:
    """Llama-3's 128k tokenizer has no <|endoftext|>: its corpus stream is int32 (uint16 cut ids past 65,535, so
    such a parent was refused) and its documents are separated by the model's first EOS id."""
    import lzma

    from tokenizers import Tokenizer, models, pre_tokenizers

    from tessera.errors import UserError
    from tessera.search.data import DOCUMENT_SEPARATOR, encode_split

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "train.txt.xz").write_bytes(lzma.compress(f"w69999 w5{DOCUMENT_SEPARATOR}w7".encode()))
    stream = encode_split(tok, "train", tmp_path, eos_token_ids=(69_998, 3))
    assert stream.dtype == np.int32 and stream.tolist() == [69_999, 5, 69_998, 7, 69_998]
    with pytest.raises(UserError, match=re.escape("no '<|endoftext|>' token and the model no eos_token_id")):
        encode_split(tok, "train", tmp_path)


def test_fixed_windows_of_too_few_tokens_are_none() -> None:
    assert fixed_windows(np.arange(10, dtype=np.uint16), 16).shape == (0, 17)
    assert fixed_windows(np.arange(0, dtype=np.uint16), 16).shape == (0, 17)
    assert fixed_windows(np.arange(40, dtype=np.uint16), 16).shape == (2, 17)
