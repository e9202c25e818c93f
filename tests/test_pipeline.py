"""The search pipeline's baselines (search/pipeline.py): uniform and greedy choices under a budget."""

from __future__ import annotations

from tessera.search.pipeline import greedy_baseline, uniform_baseline

from .conftest import tiny_arch


def _toy_library() -> dict:
    # Layer 1 is sensitive; uniform must shrink it anyway, greedy and the MIP need not.
    kl = {"big": (0.0, 0.0), "small": (0.01, 1.0)}
    return {
        f"layer_{i}": {
            name: {"stats": {"runtime_ms": rt}, "metrics": {"kl_div": kl[tag][i == 1]}}
            for name, tag, rt in (("gqa_kv4+ffn_96", "big", 1.0), ("gqa_kv2+ffn_48", "small", 0.5))
        }
        for i in range(3)
    }


def test_uniform_and_greedy_baselines():
    from tessera.search.mip import Bound

    lib, arch = _toy_library(), tiny_arch()
    bounds = [Bound("stats.runtime_ms", upper=2.5)]
    assert [b.name for b in uniform_baseline(lib, arch, bounds)] == ["gqa_kv2+ffn_48"] * 3
    assert [b.name for b in greedy_baseline(lib, arch, bounds)] == [
        "gqa_kv2+ffn_48",
        "gqa_kv4+ffn_96",
        "gqa_kv4+ffn_96",
    ]
    assert greedy_baseline(lib, arch, [Bound("stats.runtime_ms", upper=1.0)]) is None
