"""Hugging Face weight names and tessera's packed parameters: the one table (STYLE 13).

On disk weights keep Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...) so a tessera child
loads in vLLM or transformers; in memory q/k/v and gate/up are packed into one matrix each so each sublayer
is one GEMM in (runtime/model.py). This table says, per sublayer kind, which Hugging Face tensors it has, the
tessera parameter each is packed into and its shape, as vLLM's `stacked_params_mapping` and gpt-fast's
`weight_map` do. Everything that needs names or packing reads it: the loader's shape check, loading
(`pack`), saving (`unpack`), FFN Fusion (concatenates along the FFN-width axis) and the search's child
initialisation (works on q, k, v, gate, up, down by role).

Each `Weight` is (role, Hugging Face name, tessera parameter, axes). Weights sharing a parameter sit next to
each other and are stacked along its rows in table order, which is the order the forward slices them in
(q, k, v; gate, up; tests/test_model.py checks the forward against one written on Hugging Face names):
packing is `torch.cat`, unpacking a split by each weight's rows. A no-op sublayer has no weights, not even
its norm (DESIGN.md). A fused FFN-Fusion group is an ordinary (wider) SwiGLU here.

Axes are named, not sized: `HIDDEN`, `Q` (query heads × head_dim), `KV` (the layer's KV heads × head_dim),
`INTER` (the layer's FFN width), `VOCAB`, `HEAD` (head_dim). A matrix's last axis is its input: each matrix
whose input is `HIDDEN` reads its sublayer's normed input (fusion folds the norm weight into those).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby

import torch

from tessera.config import ArchConfig, BlockConfig

HIDDEN, Q, KV, INTER, VOCAB, HEAD = "hidden", "q", "kv", "inter", "vocab", "head"
ONE = "one"  # an FP8 scale's column: `<name>.weight_scale` is [rows, 1] on disk, [rows] in memory
SCALAR = "scalar"  # a per-tensor scale: [1] on disk and in memory
WEIGHT_SCALE = ".weight_scale"  # how an FP8 matrix's scale's Hugging Face name ends (`with_fp8_scales`)


@dataclass(frozen=True)
class Weight:
    role: str  # what search code calls it within its sublayer: "q", "gate", "norm", ...
    hf: str  # Hugging Face name under the layer (`model.layers.{i}.`), or the whole name for model-level ones
    param: str  # the tessera parameter it lives in, under the layer (`layers.{i}.`) or the model
    axes: tuple[str, ...]  # named sizes, rows first

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(sizes[a] for a in self.axes)


ATTENTION: dict[str, tuple[Weight, ...]] = {
    "gqa": (
        Weight("norm", "input_layernorm.weight", "input_layernorm.weight", (HIDDEN,)),
        Weight("q", "self_attn.q_proj.weight", "self_attn.w_qkv", (Q, HIDDEN)),
        Weight("k", "self_attn.k_proj.weight", "self_attn.w_qkv", (KV, HIDDEN)),
        Weight("v", "self_attn.v_proj.weight", "self_attn.w_qkv", (KV, HIDDEN)),
        Weight("o", "self_attn.o_proj.weight", "self_attn.w_o", (HIDDEN, Q)),
    ),
    "linear": (
        Weight("norm", "input_layernorm.weight", "input_layernorm.weight", (HIDDEN,)),
        Weight("linear", "self_attn.linear_attn.weight", "self_attn.weight", (HIDDEN, HIDDEN)),
    ),
    "none": (),
}

# A GQA layer's FP8 KV-cache scales (ArchConfig.kv_cache_scales): buffers, not parameters, so only the
# checkpoint's tables (`sublayers`) list them, as the FP8 weight scales.
KV_SCALES = (
    Weight("key_cache_scale", "self_attn.k_scale", "self_attn.k_scale", (SCALAR,)),
    Weight("value_cache_scale", "self_attn.v_scale", "self_attn.v_scale", (SCALAR,)),
)
KV_SCALE_NAMES = tuple(w.hf for w in KV_SCALES)  # how their names end, under a layer (the same in tessera)

# What the families add to a GQA attention (ArchConfig.qkv_bias, .qk_norm): attention_tables() puts them in.
QKV_BIAS = (
    Weight("q_bias", "self_attn.q_proj.bias", "self_attn.b_qkv", (Q,)),
    Weight("k_bias", "self_attn.k_proj.bias", "self_attn.b_qkv", (KV,)),
    Weight("v_bias", "self_attn.v_proj.bias", "self_attn.b_qkv", (KV,)),
)
QK_NORM = (
    Weight("q_norm", "self_attn.q_norm.weight", "self_attn.q_norm.weight", (HEAD,)),
    Weight("k_norm", "self_attn.k_norm.weight", "self_attn.k_norm.weight", (HEAD,)),
)


def attention_tables(arch: ArchConfig) -> dict[str, tuple[Weight, ...]]:
    """ATTENTION for `arch`'s family: a GQA attention with its biases and q/k norms when the family has them."""
    gqa = ATTENTION["gqa"]
    extras = (QKV_BIAS if arch.qkv_bias else ()) + (QK_NORM if arch.qk_norm else ())
    return {**ATTENTION, "gqa": gqa[:4] + extras + gqa[4:]}


