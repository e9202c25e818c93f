"""Child blocks initialised from the parent's weights, before any training (Puzzle §4.1).

- A narrower FFN keeps the parent's channels that contribute most on calibration text: channel i scores
  mean_tokens |silu(gate_i)·up_i| · ||W_down[:, i]||₂, and gate/up rows and down columns are sliced with the
  same top-k index set.
- Fewer KV heads: the K and V projection heads merged into one are averaged (contiguous groups, so query head
  j keeps reading the merge of the heads it read before), with their biases (Qwen2); per-head q/k norms
  (Qwen3) are shared by all heads and carry over. A window changes no weight: the parent's are copied.
- Linear attention is what attention becomes when every token attends only to itself: W_o · W_v, with the V
  heads repeated to the query heads (a V bias is dropped: the linear sublayer has none, BLD makes up for it).
  A linear FFN is W_down · W_up.
- Anything else the child shares with the parent (norms, the parent's own variants) is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import DecoderLayer, SwiGLU
from tessera.runtime.weights import FFN, INTER, Weight, attention_tables, pack, sublayer_kind, unpack


@torch.no_grad()
def ffn_channel_scores(layer: DecoderLayer, ffn_inputs: torch.Tensor) -> torch.Tensor:
    """Channel contribution [I] of a parent SwiGLU over calibration hidden states [N, H] (the FFN's input,
    before its norm): mean |silu(gate)·up| times the norm of the channel's column in W_down."""
    mlp = layer.mlp
    if not isinstance(mlp, SwiGLU):
        raise ValueError("channel scores need a SwiGLU FFN")
    x = layer.post_attention_layernorm(ffn_inputs.to(mlp.w_down.dtype))
    gate, up = F.linear(x, mlp.w_gate_up).float().chunk(2, dim=-1)
    activation = (F.silu(gate) * up).abs().mean(dim=0)  # [I]
    return activation * mlp.w_down.float().norm(dim=0)


def _parent_weights(
    arch: ArchConfig, parent: DecoderLayer, tables: dict[str, tuple[Weight, ...]]
) -> tuple[str, dict[str, torch.Tensor]]:
    """The parent's sublayer kind in `tables` (weights.ATTENTION or FFN) and its weights by role (views)."""
    params = dict(parent.named_parameters())
    kind = sublayer_kind(tables, params)
    return kind, unpack(tables[kind], params, arch)


def _attention_weights(arch: ArchConfig, parent: DecoderLayer, target: AttentionConfig) -> dict[str, torch.Tensor]:
    if target.kind == "none":
        return {}
    tables = attention_tables(arch)
    kind, w = _parent_weights(arch, parent, tables)
    if kind == "linear":
        if target.kind != "linear":
            raise ValueError(f"a linear parent attention cannot become {target.name}")
        return pack(tables["linear"], w)
    if kind == "none":
        raise ValueError(f"a parent layer without attention cannot become {target.name}")
    hq, d, h = arch.n_heads, arch.head_dim, arch.hidden_size
    hkv = w["k"].shape[0] // d
    if target.kind == "linear":
        v_per_query = w["v"].view(hkv, d, h).repeat_interleave(hq // hkv, dim=0).reshape(hq * d, h)
        return pack(tables["linear"], {"norm": w["norm"], "linear": w["o"] @ v_per_query})
    new = target.n_kv_heads
    if hkv % new:
        raise ValueError(f"{new} KV heads cannot be made by merging the parent's {hkv}")

    def merge(x: torch.Tensor) -> torch.Tensor:  # [Hkv·D, ...] -> [new·D, ...], contiguous groups averaged
        return x.view(new, hkv // new, d, *x.shape[1:]).mean(dim=1).reshape(new * d, *x.shape[1:])

    merged = {role: merge(w[role]) for role in ("k", "v", "k_bias", "v_bias") if role in w}
    return pack(tables["gqa"], {**w, **merged})


def _ffn_weights(
    arch: ArchConfig, parent: DecoderLayer, target: FFNConfig, scores: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    if target.kind == "none":
        return {}
    kind, w = _parent_weights(arch, parent, FFN)
    if kind == "linear":
        if target.kind != "linear":
            raise ValueError(f"a linear parent FFN cannot become {target.name}")
        return pack(FFN["linear"], w)
    if kind == "none":
        raise ValueError(f"a parent layer without an FFN cannot become {target.name}")
    if target.kind == "linear":
        return pack(FFN["linear"], {"norm": w["norm"], "linear": w["down"] @ w["up"]})
    width, full = target.intermediate_size, w["down"].shape[1]
    if width > full:
        raise ValueError(f"an FFN of width {width} cannot be pruned from the parent's {full}")
    if width == full:
        return pack(FFN["swiglu"], w)
    if scores is None:
        raise ValueError(f"pruning the FFN to width {width} needs channel scores from calibration activations")
    keep = scores.topk(width).indices.sort().values  # sorted: the kept channels stay in the parent's order
    # Every FFN-width axis (gate and up rows, down columns) keeps the same channels.
    kept = {x.role: w[x.role].index_select(x.axes.index(INTER), keep) for x in FFN["swiglu"] if INTER in x.axes}
    return pack(FFN["swiglu"], {**w, **kept})


@torch.no_grad()
def init_layer(
    arch: ArchConfig,
    parent: DecoderLayer,
    block: BlockConfig,
    layer_idx: int,
    channel_scores: torch.Tensor | None = None,
) -> DecoderLayer:
    """A child layer of the given block, its weights derived from the parent layer (on the parent's device
    and dtype). `channel_scores` (from ffn_channel_scores) is needed only when the FFN is narrowed."""
    ref = next(parent.parameters())
    state = {
        **_attention_weights(arch, parent, block.attention),
        **_ffn_weights(arch, parent, block.ffn, channel_scores),
    }
    layer = DecoderLayer(arch, block, layer_idx).to(device=ref.device, dtype=ref.dtype)
    layer.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return layer
