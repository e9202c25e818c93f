"""Packaging: the folders map into one `tessera` namespace, and nothing shadows Hugging Face's `kernels`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .conftest import REPO


def test_namespace_mapping() -> None:
    import tessera.kernels
    import tessera.runtime
    import tessera.search

    assert Path(tessera.kernels.__file__).parent == REPO / "kernels"
    assert Path(tessera.runtime.__file__).parent == REPO / "runtime"
    assert Path(tessera.search.__file__).parent == REPO / "search"


def test_no_top_level_kernels_from_this_repo() -> None:
    # transformers probes for Hugging Face's `kernels` package; our folder must never answer to that name.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in Path(spec.origin or "").parents
