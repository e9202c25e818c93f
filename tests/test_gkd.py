"""Global knowledge distillation (search/gkd.py): zero loss for the parent, and training lowers it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.search.assemble import assemble_child
from tessera.search.gkd import GKDConfig, Student, distill, gkd_loss
from tessera.search.library import block_from_name

from .conftest import windows


def test_gkd_loss_is_zero_for_the_parent_and_training_lowers_it(trained, parent):
    store, _ = trained
    tokens = windows(2, seed=5)[:, :-1]
    assert gkd_loss(Student(parent), parent, tokens).item() == pytest.approx(0, abs=1e-5)
    blocks = [block_from_name(n) for n in ("gqa_kv2+ffn_48", "gqa_kv4+ffn_48", "attn_none+ffn_96")]
    child = assemble_child(parent, store, blocks)
    stream = np.random.default_rng(0).integers(0, 97, 4000).astype(np.uint16)
    probe = torch.from_numpy(stream[:33].astype(np.int64))[None, :-1]
    before = gkd_loss(Student(child), parent, probe).item()
    distill(child, parent, stream, GKDConfig(steps=30, batch_size=4, seq_len=32, lr=3e-3), progress=False)
    with torch.no_grad():
        assert gkd_loss(Student(child), parent, probe).item() < 0.9 * before  # 0.99 -> 0.81 seen