FFN: dict[str, tuple[Weight, ...]] = {
    "swiglu": (
        Weight("norm", "post_attention_layernorm.weight", "post_attention_layernorm.weight", (HIDDEN,)),
        Weight("gate", "mlp.gate_proj.weight", "mlp.w_gate_up", (INTER, HIDDEN)),
        Weight("up", "mlp.up_proj.weight", "mlp.w_gate_up", (INTER, HIDDEN)),
        Weight("down", "mlp.down_proj.weight", "mlp.w_down", (HIDDEN, INTER)),
    ),
    "linear": (
        Weight("norm", "post_attention_layernorm.weight", "post_attention_layernorm.weight", (HIDDEN,)),
        Weight("linear", "mlp.linear_mlp.weight", "mlp.weight", (HIDDEN, HIDDEN)),
    ),
    "none": (),
}

EMBEDDINGS = (
    Weight("embed", "model.embed_tokens.weight", "embed_tokens.weight", (VOCAB, HIDDEN)),
    Weight("norm", "model.norm.weight", "norm.weight", (HIDDEN,)),
)
LM_HEAD = Weight("head", "lm_head.weight", "lm_head", (VOCAB, HIDDEN))  # absent when tied to the embedding


def sizes(arch: ArchConfig, block: BlockConfig | None = None) -> dict[str, int]:
    """Axis sizes: the model-wide ones, and with `block` that layer's KV and FFN widths."""
    out = {HIDDEN: arch.hidden_size, Q: arch.n_heads * arch.head_dim, VOCAB: arch.vocab_size, HEAD: arch.head_dim}
    out[ONE] = out[SCALAR] = 1
    if block is not None:
        if block.attention.kind == "gqa":
            out[KV] = block.attention.n_kv_heads * arch.head_dim
        if block.ffn.kind == "swiglu":
            out[INTER] = block.ffn.intermediate_size
    return out


def sublayers(arch: ArchConfig) -> Iterator[tuple[str, str, tuple[Weight, ...], BlockConfig | None]]:
    """(Hugging Face prefix, tessera prefix, table, block) for each part of the model, in checkpoint order.
    The order is the order tensors are written in, so it decides which shard each lands in: keep it."""
    yield "", "", EMBEDDINGS if arch.tie_embeddings else (*EMBEDDINGS, LM_HEAD), None
    attention = attention_tables(arch)
    scaled = with_fp8_scales if arch.quantization == "fp8" else tuple
    for i, block in enumerate(arch.blocks):
        hf, param = f"model.layers.{i}.", f"layers.{i}."
        kv_scales = KV_SCALES if arch.kv_cache_scales and block.attention.kind == "gqa" else ()
        yield hf, param, scaled(attention[block.attention.kind]) + kv_scales, block
        yield hf, param, scaled(FFN[block.ffn.kind]), block


