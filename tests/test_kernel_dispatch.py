"""Backend dispatch, and the whole runtime model with Triton kernels against the model with references.

The model test runs a checkpoint mixing every block kind (per-layer KV heads 4/2/1, linear and no-op
attention, SwiGLU widths 256/512, linear and no-op FFNs) through the engine's steps (prompts prefilled in
chunks beside decode tokens, over 8-token pages) with each backend. Tolerances, relative to the largest
reference value, and their reasons: conftest's TOLERANCES["model"].
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera import kernels
from tessera.demo import PARENT_DIR
from tessera.errors import UserError
from tessera.runtime import load_model
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.generate import Generator
from tessera.runtime.sampling import SamplingParams

from .conftest import (
    KERNEL_DEVICE,
    dtypes,
    kernel_backend,
    nas_config,
    nas_tensors,
    relative_error,
    write_checkpoint,
)


def test_backend_choice(monkeypatch) -> None:
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    with kernel_backend(None):
        assert kernels.backend(cpu) == "torch"
    with kernel_backend("torch"):
        assert kernels.backend(meta) == "torch"
    from tessera.kernels import hardware

    monkeypatch.setattr(hardware, "INTERPRETING", True)  # CPU tensors launch (read at import, so set here)
    with kernel_backend("triton"):
        assert kernels.backend(cpu) == "triton"
        # Autograd needs the references: the Triton kernels have no backward (BLD and GKD train through here).
        assert kernels.backend(cpu, torch.zeros(2, requires_grad=True)) == "torch"
        with torch.no_grad():
            assert kernels.backend(cpu, torch.zeros(2, requires_grad=True)) == "triton"


def test_swiglu_ffn_goes_to_cublas_past_the_rows_where_triton_wins(monkeypatch) -> None:
    """Chosen automatically on the GPU, the FFN runs the Triton kernels up to ffn.TRITON_MAX_ROWS rows and the
    torch path (cuBLAS) past it; forcing Triton runs the kernels at any M (the kernel tests and benchmarks)."""
    calls: list[str] = []
    monkeypatch.setattr(kernels, "backend", lambda *tensors: "triton")  # as for CUDA tensors
    monkeypatch.setattr(kernels, "swiglu_ffn_triton", lambda *args: calls.append("triton"))
    monkeypatch.setattr(kernels, "swiglu_ffn_reference", lambda *args: calls.append("torch"))
    w_gate_up, w_down = torch.zeros(8, 4), torch.zeros(4, 4)
    rows = kernels.TRITON_MAX_ROWS
    with kernel_backend(None):
        for m in (1, rows, rows + 1, 4096):
            kernels.swiglu_ffn(torch.zeros(m, 4), w_gate_up, w_down)
    with kernel_backend("triton"):
        kernels.swiglu_ffn(torch.zeros(rows + 1, 4), w_gate_up, w_down)
    assert calls == ["triton", "triton", "torch", "torch", "triton"]


@pytest.mark.parametrize(("value", "expected"), [("torch", "torch"), ("triton", "triton"), ("", "None")])
def test_environment_variable_read_at_import(value: str, expected: str) -> None:
    code = "from tessera import kernels; print(kernels.forced_backend())"
    env = {**os.environ, "TESSERA_KERNELS": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_backend_errors_are_clear(monkeypatch) -> None:
    """A bad TESSERA_KERNELS is said by the first op, not at import (where the CLI could not catch it): `tessera
    generate` says it in one line, exit 2. TESSERA_KERNELS=triton on CPU tensors without the interpreter too."""
    env = {**os.environ, "TESSERA_KERNELS": "cuda"}
    op = "import torch; from tessera import kernels; kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5)"
    out = subprocess.run([sys.executable, "-c", op], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "TESSERA_KERNELS must be 'torch' or 'triton'" in out.stderr
    argv = ["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--max-new-tokens", "1"]
    cli = subprocess.run([sys.executable, "-m", "tessera.cli", *argv], env=env, capture_output=True, text=True)
    expected = "tessera: error: TESSERA_KERNELS must be 'torch' or 'triton' (or unset for automatic), got 'cuda'\n"
    assert (cli.returncode, cli.stderr) == (2, expected)
    with pytest.raises(UserError, match="TESSERA_KERNELS must be 'torch' or 'triton'"):
        kernels.set_backend("cuda")
    from tessera.kernels import hardware

    monkeypatch.setattr(hardware, "INTERPRETING", False)  # as if TRITON_INTERPRET had been unset at import
    with kernel_backend("triton"), pytest.raises(UserError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5)


def test_launches_are_sized_for_the_gpu_they_run_on() -> None:
    """kernels.hardware: CPU launches size themselves for an H200 (the interpreter tests run its split logic) or
    for the compile check's target; pipeline stages are cut until stages - 1 sets of tiles fit a block's shared
    memory (the 16-row bf16 gate/up GEMM: 36 KB a set, 4 stages on the H200's 227 KB, 3 on sm_89's 99 KB), never
    below 2; tensor descriptors only from sm_90."""
    from tessera.kernels import hardware
    from tessera.kernels.gemm import tma_ready

    cpu, tile_set = torch.device("cpu"), (16 + 2 * 64) * 128 * 2
    assert hardware.gpu(cpu) == hardware.H200 and hardware.sm_count(cpu) == 132
    assert hardware.fitting_stages(4, tile_set, cpu) == 4
    ada = hardware.GPU((8, 9), 142, 99 * 1024)
    hardware.compile_only(ada)
    try:
        assert hardware.gpu(cpu) == ada and hardware.sm_count(cpu) == 142 and hardware.cpu_launches()
        assert hardware.fitting_stages(4, tile_set, cpu) == 3
        assert hardware.fitting_stages(4, 200 * 1024, cpu) == 2  # the floor: a pipeline needs two
        assert not tma_ready(torch.zeros(16, 16))
    finally:
        hardware.compile_only(None)
    # CPU tensors take descriptors only where launches take them: the interpreter emulates TMA (not on a GPU machine).
    assert hardware.gpu(cpu) == hardware.H200 and tma_ready(torch.zeros(16, 16)) == hardware.INTERPRETING


def test_programmatic_dependent_launch_only_where_the_gpu_has_it(monkeypatch) -> None:
    """PDL (kernels.hardware.launch_flags) is off unless asked; asked, it is on for an NVIDIA GPU of compute
    capability 9+ (here: compile-only mode aimed at one), never for an older one, a ROCm GPU (which reports 9.x for
    gfx94x), CPU tensors that run, or the interpreter."""
    from tessera.kernels import hardware

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(hardware, "INTERPRETING", False)  # as when compiling for a GPU
    monkeypatch.setattr(hardware, "_pdl", False)
    hardware.compile_only(hardware.H200)
    try:
        assert hardware.launch_flags(cpu) == {"PDL": False}  # not asked
        hardware.set_pdl(True)
        assert hardware.launch_flags(cpu) == {"PDL": True, "launch_pdl": True}
        hardware.compile_only(hardware.GPU((8, 9), 142, 99 * 1024))
        assert hardware.launch_flags(cpu) == {"PDL": False}  # Ada has no grid dependency control
        monkeypatch.setattr(hardware, "gpu", lambda device: hardware.H200)  # a capability-9 CUDA device
        monkeypatch.setattr(torch.version, "hip", "6.2")
        assert hardware.launch_flags(cuda) == {"PDL": False}  # ROCm
        monkeypatch.setattr(torch.version, "hip", None)
        assert hardware.launch_flags(cuda) == {"PDL": True, "launch_pdl": True}
        monkeypatch.setattr(hardware, "INTERPRETING", True)
        assert hardware.launch_flags(cuda) == {"PDL": False}
    finally:
        hardware.compile_only(None)
        hardware.set_pdl(False)
    monkeypatch.setattr(hardware, "INTERPRETING", False)
    hardware.set_pdl(True)
    try:
        assert hardware.launch_flags(cpu) == {"PDL": False}  # CPU tensors that run: nothing to overlap
    finally:
        hardware.set_pdl(False)


def test_training_through_ops_gets_gradients() -> None:
    """With the Triton backend forced, a tensor that needs a gradient still gets one (reference path)."""
    weight = torch.ones(8, requires_grad=True)
    with kernel_backend("triton"):
        kernels.rms_norm(torch.randn(3, 8), weight, 1e-5).sum().backward()
    assert weight.grad is not None and weight.grad.shape == (8,)


@pytest.fixture(scope="module")
def nas_checkpoint_dir(tmp_path_factory) -> Path:
    config = nas_config()
    return write_checkpoint(tmp_path_factory.mktemp("nas_kernels"), config, nas_tensors(config))


def _step_logits(model, monkeypatch, steps: int = 3) -> list[torch.Tensor]:
    """The logits of every engine step: 3 prompts prefilled in chunks of at most 16 tokens, then `steps`
    decode steps (greedy tokens fed back)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.arch.vocab_size, (n,), generator=gen).tolist() for n in (9, 1, 30)]
    recorded: list[torch.Tensor] = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: recorded.append(out := logits(h)) or out)
    # Eager steps: a CUDA graph's capture calls model.logits too, and its replays do not (test_engine checks them).
    config = EngineConfig(max_batch=3, max_model_len=64, max_step_tokens=16, page_size=8, cuda_graphs=False)
    engine = Engine(model, config=config)
    engine.generate(prompts, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    monkeypatch.undo()
    return recorded


def _backends_agree(model, monkeypatch, tol: float) -> None:
    """Every engine step's logits on the Triton kernels within `tol` of the torch references'."""
    with kernel_backend("torch"):
        expected = _step_logits(model, monkeypatch)
    with kernel_backend("triton"):
        actual = _step_logits(model, monkeypatch)
    # Steps of 16 tokens: 9 + 1 + 6 of the 30, then 14 and 10 more of it beside the others' decodes, then decodes.
    assert len(actual) == len(expected) == 6
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert relative_error(a, e) <= tol, f"step {step}"


@dtypes("model")
def test_model_with_triton_kernels_matches_references(nas_checkpoint_dir: Path, monkeypatch, dtype, tol) -> None:
    _backends_agree(load_model(nas_checkpoint_dir, device=KERNEL_DEVICE, dtype=dtype), monkeypatch, tol)


def test_generation_with_triton_kernels(llama_untied: Path) -> None:
    """Greedy generation (Llama with GQA 8/2 and llama3 rope) gives the same tokens on both backends."""
    prompts = [[5, 17, 33, 8, 91, 60, 12], [3, 4]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    generator = Generator(load_model(llama_untied, device=KERNEL_DEVICE))
    with kernel_backend("torch"):
        expected = [c.tokens for c in generator.generate(prompts, params)]
    with kernel_backend("triton"):
        assert [c.tokens for c in generator.generate(prompts, params)] == expected


@dtypes("model")
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_family_child_with_windows_on_triton_matches_references(family, monkeypatch, dtype, tol) -> None:
    """Qwen3's q/k norms before RoPE, Qwen2's q/k/v biases, windows of 16 and 8 keys (prefill, paged decode
    and window pages given back past the window), reduced, linear and no-op blocks: every engine step's logits on the
    Triton kernels against the torch references."""
    from .test_families import mixed_child

    _backends_agree(mixed_child(family).to(device=KERNEL_DEVICE, dtype=dtype), monkeypatch, tol)
