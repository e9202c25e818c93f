"""Putting chosen blocks together: a child layer from the parent and the BLD store, and a whole child model.

A layer's attention half and FFN half come from the parent when the block keeps the parent's variant, from
the sublayer store (BLD-trained) otherwise, and from nowhere when they are no-ops. The embedding, final norm
and LM head are the parent's. The result is an ordinary runtime `Model`, saved as a nemotron-nas checkpoint.
"""

from __future__ import annotations

import torch

from tessera.config import BlockConfig
from tessera.runtime.model import DecoderLayer, Model
from tessera.runtime.weights import KV_SCALE_NAMES
from tessera.search.bld import SublayerStore, layer_from_parts, sublayer_state


def layer_state(parent: Model, store: SublayerStore, layer_idx: int, block: BlockConfig) -> dict[str, torch.Tensor]:
    parent_layer, parent_block = parent.layers[layer_idx], parent.arch.blocks[layer_idx]
    state: dict[str, torch.Tensor] = {}
    for part, mine, theirs in (
        ("attention", block.attention, parent_block.attention),
        ("ffn", block.ffn, parent_block.ffn),
    ):
        if mine.kind == "none":
            continue
        state.update(sublayer_state(parent_layer, part) if mine == theirs else store.load(layer_idx, mine.name))
    # A child carries no FP8 KV-cache scales (ArchConfig.with_blocks): the parent's were calibrated on its own
    # keys and values, so a calibrated parent's are left behind.
    return {k: v for k, v in state.items() if not k.endswith(KV_SCALE_NAMES)}


def build_layer(parent: Model, store: SublayerStore, layer_idx: int, block: BlockConfig) -> DecoderLayer:
    """The child layer `block` at `layer_idx`, on the parent's device and dtype."""
    like = parent.embed_tokens.weight
    return layer_from_parts(parent.arch, block, layer_idx, layer_state(parent, store, layer_idx, block), like)


@torch.no_grad()
def assemble_child(parent: Model, store: SublayerStore, blocks: list[BlockConfig]) -> Model:
    """The child model with one chosen block per parent layer (eval mode, the parent's device and dtype)."""
    if len(blocks) != parent.arch.n_layers:
        raise ValueError(f"the child needs one block per parent layer ({parent.arch.n_layers}), got {len(blocks)}")
    like = parent.embed_tokens.weight
    child = Model.empty(parent.arch.with_blocks(blocks), like.device, like.dtype)
    child.embed_tokens.weight.copy_(parent.embed_tokens.weight)
    child.norm.weight.copy_(parent.norm.weight)
    if child.lm_head is not None:
        child.lm_head.copy_(parent.lm_head)
    for i, block in enumerate(blocks):
        child.layers[i].load_state_dict(layer_state(parent, store, i, block))
    return child.eval()
