"""Blockwise local distillation (search/bld.py) on a tiny random parent: every variant trained and improved, and
a rerun reuses the store."""

from __future__ import annotations

import pytest

from tessera.search import activations
from tessera.search.bld import SublayerStore, run_bld, trainings

from .conftest import BLD_CONFIG, SPACE, windows


def test_bld_trains_every_variant_and_improves_it(trained, parent):
    _, losses = trained
    expected = {(i, v.name) for i, _, v in trainings(parent.arch, SPACE)}
    assert {(int(layer.split("_")[1]), name) for layer, d in losses.items() for name in d} == expected
    for layer, d in losses.items():
        for name, r in d.items():
            assert r["nmse_final"] < r["nmse_init"], f"{layer} {name}: {r['nmse_init']:.3f} -> {r['nmse_final']:.3f}"


def test_bld_resumes_without_retraining(trained, parent, monkeypatch):
    store, losses = trained
    import tessera.search.bld as bld

    monkeypatch.setattr(bld, "train", lambda *a, **k: pytest.fail("retrained a variant already in the store"))
    acts = activations.record(parent, windows(40, t=32), progress=False)
    again = run_bld(parent, acts, SPACE, SublayerStore(store.root), BLD_CONFIG, False)
    assert again == losses
