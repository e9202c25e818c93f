"""Projection matrices stored in the layout the CPU's BLAS reads fastest (kernels/cpu_layout.py).

The decision is checked on a fake clock (a fake F.linear advances it by a set cost per layout), so it is
deterministic: the faster layout wins, a win inside the margin does not, and both decode row counts are
timed. The layout itself must change nothing but strides: the same values, the same logits (fp32, the same
products summed in another order: FP32_EXACT), the same gradients, and a checkpoint saved bit for bit. The
engine over transposed weights is checked against transformers in test_engine.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tessera.kernels import FP8, cpu_layout
from tessera.kernels.cpu_layout import fastest_layout, is_transposed, transposed_is_faster
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model

from .conftest import FP32_EXACT, relative_error, tiny_arch, windows


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test measures afresh, and leaves no fake decision behind for the rest of the session."""
    transposed_is_faster.cache_clear()
    yield
    transposed_is_faster.cache_clear()


def fake_timing(monkeypatch, row_major_s: float, transposed_s: float, shapes: list | None = None) -> list[int]:
    """F.linear costs row_major_s or transposed_s on a fake clock; returns the row counts it was called with (and
    puts the weights' shapes in `shapes`)."""
    clock, rows = [0.0], []

    def linear(x: torch.Tensor, w: torch.Tensor) -> None:
        clock[0] += transposed_s if is_transposed(w) else row_major_s
        rows.append(x.shape[0])
        if shapes is not None:
            shapes.append(tuple(w.shape))

    monkeypatch.setattr(cpu_layout.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cpu_layout.F, "linear", linear)
    monkeypatch.setattr(cpu_layout, "POOL_BYTES", 1)  # two copies a pass: the fake costs nothing real
    return rows


@pytest.mark.parametrize(
    ("row_major_s", "transposed_s", "expected"),
    [
        pytest.param(2.0, 1.0, True, id="transposed-twice-as-fast"),
        pytest.param(1.0, 2.0, False, id="row-major-faster"),
        pytest.param(1.0, 0.96, False, id="a-win-inside-the-margin"),
        pytest.param(1.0, 0.94, True, id="a-win-past-the-margin"),
    ],
)
def test_the_measured_faster_layout_is_chosen(monkeypatch, row_major_s, transposed_s, expected) -> None:
    rows = fake_timing(monkeypatch, row_major_s, transposed_s)
    assert transposed_is_faster(512, 256, torch.float32, 2) is expected
    assert sorted(set(rows)) == list(cpu_layout.ROWS)  # a decode step of one row and a small batch
    # Each layout: a warm-up pass and REPEATS timed ones at each row count, two copies a pass.
    assert len(rows) == 2 * 2 * (cpu_layout.REPEATS + 1) * len(cpu_layout.ROWS)


def test_a_huge_matrix_is_measured_on_its_first_rows(monkeypatch) -> None:
    """A 10⁹-element head is decided from MIN_ROWS of its rows (POOL_BYTES is 1 here), never copied whole."""
    shapes: list = []
    fake_timing(monkeypatch, 2.0, 1.0, shapes)
    assert transposed_is_faster(2**20, 1024, torch.float32, 2)
    assert set(shapes) == {(cpu_layout.MIN_ROWS, 1024)}


def test_small_matrices_are_left_alone_without_timing(monkeypatch) -> None:
    rows = fake_timing(monkeypatch, 2.0, 1.0)
    assert not transposed_is_faster(64, 96, torch.float32, 2)
    assert rows == []
    w = torch.randn(64, 96)
    assert fastest_layout(w) is w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastest_layout_keeps_shape_and_values(monkeypatch, dtype) -> None:
    w = torch.randn(512, 256).to(dtype)
    monkeypatch.setattr(cpu_layout, "transposed_is_faster", lambda *_: True)
    t = fastest_layout(w)
    assert t.shape == w.shape and t.stride() == (1, 512) and is_transposed(t) and not is_transposed(w)
    assert torch.equal(t, w)
    assert fastest_layout(t) is t  # already laid out
    monkeypatch.setattr(cpu_layout, "transposed_is_faster", lambda *_: False)
    back = fastest_layout(t)
    assert back.is_contiguous() and torch.equal(back, w)


def test_the_environment_fixes_the_layout_without_timing(monkeypatch) -> None:
    """TESSERA_CPU_LAYOUT: one layout for every process that inherits it, nothing measured; a bad value named."""
    rows = fake_timing(monkeypatch, 2.0, 1.0)  # measured, transposed would win
    w = torch.randn(512, 256)
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "row-major")
    assert fastest_layout(w) is w and fastest_layout(w.t().contiguous().t()).is_contiguous()
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "transposed")
    assert is_transposed(fastest_layout(w))
    assert rows == []
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "fast")
    with pytest.raises(ValueError, match="TESSERA_CPU_LAYOUT='fast': expected one of measure, row-major, transposed"):
        fastest_layout(w)


@pytest.mark.parametrize(
    "weight",
    [torch.randn(8), torch.randn(4, 4, 4), torch.zeros(512, 256).to(FP8), torch.zeros(512, 256, dtype=torch.int8)],
    ids=["vector", "3-d", "fp8", "int8"],
)
def test_fastest_layout_refuses_what_f_linear_does_not_run(weight) -> None:
    with pytest.raises(ValueError, match="fastest_layout takes a CPU matrix"):
        fastest_layout(weight)


def _model(tie: bool) -> Model:
    return Model.empty(replace(tiny_arch(), tie_embeddings=tie)).init_weights(std=0.1, seed=0).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "own-head"])
def test_a_model_laid_out_transposed_computes_and_saves_as_before(monkeypatch, tmp_path, tie) -> None:
    """Every projection matrix and the head (the embedding, when tied) transposed: logits within FP32_EXACT of
    the row-major model's, gradients too, and its checkpoint equal to the row-major model's, tensor for tensor."""
    reference, model = _model(tie), _model(tie)
    monkeypatch.setattr(cpu_layout, "transposed_is_faster", lambda *_: True)
    assert model.lay_out_for_cpu() is model
    matrices = [getattr(m, n) for m in model.modules() for n in getattr(m, "matrices", ())]
    assert len(matrices) == 4 * 3 and all(is_transposed(w) for w in matrices)
    assert is_transposed(model.lm_head_weight) and is_transposed(model.embed_tokens.weight) == tie
    tokens = windows(2)[:, :-1]
    with torch.no_grad():
        assert relative_error(model(tokens), reference(tokens)) <= FP32_EXACT
    for m in (model, reference):
        m.train()
        m(tokens).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) <= FP32_EXACT, name
    save_model(model, tmp_path / "transposed")
    save_model(reference, tmp_path / "row-major")
    a, b = load_model(tmp_path / "transposed"), load_model(tmp_path / "row-major")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
