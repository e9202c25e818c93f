"""Projection matrices stored in the layout the CPU multiplies fastest (kernels/cpu_layout.py): row-major,
transposed, or with a oneDNN-packed twin.

The decision is checked on a fake clock (a fake multiply advances it by a set cost per layout), so it is
deterministic: the fastest layout wins, a win inside the margin does not, and both decode row counts are timed.
A layout must change nothing but the order of sums: the same values, the same logits (fp32: FP32_EXACT), the same
gradients (twins are never used where gradients are recorded), and a checkpoint saved bit for bit. The engine
over transposed and over packed weights is checked against transformers in test_engine.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tessera.errors import UserError
from tessera.kernels import FP8, cpu_layout
from tessera.kernels.cpu_layout import Layout, fastest_layout, is_transposed, layout_for, measured_layout
from tessera.runtime import model as model_module
from tessera.runtime.loader import load_model, save_model
from tessera.runtime.model import Model

from .conftest import FP32_EXACT, relative_error, tiny_arch, windows


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test measures afresh, and leaves no fake decision behind for the rest of the session."""
    measured_layout.cache_clear()
    yield
    measured_layout.cache_clear()


def fake_timing(monkeypatch, costs: dict[str, float], shapes: list | None = None) -> list[int]:
    """A multiply in layout L costs costs[L] on a fake clock ("packed" absent: this build cannot pack); returns the
    row counts multiplied (and puts the weights' shapes in `shapes`)."""
    clock, rows = [0.0], []

    def multiply(layout: str, x: torch.Tensor, w: torch.Tensor) -> None:
        assert layout != "transposed" or is_transposed(w)
        clock[0] += costs[layout]
        rows.append(x.shape[0])
        if shapes is not None:
            shapes.append(tuple(w.shape))

    monkeypatch.setattr(cpu_layout.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cpu_layout, "_multiply", multiply)
    monkeypatch.setattr(cpu_layout, "pack_weight", lambda w: w)  # nothing packed for real
    monkeypatch.setattr(cpu_layout, "packing_works", lambda dtype: "packed" in costs)
    monkeypatch.setattr(cpu_layout, "POOL_BYTES", 1)  # two copies a pass: the fake costs nothing real
    return rows


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        pytest.param({"row-major": 2.0, "transposed": 1.0}, Layout(True, False), id="transposed-twice-as-fast"),
        pytest.param({"row-major": 1.0, "transposed": 2.0}, Layout(False, False), id="row-major-faster"),
        pytest.param({"row-major": 1.0, "transposed": 0.96}, Layout(False, False), id="a-win-inside-the-margin"),
        pytest.param({"row-major": 1.0, "transposed": 0.94}, Layout(True, False), id="a-win-past-the-margin"),
        pytest.param({"row-major": 2.0, "transposed": 1.0, "packed": 0.5}, Layout(True, True), id="packed-fastest"),
        pytest.param(
            {"row-major": 2.0, "transposed": 1.0, "packed": 0.96}, Layout(True, False), id="packed-inside-the-margin"
        ),
        pytest.param({"row-major": 1.0, "transposed": 2.0, "packed": 0.9}, Layout(False, True), id="packed-row-major"),
    ],
)
def test_the_measured_fastest_layout_is_chosen(monkeypatch, costs, expected) -> None:
    """Transposed must beat row-major, and packed the better of the two, each by MARGIN."""
    rows = fake_timing(monkeypatch, costs)
    assert measured_layout(512, 256, torch.float32, 2) == expected
    assert sorted(set(rows)) == list(cpu_layout.ROWS)  # a decode step of one row and a small batch
    # Each layout: a warm-up pass and REPEATS timed ones at each row count, two copies a pass.
    assert len(rows) == len(costs) * 2 * (cpu_layout.REPEATS + 1) * len(cpu_layout.ROWS)


def test_a_huge_matrix_is_measured_on_its_first_rows(monkeypatch) -> None:
    """A 10⁹-element head is decided from MIN_ROWS of its rows (POOL_BYTES is 1 here), never copied whole."""
    shapes: list = []
    fake_timing(monkeypatch, {"row-major": 2.0, "transposed": 1.0}, shapes)
    assert measured_layout(2**20, 1024, torch.float32, 2).transposed
    assert set(shapes) == {(cpu_layout.MIN_ROWS, 1024)}


