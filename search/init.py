"""Child blocks initialised from the parent's weights, before any training (Puzzle §4.1).

- A narrower FFN keeps the parent's channels that contribute most on calibration text: channel i scores
  mean_tokens |silu(gate_i)·up_i| · ||W_down[:, i]||₂, and gate/up rows and down columns are sliced with the
  same top-k index set.
- Fewer KV heads: the K and V projection heads merged into one are averaged (contiguous groups, so query head
  j keeps reading the merge of the heads it read before).
- Linear attention is what attention becomes when every token attends only to itself: W_o · W_v, with the V
  heads repeated to the query heads. A linear FFN is W_down · W_up.
- Anything else the child shares with the parent (norms, the parent's own variants) is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import DecoderLayer, GQAAttention, LinearSublayer, SwiGLU


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


def _attention_weights(arch: ArchConfig, parent: DecoderLayer, target: AttentionConfig) -> dict[str, torch.Tensor]:
    att = parent.self_attn
    if target.kind == "none":
        return {}
    out = {"input_layernorm.weight": parent.input_layernorm.weight}
    if isinstance(att, LinearSublayer):
        if target.kind != "linear":
            raise ValueError(f"a linear parent attention cannot become {target.name}")
        return {**out, "self_attn.weight": att.weight}
    if not isinstance(att, GQAAttention):
        raise ValueError(f"a parent layer without attention cannot become {target.name}")
    hq, hkv, d, h = arch.n_heads, att.n_kv_heads, arch.head_dim, arch.hidden_size
    q, k, v = att.w_qkv.split((hq * d, hkv * d, hkv * d))
    if target.kind == "linear":
        v_per_query = v.view(hkv, d, h).repeat_interleave(hq // hkv, dim=0).reshape(hq * d, h)
        return {**out, "self_attn.weight": att.w_o @ v_per_query}
    new = target.n_kv_heads
    if hkv % new:
        raise ValueError(f"{new} KV heads cannot be made by merging the parent's {hkv}")

    def merge(w: torch.Tensor) -> torch.Tensor:  # [Hkv·D, H] -> [new·D, H], contiguous groups averaged
        return w.view(new, hkv // new, d, h).mean(dim=1).reshape(new * d, h)

    return {**out, "self_attn.w_qkv": torch.cat([q, merge(k), merge(v)]), "self_attn.w_o": att.w_o}


def _ffn_weights(parent: DecoderLayer, target: FFNConfig, scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
    mlp = parent.mlp
    if target.kind == "none":
        return {}
    out = {"post_attention_layernorm.weight": parent.post_attention_layernorm.weight}
    if isinstance(mlp, LinearSublayer):
        if target.kind != "linear":
            raise ValueError(f"a linear parent FFN cannot become {target.name}")
        return {**out, "mlp.weight": mlp.weight}
    if not isinstance(mlp, SwiGLU):
        raise ValueError(f"a parent layer without an FFN cannot become {target.name}")
    gate, up = mlp.w_gate_up.chunk(2)
    if target.kind == "linear":
        return {**out, "mlp.weight": mlp.w_down @ up}
    width, full = target.intermediate_size, mlp.w_down.shape[1]
    if width > full:
        raise ValueError(f"an FFN of width {width} cannot be pruned from the parent's {full}")
    if width == full:
        return {**out, "mlp.w_gate_up": mlp.w_gate_up, "mlp.w_down": mlp.w_down}
    if scores is None:
        raise ValueError(f"pruning the FFN to width {width} needs channel scores from calibration activations")
    keep = scores.topk(width).indices.sort().values  # sorted: the kept channels stay in the parent's order
    return {**out, "mlp.w_gate_up": torch.cat([gate[keep], up[keep]]), "mlp.w_down": mlp.w_down[:, keep]}


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
    state = {**_attention_weights(arch, parent, block.attention), **_ffn_weights(parent, block.ffn, channel_scores)}
    layer = DecoderLayer(arch, block, layer_idx).to(device=ref.device, dtype=ref.dtype)
    layer.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return layer