def with_fp8_scales(table: Sequence[Weight]) -> tuple[Weight, ...]:
    """A layer's table with each matrix's FP8 scale (`<hf>_scale`, packed like the matrix's rows into
    `<param>_scale`) after the matrices of each parameter. The LM head has none on disk: an FP8 checkpoint keeps
    it in the compute dtype, as vLLM reads it (Model.to_fp8 quantizes it after loading)."""
    out: list[Weight] = []
    for param, group in _by_param(table):
        out += group
        if len(group[0].axes) == 2:
            out += [Weight(f"{w.role}_scale", f"{w.hf}_scale", f"{param}_scale", (w.axes[0], ONE)) for w in group]
    return tuple(out)


def sublayer_kind(tables: Mapping[str, tuple[Weight, ...]], params: Mapping[str, torch.Tensor]) -> str:
    """Which kind of `tables` (ATTENTION or FFN) a layer's parameters (`named_parameters()`) hold."""
    return next((k for k, table in tables.items() if table and all(w.param in params for w in table)), "none")


def _by_param(table: Sequence[Weight]) -> list[tuple[str, list[Weight]]]:
    """The table's parameters in order, each with the weights packed into it (adjacent in the table)."""
    return [(param, list(group)) for param, group in groupby(table, key=lambda w: w.param)]


def pack(table: Sequence[Weight], parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Role -> tensor (every role of `table`) to tessera parameter -> tensor: weights sharing a parameter
    stacked along its rows. A parameter of one weight is that tensor itself, not a copy."""
    out = {}
    for param, group in _by_param(table):
        stacked = [parts[w.role] for w in group]
        out[param] = stacked[0] if len(stacked) == 1 else torch.cat(stacked)
    return out


def unpack(table: Sequence[Weight], params: Mapping[str, torch.Tensor], arch: ArchConfig) -> dict[str, torch.Tensor]:
    """Tessera parameter -> tensor (e.g. a layer's `named_parameters()`) to role -> view of it.

    Only model-wide sizes are needed: a packed parameter holds one per-layer size (w_qkv: q + 2·kv rows,
    w_gate_up: 2·inter), which is the rows the model-wide ones leave, so a bare layer unpacks too."""
    known, out = sizes(arch), {}
    for param, group in _by_param(table):
        packed = params[param]
        if len(group) == 1:
            out[group[0].role] = packed
            continue
        rows = [w.axes[0] for w in group]
        (layer_axis,) = {a for a in rows if a not in known}
        rest = packed.shape[0] - sum(known[a] for a in rows if a in known)
        split = {**known, layer_axis: rest // rows.count(layer_axis)}
        out.update(zip((w.role for w in group), packed.split([split[a] for a in rows])))
    return out


def hf_weight_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this architecture holds, by Hugging Face name, in checkpoint order."""
    return {hf + w.hf: w.shape(sizes(arch, block)) for hf, _, table, block in sublayers(arch) for w in table}


def pack_model(arch: ArchConfig, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face-named tensors (extra ones ignored) -> (state-dict name, tensor), q/k/v and gate/up packed.
    Lazy, one sublayer at a time: a loader copying each into place holds one packed temporary, never a
    second copy of the model (70B in bf16 would need 140 GB more)."""
    for hf, param, table, _ in sublayers(arch):
        packed = pack(table, {w.role: tensors[hf + w.hf] for w in table})
        yield from ((param + name, t) for name, t in packed.items())


def unpack_model(arch: ArchConfig, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters (`named_parameters()`) -> Hugging Face-named views, in checkpoint order."""
    out = {}
    for hf, param, table, _ in sublayers(arch):
        parts = unpack(table, {w.param: params[param + w.param] for w in table}, arch)
        # a scale is [rows] in memory, [rows, 1] on disk
        out.update((hf + w.hf, parts[w.role].unsqueeze(-1) if w.axes[-1] == ONE else parts[w.role]) for w in table)
    return out
