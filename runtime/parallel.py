"""Tensor parallelism with torch.distributed: one rank's shard of a heterogeneous model (Megatron-style).

Every layer is split as vLLM splits a Llama, with the shares `ArchConfig.rank_*` counts (tessera/config.py):
- GQA attention: rank r keeps query heads r·Hq/N .. (r+1)·Hq/N (q rows, and the same columns of o) and its
  KV heads: an even share, or, in a layer with fewer KV heads than ranks, the one head its query heads read
  (replicated on N / Hkv ranks, as vLLM does). Biases follow their rows; q/k norms are whole on every rank.
- SwiGLU: a contiguous share of the width (gate and up rows, down columns); a fused FFN-Fusion group alike.
- A linear replacement [H, H]: a share of its input columns (each rank multiplies its slice of the input).
- Embedding and LM head: a share of the vocabulary rows; the embedding looks up the tokens it holds (zeros
  elsewhere), the head's logits are gathered.
- Norms whole. No-op sublayers are nothing on every rank.

Each sublayer's output is a partial sum, made whole by one all-reduce (for the FFN and the linear sublayers the
residual is added on rank 0 only, before it; attention's is added after it, on every rank, in the fused norm).
The rank's model is an ordinary `Model` of a rank-local `ArchConfig` (fewer heads, narrower FFNs, its vocabulary
rows), so its KV cache holds only its KV heads and every kernel runs unchanged.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, ConfigError, FFNConfig, share
from tessera.devices import check_fp8, parse_dtype
from tessera.errors import UserError
from tessera.files import atomic_write_text
from tessera.kernels import FP8
from tessera.runtime.generate import Generator
from tessera.runtime.loader import (
    CheckpointError,
    check_kv_scales_of,
    dequantize_checkpoint,
    hf_state,
    load_hf_state,
    read_hf_tensors,
)
from tessera.runtime.model import LinearSublayer, Model
from tessera.runtime.sampling import Completion, SamplingParams, load_tokenizer
from tessera.runtime.weights import KV_SCALE_NAMES, WEIGHT_SCALE


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks, and the collectives a sharded model calls."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    local_rank: int | None = None  # among the ranks on this machine (its GPU); None: ranks all on one machine

    @property
    def device_index(self) -> int:
        """This rank's GPU on its machine."""
        return self.rank if self.local_rank is None else self.local_rank

    def device(self, device: torch.device | str) -> torch.device:
        """This rank's device: its own GPU when `device` is CUDA, else `device`."""
        device = torch.device(device)
        return torch.device("cuda", self.device_index) if device.type == "cuda" else device

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (a serving engine's new requests, before each step)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' values, on every rank: sizes that must match across ranks (a KV pool sized
        from each process's free memory) take the tightest."""
        box = [None] * self.size
        dist.all_gather_object(box, value, group=self.group)
        return min(box)

    def all_gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """[..., widths[rank]] on every rank -> [..., sum(widths)], rank order. Shares of unequal width travel
        padded to the widest (collectives move equal sizes)."""
        wide = max(widths)
        padded = torch.nn.functional.pad(x, (0, wide - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[..., :w] for part, w in zip(parts, widths)], dim=-1)


def rank_arch(arch: ArchConfig, rank: int, size: int) -> ArchConfig:
    """The architecture of one rank's shard."""
    arch.check_tensor_parallel(size)
    blocks = []
    for block in arch.blocks:
        att, ffn = block.attention, block.ffn
        if att.kind == "gqa":
            att = AttentionConfig("gqa", arch.rank_kv_heads(att, size), window=att.window)
        if ffn.kind == "swiglu":
            ffn = FFNConfig("swiglu", len(share(ffn.intermediate_size, rank, size)))
        blocks.append(BlockConfig(att, ffn))
    return replace(
        arch,
        vocab_size=len(share(arch.vocab_size, rank, size)),
        n_heads=arch.n_heads // size,
        blocks=tuple(blocks),
        fusion_spans=(),
    )


def _kv_heads(arch: ArchConfig, n_kv: int, rank: int, size: int) -> range:
    """The KV heads a rank holds in a layer of n_kv heads: its even share, or the one head its query heads read
    (query head h reads KV head h // G)."""
    if n_kv >= size:
        return share(n_kv, rank, size)
    head = rank // (size // n_kv)
    return range(head, head + 1)


# Matrices split along their input columns (their output is a partial sum all-reduced across the ranks).
COLUMN_SHARDED = ("o_proj.weight", "down_proj.weight", "linear_attn.weight", "linear_mlp.weight")


def shard_part(arch: ArchConfig, name: str, tensor: Any, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of the checkpoint tensor `name` (Hugging Face naming, runtime/weights.py): `tensor`
    is a torch tensor or a lazy safetensors slice (indexing reads only the part)."""
    d, h = arch.head_dim, arch.hidden_size
    if name.endswith(WEIGHT_SCALE):  # an FP8 matrix's per-output-row scales [rows, 1]: its rows' share, or all
        matrix = name.removesuffix("_scale")
        if matrix.endswith(COLUMN_SHARDED):  # each rank computes every output row (a partial sum): every scale
            return tensor[:]
        return shard_part(arch, matrix, tensor, rank, size)  # the rows the rank holds of the matrix
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        rows = share(arch.vocab_size, rank, size)
        return tensor[rows.start : rows.stop]
    if name.endswith(("norm.weight", *KV_SCALE_NAMES)):
        return tensor[:]  # every norm (q/k norms included) and a layer's FP8 KV-cache scales: whole on every rank
    block = arch.blocks[int(name.split(".")[2])]  # model.layers.{i}....
    q_heads = range(rank * arch.n_heads // size, (rank + 1) * arch.n_heads // size)
    if name.endswith(COLUMN_SHARDED):  # the input columns of the rank's heads, FFN width, or hidden share
        if name.endswith("o_proj.weight"):
            cols = range(q_heads.start * d, q_heads.stop * d)
        elif name.endswith("down_proj.weight"):
            cols = share(block.ffn.intermediate_size, rank, size)
        else:
            cols = share(h, rank, size)
        return tensor[:, cols.start : cols.stop]
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return tensor[q_heads.start * d : q_heads.stop * d]
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        kv = _kv_heads(arch, block.attention.n_kv_heads, rank, size)
        return tensor[kv.start * d : kv.stop * d]
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        rows = share(block.ffn.intermediate_size, rank, size)
        return tensor[rows.start : rows.stop]
    raise ValueError(f"no tensor-parallel rule for {name}")


def _rank_model(
    arch: ArchConfig, tensors: dict[str, torch.Tensor], tp: TensorParallel, device: torch.device, dtype: torch.dtype
) -> Model:
    """The rank's model in `dtype` (kernels.FP8: FP8 projections, quantized from wider parts as they are packed)
    from its parts of every tensor of a checkpoint of `arch`, wired to `tp`."""
    stored = rank_arch(arch, tp.rank, tp.size)  # the parts as the checkpoint holds them (FP8 or not)
    local = Model.empty(stored, device, dtype)
    cols = share(arch.hidden_size, tp.rank, tp.size)
    for layer in local.layers:
        for sub in (layer.self_attn, layer.mlp):
            if isinstance(sub, LinearSublayer):  # a share of the input columns
                like = sub.weight  # its dtype (FP8 or the compute one); its scales [hidden] stay as they are
                sub.weight = nn.Parameter(like.new_empty(arch.hidden_size, len(cols)), requires_grad=False)
                sub.cols = slice(cols.start, cols.stop)
            if sub is not None:
                sub.tp = tp
    load_hf_state(local, tensors, stored)
    local.tp, local.vocab_rows = tp, share(arch.vocab_size, tp.rank, tp.size)
    local.vocab_widths = [len(share(arch.vocab_size, r, tp.size)) for r in range(tp.size)]
    return local.eval()


def shard_model(model: Model, tp: TensorParallel) -> Model:
    """Rank tp.rank's shard of a model in memory (its device and dtype), wired to all-reduce through `tp`."""
    arch = model.arch
    rank_arch(arch, tp.rank, tp.size)  # refuses a size that does not divide the model
    with torch.no_grad():
        parts = {n: shard_part(arch, n, t, tp.rank, tp.size).clone() for n, t in hf_state(model).items()}
        return _rank_model(arch, parts, tp, model.embed_tokens.weight.device, model.run_dtype)


def load_shard(path: str | Path, tp: TensorParallel, device: torch.device | str = "cpu", dtype=torch.float32) -> Model:
    """Rank tp.rank's shard of a checkpoint, reading only its parts of the safetensors files (checked as
    `load_model` checks the whole: names, shapes, dtypes, NaN)."""
    path = Path(path)
    try:
        arch = ArchConfig.from_json(path / "config.json")
        rank_arch(arch, tp.rank, tp.size)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    fp8 = dtype == FP8
    if fp8:
        check_fp8(device, "dtype fp8")
    read_as = torch.bfloat16 if fp8 else dtype  # as load_model: FP8 runs the rest in bf16
    parts = read_hf_tensors(path, arch, read_as, part=lambda n, lazy: shard_part(arch, n, lazy, tp.rank, tp.size))
    if arch.quantization == "fp8" and not fp8:  # each part with its rows' scales: dequantized as the whole is
        arch, parts = dequantize_checkpoint(arch, parts)
    with torch.no_grad():
        model = _rank_model(arch, parts, tp, torch.device(device), dtype)
    check_kv_scales_of(model, path)
    return model


def backend_for(device: torch.device | str) -> str:
    """torch.distributed's backend for ranks on this kind of device: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def torchrun_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process when torchrun started it, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_local() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) torchrun gave this process: its place among the ranks on its machine (its
    GPU, its share of the cores). A launcher that set WORLD_SIZE without them is refused: every rank would take
    GPU 0."""
    try:
        return int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except KeyError as e:
        raise UserError(
            f"WORLD_SIZE is set but {e.args[0]} is not: start the ranks with torchrun, which sets RANK, WORLD_SIZE, "
            "LOCAL_RANK and LOCAL_WORLD_SIZE"
        ) from None


@dataclass(frozen=True)
class Launch:
    """Where a command's tensor-parallel ranks come from: torchrun, whose every rank (on this node and the others)
    is one rank of the model, or this process, which starts them all here (`--tensor-parallel-size`)."""

    rank: int  # this process's: 0 unless torchrun started it
    size: int  # the model's ranks
    local: int  # of them on this machine
    torchrun: bool

    @classmethod
    def of(cls, tensor_parallel_size: int) -> Launch:
        """This process's launch; under torchrun a `--tensor-parallel-size` given too must equal its WORLD_SIZE."""
        rank, world = torchrun_world()
        if world == 1:
            return cls(0, tensor_parallel_size, tensor_parallel_size, False)
        if tensor_parallel_size not in (1, world):
            raise UserError(
                f"--tensor-parallel-size {tensor_parallel_size} under torchrun, which started {world} ranks "
                f"(WORLD_SIZE): give {world} or leave the flag out"
            )
        return cls(rank, world, torchrun_local()[1], True)


def join_group(rank: int, size: int, port: int | None, backend: str, timeout_s: float = 600.0) -> TensorParallel:
    """This process as rank `rank` of `size`: ranks started on this machine meet at 127.0.0.1:`port`; with
    `port` None they are torchrun's (on this node and others) and meet where its environment says (MASTER_ADDR,
    MASTER_PORT, through its agent's store). CPU threads are shared out among the ranks on this machine, a CUDA
    rank takes its machine's GPU `local_rank`. A collective waiting past `timeout_s` fails rather than hangs."""
    local_rank, local_size = rank, size
    if port is None:
        local_rank, local_size = torchrun_local()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend,
        init_method="env://" if port is None else f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return TensorParallel(rank, size, local_rank=None if port is not None else local_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, backend: str, fn: Callable, args: tuple, out: str) -> None:
    try:
        _run_rank(rank, size, port, backend, fn, args, out)
    except UserError as e:  # the user's mistake (a damaged checkpoint, a prompt past the context): its one line,
        # whole or not at all (spawn kills the other ranks once one fails)
        atomic_write_text(os.path.join(out, f"rank{rank}.error"), str(e))
        raise


def _run_rank(rank: int, size: int, port: int, backend: str, fn: Callable, args: tuple, out: str) -> None:
    tp = join_group(rank, size, port, backend)
    try:
        partial = os.path.join(out, f"rank{rank}.partial")
        torch.save(fn(tp, *args), partial)
        # Every rank done before any tears down: a rank leaving while another's last collective is in flight
        # aborts it (gloo: "terminate called without an active exception").
        dist.barrier()
        os.replace(partial, os.path.join(out, f"rank{rank}.pt"))  # the result stands: every rank got this far
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, size: int, *args: object, backend: str = "gloo") -> list[object]:
    """fn(tp, *args) in `size` processes of one process group on this machine (spawned, torch.distributed
    initialised over a free local port); each rank's result, in rank order. `fn` must be a module-level
    function (it is pickled by name). A rank's UserError is raised here as one (the message of the rank that failed
    first), not as the spawn's traceback."""
    with tempfile.TemporaryDirectory() as out:
        results = [os.path.join(out, f"rank{r}.pt") for r in range(size)]
        try:
            mp.spawn(_rank_main, args=(size, free_port(), backend, fn, args, out), nprocs=size, join=True)
        except mp.ProcessRaisedException as e:
            first = e.error_index  # the rank that failed first, then the others
            errors = [Path(out) / f"rank{r}.error" for r in (first, *range(size))]
            message = next((f.read_text() for f in errors if f.exists()), None)
            if message is None:
                raise
            raise UserError(message) from None
        except mp.ProcessExitedException:
            # Even after the final barrier, gloo now and then aborts a rank as it tears down ("terminate called
            # without an active exception": in 2 of 12 runs of tests/test_parallel.py on the 2-core dev VM). A rank
            # publishes its result only once every rank has passed that barrier: with every result published, the
            # work is done and stands.
            if not all(os.path.exists(r) for r in results):
                raise
        return [torch.load(r, weights_only=False) for r in results]


def shard_logits(tp: TensorParallel, checkpoint: str, ids: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Logits [B, T, vocab] of `ids` through this rank's shard of a checkpoint, loaded in `dtype` (tests, and a
    first check of a tensor-parallel setup)."""
    with torch.no_grad():
        return load_shard(checkpoint, tp, dtype=parse_dtype(dtype))(ids)


def _generate_on_rank(
    tp: TensorParallel,
    checkpoint: str,
    prompts: list,
    params: SamplingParams,
    device: str,
    dtype: str,
    kv_cache_dtype: str = "auto",
) -> list[Completion]:
    model = load_shard(checkpoint, tp, tp.device(device), parse_dtype(dtype))
    tokenizer = load_tokenizer(checkpoint) if any(isinstance(p, str) for p in prompts) or params.stop else None
    return Generator(model, tokenizer, kv_cache_dtype).generate(prompts, params)


def check_ranks(checkpoint: str | Path, size: int, device: torch.device | str, local_size: int | None = None) -> None:
    """Refuse, before any rank starts, a size the machine or the model cannot take: a GPU for each CUDA rank on
    this machine (`local_size` of the `size`, all of them when None), and every layer's heads and widths
    divisible as `ArchConfig.check_tensor_parallel` requires."""
    device, local = torch.device(device), local_size or size
    if device.type == "cuda" and torch.cuda.device_count() < local:
        gpus = torch.cuda.device_count()
        where = "" if local == size else f" ({local} of the {size} ranks run here)"
        raise UserError(f"--tensor-parallel-size {size} needs {local} GPUs on this machine{where}; it has {gpus}")
    try:
        ArchConfig.from_json(Path(checkpoint) / "config.json").check_tensor_parallel(size)
    except ConfigError as e:
        raise ConfigError(f"{checkpoint}: --tensor-parallel-size: {e}") from None


def generate_on_ranks(
    checkpoint: str | Path,
    prompts: list,
    params: SamplingParams,
    size: int,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    kv_cache_dtype: str = "auto",
) -> list[Completion]:
    """`Generator.generate` over `size` tensor-parallel ranks started here (`tessera generate
    --tensor-parallel-size`): every rank runs the same engine on the same requests over its shard, kept in step
    by the collectives, and samples from the same gathered logits, so they agree token for token; rank 0's
    completions are returned. Sampling without a seed gets one drawn here, so the ranks draw alike. Each rank
    reads only its parts of the checkpoint's files."""
    device = torch.device(device)
    check_ranks(checkpoint, size, device)
    args = (str(checkpoint), prompts, params.seeded(), device.type, dtype, kv_cache_dtype)
    return run_ranks(_generate_on_rank, size, *args, backend=backend_for(device))[0]


def generate_with_torchrun(
    launch: Launch,
    checkpoint: str | Path,
    prompts: list,
    params: SamplingParams,
    device: torch.device | str = "cpu",
    dtype="float32",
    kv_cache_dtype: str = "auto",
) -> list[Completion] | None:
    """`Generator.generate` as one of torchrun's ranks (`torchrun ... tessera generate`, one node or several):
    each rank joins torchrun's group, loads its shard and steps the same requests; rank 0's sampling seed is
    everyone's. Rank 0 gets the completions, the other ranks None."""
    device = torch.device(device)
    check_ranks(checkpoint, launch.size, device, launch.local)
    tp = join_group(launch.rank, launch.size, None, backend_for(device))
    try:
        params = tp.broadcast(params.seeded())
        completions = _generate_on_rank(tp, str(checkpoint), prompts, params, device.type, dtype, kv_cache_dtype)
        dist.barrier()  # no rank leaves while another's last collective is in flight
    finally:
        dist.destroy_process_group()
    return completions if launch.rank == 0 else None