def test_small_matrices_are_left_alone_without_timing(monkeypatch) -> None:
    rows = fake_timing(monkeypatch, {"row-major": 2.0, "transposed": 1.0, "packed": 0.1})
    assert measured_layout(64, 96, torch.float32, 2) == Layout(False, False)
    assert rows == []
    w = torch.randn(64, 96)
    assert fastest_layout(w) is w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastest_layout_keeps_shape_and_values(monkeypatch, dtype) -> None:
    w = torch.randn(512, 256).to(dtype)
    monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: Layout(True, False))
    t = fastest_layout(w)
    assert t.shape == w.shape and t.stride() == (1, 512) and is_transposed(t) and not is_transposed(w)
    assert torch.equal(t, w)
    assert fastest_layout(t) is t  # already laid out
    monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: Layout(False, True))
    back = fastest_layout(t)  # a packed matrix is stored row-major beside its twin
    assert back.is_contiguous() and torch.equal(back, w)


def test_the_environment_fixes_the_layout_without_timing(monkeypatch) -> None:
    """TESSERA_CPU_LAYOUT: one layout for every process that inherits it, nothing measured; a bad value named."""
    rows = fake_timing(monkeypatch, {"row-major": 2.0, "transposed": 1.0, "packed": 0.5})  # measured: packed
    w = torch.randn(512, 256)
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "row-major")
    assert layout_for(w) == Layout(False, False) and fastest_layout(w) is w
    assert fastest_layout(w.t().contiguous().t()).is_contiguous()
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "transposed")
    assert layout_for(w) == Layout(True, False) and is_transposed(fastest_layout(w))
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "packed")
    assert layout_for(w) == Layout(False, True)
    monkeypatch.setattr(cpu_layout, "packing_works", lambda dtype: False)  # a build or CPU that cannot pack
    assert layout_for(w) == Layout(False, False)
    assert rows == []
    monkeypatch.setenv("TESSERA_CPU_LAYOUT", "fast")
    expected = "TESSERA_CPU_LAYOUT='fast': expected one of measure, row-major, transposed, packed"
    with pytest.raises(UserError, match=expected):  # one line from the CLI
        fastest_layout(w)


@pytest.mark.parametrize(
    "weight",
    [torch.randn(8), torch.randn(4, 4, 4), torch.zeros(512, 256).to(FP8), torch.zeros(512, 256, dtype=torch.int8)],
    ids=["vector", "3-d", "fp8", "int8"],
)
def test_fastest_layout_refuses_what_f_linear_does_not_run(weight) -> None:
    with pytest.raises(ValueError, match="a CPU weight layout takes a CPU matrix"):
        fastest_layout(weight)


def _model(tie: bool) -> Model:
    return Model.empty(replace(tiny_arch(), tie_embeddings=tie)).init_weights(std=0.1, seed=0).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "own-head"])
def test_a_model_laid_out_transposed_computes_and_saves_as_before(monkeypatch, tmp_path, tie) -> None:
    """Every projection matrix and the head (the embedding, when tied) transposed: logits within FP32_EXACT of
    the row-major model's, gradients too, and its checkpoint equal to the row-major model's, tensor for tensor."""
    reference, model = _model(tie), _model(tie)
    monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: Layout(True, False))
    assert model.lay_out_for_cpu() == 0  # no packed twins
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


def _matrices(model: Model) -> list[torch.Tensor]:
    return [getattr(m, n) for m in model.modules() for n in getattr(m, "matrices", ())]


needs_packing = pytest.mark.skipif(
    not cpu_layout.packing_works(torch.float32), reason="this torch build or CPU cannot pack matrices (oneDNN)"
)


