"""What every launcher decides the same way: the GPU it sizes work for (read once per device) and the tl.dot
precision."""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # grid dependency control (triton >= 3.4; the H200 image has 3.6)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - an older triton: kernels launch without PDL
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@dataclass(frozen=True)
class GPU:
    """What a launch is sized by: its compute capability, its SMs (split-K and persistent grids), and the shared
    memory one block may use (pipeline stages must fit in it)."""

    capability: tuple[int, int]
    sms: int
    shared_per_block: int


# What launches on CPU tensors size themselves for, unless compile-only mode names another target: the H200, so
# the interpreter tests exercise the split logic and tile schedules the GPU runs.
H200 = GPU((9, 0), 132, 227 * 1024)
_compile_target: GPU | None = None


@functools.cache
def _cuda(device: torch.device) -> GPU:
    """The device's figures; its shared memory is the limit Triton checks a kernel against at launch (the
    per-block opt-in maximum, which torch's device properties do not give)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return GPU((props.major, props.minor), props.multi_processor_count, shared)


def gpu(device: torch.device) -> GPU:
    """The GPU a launch on `device` is sized for: the device itself, or for CPU tensors the compile target
    (`compile_only`) or the H200."""
    if device.type == "cuda":
        return _cuda(device)
    return _compile_target or H200


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors, to size split-K and persistent grids."""
    return gpu(device).sms


def fitting_stages(stages: int, stage_bytes: int, device: torch.device) -> int:
    """The most software-pipeline stages, up to `stages`, whose buffers fit in a block's shared memory on the
    device. Triton keeps stages - 1 tiles of each operand in flight (`stage_bytes` a set: on the sm_90 compile
    check, 4 stages of the gate/up GEMM's 36 KB set took 108 KB); two stages at least. The H100/H200's 227 KB
    never cuts a schedule here; the 99 KB of an L4, L40S or RTX 4090 cuts the 16-row gate/up GEMM to 3."""
    limit = gpu(device).shared_per_block
    while stages > 2 and (stages - 1) * stage_bytes > limit:
        stages -= 1
    return stages


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 operands get exact fp32 products, as F.linear and SDPA give them (torch
    leaves TF32 off for matmuls by default); for fp16/bf16 operands the setting does not apply."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compile_only(target: GPU | None) -> None:
    """Launches compile kernels for `target`, a GPU that is not here, instead of running them (benchmarks/
    compile_check.py, which aims Triton at it); None ends it. Meanwhile the launchers take CPU tensors, as under the
    interpreter, and size their work for the target."""
    global _compile_target
    _compile_target = target


# Whether Triton runs kernels on the CPU: TRITON_INTERPRET is read when kernels are decorated, at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def cpu_launches() -> bool:
    """Whether Triton launches take CPU tensors: under the interpreter, which runs them, or in `compile_only`
    mode."""
    return INTERPRETING or _compile_target is not None


# Programmatic dependent launch (Hopper on): a kernel launched with it may be scheduled while the kernel before it
# drains, so the launch latency and the tail between the ~300 kernels of a decode step overlap (inside CUDA graphs
# too). Every tessera kernel takes a PDL constexpr and, with it, waits for the kernel before it (`gdc_wait`: that
# kernel complete, its writes visible) before its first memory access: correctness never depends on the overlap.
# Off unless TESSERA_PDL=1 or `set_pdl(True)`: its speed on the H200 is unmeasured (`bench model --pdl` compares the
# decode step with and without it, in one run, and checks the logits are the same bits).
PDL_ENV = "TESSERA_PDL"
_pdl = os.environ.get(PDL_ENV, "") == "1"


def set_pdl(on: bool) -> None:
    """Launch tessera's kernels with programmatic dependent launch where the GPU has it (from the next launch)."""
    global _pdl
    _pdl = on


def pdl_enabled() -> bool:
    return _pdl


def hopper(device: torch.device) -> bool:
    """Whether launches on `device` run on (or are sized for) an NVIDIA GPU of compute capability 9+, what tensor
    descriptors and grid dependency control need: such a GPU (not ROCm, whose gfx94x reports 9.x), or CPU tensors
    where launches take them (the interpreter, compile-only mode) with a target that is one."""
    if device.type == "cuda":
        return torch.version.hip is None and gpu(device).capability[0] >= 9
    return cpu_launches() and gpu(device).capability[0] >= 9


_PDL_OFF, _PDL_ON = {"PDL": False}, {"PDL": True, "launch_pdl": True}


def pdl_possible(device: torch.device) -> bool:
    """Whether launches on `device` can take PDL: `hopper`, with grid dependency control in this triton, and not
    under the interpreter, which has none."""
    return HAS_GDC and not INTERPRETING and hopper(device)


def launch_flags(device: torch.device) -> dict:
    """The PDL constexpr (and launch option) of a kernel launched on `device`: on when enabled and possible. Read
    at every launch: off, a flag test."""
    return _PDL_ON if _pdl and pdl_possible(device) else _PDL_OFF


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """A kernel's first statement: under programmatic dependent launch, wait until the kernel before it is
    complete and its writes visible, then let the next kernel be scheduled (it waits in turn)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
