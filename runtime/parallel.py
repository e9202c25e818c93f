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

Each sublayer's output is a partial sum, made whole by one all-reduce (the residual is added on rank 0 only,
before it). The rank's model is an ordinary `Model` of a rank-local `ArchConfig` (fewer heads, narrower
FFNs, its vocabulary rows), so its KV cache holds only its KV heads and every kernel runs unchanged.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, ConfigError, FFNConfig
from tessera.devices import parse_dtype
from tessera.errors import UserError
from tessera.runtime.generate import Generator
from tessera.runtime.loader import load_model
from tessera.runtime.model import GQAAttention, LinearSublayer, Model, SwiGLU
from tessera.runtime.sampling import Completion, SamplingParams, load_tokenizer


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks, and the collectives a sharded model calls."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """[..., widths[rank]] on every rank -> [..., sum(widths)], rank order. Shares of unequal width travel
        padded to the widest (collectives move equal sizes)."""
        wide = max(widths)
        padded = torch.nn.functional.pad(x, (0, wide - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[..., :w] for part, w in zip(parts, widths)], dim=-1)


def share(total: int, rank: int, size: int) -> range:
    """Rank's contiguous share of `total` rows: the larger shares first (ceil), the last may be shorter."""
    step = -(-total // size)
    return range(min(total, rank * step), min(total, (rank + 1) * step))


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


def _rows(x: torch.Tensor, rows: range) -> torch.Tensor:
    return x[rows.start : rows.stop]


def _attention_rows(arch: ArchConfig, n_kv: int, rank: int, size: int) -> tuple[range, range]:
    """The rank's query rows and KV rows (in units of head_dim rows) of a GQA layer with n_kv heads."""
    d, hq = arch.head_dim, arch.n_heads // size
    q = range(rank * hq * d, (rank + 1) * hq * d)
    if n_kv >= size:
        kv_heads = n_kv // size
        kv = range(rank * kv_heads * d, (rank + 1) * kv_heads * d)
    else:  # one head, the one this rank's query heads read
        head = rank // (size // n_kv)
        kv = range(head * d, (head + 1) * d)
    return q, kv


def shard_model(model: Model, tp: TensorParallel) -> Model:
    """Rank tp.rank's shard of `model` (its device and dtype), wired to all-reduce and gather through `tp`."""
    arch, rank, size = model.arch, tp.rank, tp.size
    local_arch = rank_arch(arch, rank, size)
    weight = model.embed_tokens.weight
    local = Model.empty(local_arch, weight.device, weight.dtype)
    vocab = share(arch.vocab_size, rank, size)
    with torch.no_grad():
        local.embed_tokens.weight.copy_(_rows(weight, vocab))
        local.norm.weight.copy_(model.norm.weight)
        if local.lm_head is not None:
            local.lm_head.copy_(_rows(model.lm_head, vocab))
        for full, part, block in zip(model.layers, local.layers, arch.blocks):
            _shard_layer(arch, full, part, block, tp)
    local.tp, local.vocab_rows = tp, vocab
    local.vocab_widths = [len(share(arch.vocab_size, r, size)) for r in range(size)]
    return local.eval()


def _shard_layer(arch: ArchConfig, full: nn.Module, part: nn.Module, block: BlockConfig, tp: TensorParallel) -> None:
    rank, size = tp.rank, tp.size
    for name in ("input_layernorm", "post_attention_layernorm"):
        if getattr(full, name) is not None:
            getattr(part, name).weight.copy_(getattr(full, name).weight)
    attn, mine = full.self_attn, part.self_attn
    if isinstance(attn, GQAAttention):
        q_dim, kv_dim = arch.n_heads * arch.head_dim, block.attention.n_kv_heads * arch.head_dim
        q, kv = _attention_rows(arch, block.attention.n_kv_heads, rank, size)
        k = range(q_dim + kv.start, q_dim + kv.stop)
        v = range(q_dim + kv_dim + kv.start, q_dim + kv_dim + kv.stop)
        mine.w_qkv.copy_(torch.cat([_rows(attn.w_qkv, r) for r in (q, k, v)]))
        if attn.b_qkv is not None:
            mine.b_qkv.copy_(torch.cat([_rows(attn.b_qkv, r) for r in (q, k, v)]))
        if attn.q_norm is not None:
            mine.q_norm.weight.copy_(attn.q_norm.weight)
            mine.k_norm.weight.copy_(attn.k_norm.weight)
        mine.w_o.copy_(attn.w_o[:, q.start : q.stop])
        mine.tp = tp
    elif isinstance(attn, LinearSublayer):
        _shard_linear(attn, mine, tp)
    mlp, mine = full.mlp, part.mlp
    if isinstance(mlp, SwiGLU):
        width = mlp.w_down.shape[1]
        cols = share(width, rank, size)
        mine.w_gate_up.copy_(torch.cat([_rows(mlp.w_gate_up, cols), _rows(mlp.w_gate_up[width:], cols)]))
        mine.w_down.copy_(mlp.w_down[:, cols.start : cols.stop])
        mine.tp = tp
    elif isinstance(mlp, LinearSublayer):
        _shard_linear(mlp, mine, tp)


def _shard_linear(full: LinearSublayer, part: LinearSublayer, tp: TensorParallel) -> None:
    cols = share(full.weight.shape[1], tp.rank, tp.size)
    part.weight = nn.Parameter(full.weight[:, cols.start : cols.stop].clone(), requires_grad=False)
    part.cols, part.tp = slice(cols.start, cols.stop), tp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, backend: str, fn: Callable, args: tuple, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.save(fn(TensorParallel(rank, size), *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, size: int, *args: object, backend: str = "gloo") -> list[object]:
    """fn(tp, *args) in `size` processes of one process group on this machine (spawned, torch.distributed
    initialised over a free local port); each rank's result, in rank order. `fn` must be a module-level
    function (it is pickled by name)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(size, _free_port(), backend, fn, args, out), nprocs=size, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(size)]


def shard_logits(tp: TensorParallel, checkpoint: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of `ids` through this rank's shard of a checkpoint (tests, and a first check of a
    tensor-parallel setup)."""
    with torch.no_grad():
        return shard_model(load_model(checkpoint), tp)(ids)


def _generate_on_rank(
    tp: TensorParallel, checkpoint: str, prompts: list, params: SamplingParams, device: str, dtype: str
) -> list[Completion]:
    dev = torch.device(f"cuda:{tp.rank}") if device == "cuda" else torch.device(device)
    model = shard_model(load_model(checkpoint, device=dev, dtype=parse_dtype(dtype)), tp)
    tokenizer = load_tokenizer(checkpoint) if any(isinstance(p, str) for p in prompts) or params.stop else None
    return Generator(model, tokenizer).generate(prompts, params)


def generate_on_ranks(
    checkpoint: str | Path,
    prompts: list,
    params: SamplingParams,
    size: int,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> list[Completion]:
    """`Generator.generate` over `size` tensor-parallel ranks started here (`tessera generate
    --tensor-parallel-size`): every rank runs the same engine on the same requests over its shard, kept in step
    by the collectives, and samples from the same gathered logits, so they agree token for token; rank 0's
    completions are returned. Sampling without a seed gets one drawn here, so the ranks draw alike. Each rank
    loads the whole checkpoint and keeps its shard (loading only its slices is not built yet)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        gpus = torch.cuda.device_count()
        raise UserError(f"--tensor-parallel-size {size} needs {size} GPUs; this machine has {gpus}")
    try:
        ArchConfig.from_json(Path(checkpoint) / "config.json").check_tensor_parallel(size)
    except ConfigError as e:
        raise ConfigError(f"{checkpoint}: --tensor-parallel-size: {e}") from None
    if params.temperature > 0 and params.seed is None:
        params = replace(params, seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    results = run_ranks(_generate_on_rank, size, str(checkpoint), prompts, params, device.type, dtype, backend=backend)
    return results[0]