@needs_packing
def test_packed_twins_serve_inference_and_retire_when_their_matrix_changes(monkeypatch) -> None:
    """With oneDNN's layout chosen, the model keeps its dense matrices and each (the head too) gets a packed
    twin, which kernels' linear multiplies through only while twins are active and no gradient is recorded (q/k/v
    biases included): logits within FP32_EXACT of the dense model's; outside, or under autograd, the dense
    matrices (gradients as before). An in-place update, a new `.data` (a transposed view of the same storage too)
    retire a twin: the updated weights are used, and the next lay_out_for_cpu packs them again."""
    arch = replace(tiny_arch(), family="qwen2")  # q/k/v biases
    reference, model = (Model.empty(arch).init_weights(std=0.1, seed=0).eval() for _ in range(2))
    monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: Layout(False, True))
    matrices = _matrices(model)
    assert model.lay_out_for_cpu() == len(matrices) + 1 and all(w.is_contiguous() for w in matrices)
    twins = [cpu_layout.twin(w) for w in [model.lm_head_weight, *matrices]]
    assert all(t is not None for t in twins)
    assert model.lay_out_for_cpu() == len(twins) and cpu_layout.twin(matrices[0]) is twins[1]  # kept while current
    multiplied = []
    packed_linear = cpu_layout.packed_linear
    monkeypatch.setattr(cpu_layout, "packed_linear", lambda *a: multiplied.append(1) or packed_linear(*a))
    tokens = windows(2)[:, :-1]
    with torch.inference_mode():
        expected = reference(tokens)
        with cpu_layout.twins_active():
            assert relative_error(model(tokens), expected) <= FP32_EXACT
        assert len(multiplied) == len(twins)  # every matrix and the head, once each
        model(tokens)  # outside: dense
        assert len(multiplied) == len(twins)
    with cpu_layout.twins_active():
        model.train()
        model(tokens).logsumexp(-1).mean().backward()  # autograd: dense, differentiable
    reference.train()
    reference(tokens).logsumexp(-1).mean().backward()
    assert len(multiplied) == len(twins)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) <= FP32_EXACT, name
    model.eval()
    attention = model.layers[0].self_attn
    with torch.no_grad():
        for m in (model, reference):
            m.layers[0].mlp.w_down.mul_(2.0)  # an in-place update
        attention.w_o.data = attention.w_o.data.t()  # a square matrix's transposed view: the same storage
        reference.layers[0].self_attn.w_o.data = reference.layers[0].self_attn.w_o.data.t()
        model.layers[1].mlp.w_gate_up.data = model.layers[1].mlp.w_gate_up.data.clone()  # a new `.data`
        with cpu_layout.twins_active():
            assert relative_error(model(tokens), reference(tokens)) <= FP32_EXACT
    stale = [model.layers[0].mlp.w_down, attention.w_o, model.layers[1].mlp.w_gate_up]
    assert all(cpu_layout.twin(w) is None for w in stale)
    assert model.lay_out_for_cpu() == len(twins) and all(cpu_layout.twin(w) is not None for w in stale)


@needs_packing
def test_a_bfloat16_twin_multiplies_as_f_linear_does() -> None:
    if not cpu_layout.packing_works(torch.bfloat16):
        pytest.skip("this CPU cannot pack bfloat16 matrices")
    g = torch.Generator().manual_seed(0)
    w, x, bias = (torch.randn(*shape, generator=g).bfloat16() for shape in ((300, 200), (5, 200), (300,)))
    packed = cpu_layout.pack_weight(w)
    # bf16 out of fp32 sums in both; their orders differ: one bf16 step at most, 2^-7 of an element just past a
    # power of two (so of the largest, at most)
    got, expected = cpu_layout.packed_linear(x, packed, bias), torch.nn.functional.linear(x, w, bias)
    assert relative_error(got, expected) <= 2**-7


def test_twins_stay_within_their_share_of_memory(monkeypatch) -> None:
    """Twins double what they pack: the process's twins stay within PACK_MEMORY_SHARE of the memory there was
    before them, the head first, the rest first-fit; a second model's lay-out counts the first's twins; a model
    moved off the CPU (here: its matrices dropped) frees them."""
    first, second = _model(False), _model(False)
    monkeypatch.setattr(cpu_layout, "measured_layout", lambda *_: Layout(False, True))
    monkeypatch.setattr(cpu_layout, "packing_works", lambda dtype: True)
    monkeypatch.setattr(cpu_layout, "pack_weight", lambda w: w.clone())  # no oneDNN needed to count bytes
    size = {id(w): w.numel() * 4 for w in [first.lm_head_weight, *_matrices(first)]}
    order = [first.lm_head_weight, *_matrices(first)]
    room = size[id(order[0])] + size[id(order[2])] + size[id(order[3])]  # the head, then what fits of the rest
    available = [room / model_module.PACK_MEMORY_SHARE]

    def memory(device) -> float:
        return available[0] - cpu_layout.twin_bytes()  # twins take what they hold from what is available

    monkeypatch.setattr(model_module, "available_memory", memory)
    assert first.lay_out_for_cpu() >= 3 and cpu_layout.twin(first.lm_head_weight) is not None
    assert cpu_layout.twin_bytes() <= room
    assert second.lay_out_for_cpu() == 0  # the first model's twins took the share
    for w in order:
        cpu_layout.drop(w)
    assert cpu_layout.twin_bytes() == 0 and second.lay_out_for_cpu() >= 3
    for w in [second.lm_head_weight, *_matrices(second)]:
        cpu_layout.drop(w)
