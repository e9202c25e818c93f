"""Checkpoints: Hugging Face Llama and nemotron-nas (config.json + safetensors), read and written.

Weights keep Hugging Face names on disk (`model.layers.{i}.self_attn.q_proj.weight`, ...,
`self_attn.linear_attn.weight`, `mlp.linear_mlp.weight`) so a tessera child loads in vLLM or transformers
and a Hugging Face parent loads here. At load, q/k/v and gate/up are packed into one matrix each; at
save they are split back. Every name, shape and file is checked before anything is built: a missing,
extra or mis-shaped tensor is a one-line `CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tessera.config import ArchConfig, ConfigError
from tessera.runtime.model import GQAAttention, Model, SwiGLU

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match its config.json; the message names which."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def hf_weight_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this architecture holds, by Hugging Face name."""
    h, q_dim = arch.hidden_size, arch.n_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i, block in enumerate(arch.blocks):
        p = f"model.layers.{i}."
        att, ffn = block.attention, block.ffn
        if att.kind != "none":
            shapes[p + "input_layernorm.weight"] = (h,)
        if att.kind == "gqa":
            kv_dim = att.n_kv_heads * arch.head_dim
            shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        elif att.kind == "linear":
            shapes[p + "self_attn.linear_attn.weight"] = (h, h)
        if ffn.kind != "none":
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        if ffn.kind == "swiglu":
            width = ffn.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (width, h)
            shapes[p + "mlp.up_proj.weight"] = (width, h)
            shapes[p + "mlp.down_proj.weight"] = (h, width)
        elif ffn.kind == "linear":
            shapes[p + "mlp.linear_mlp.weight"] = (h, h)
    return shapes


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index, single = path / _INDEX, path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {shard.name} is listed but missing from {path}")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(sorted(f.keys()), single)
    raise CheckpointError(f"{path}: no model.safetensors or {_INDEX} (expected a Hugging Face checkpoint)")


def read_hf_tensors(path: str | Path, arch: ArchConfig) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at `path`, checked against `arch` (names and shapes)."""
    path = Path(path)
    files = _weight_files(path)
    expected = hf_weight_shapes(arch)
    if arch.tie_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    files = {n: f for n, f in files.items() if not n.endswith("rotary_emb.inv_freq")}  # old HF buffers
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing{more}; config.json says it should exist")
    extra = sorted(set(files) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{files[extra[0]]}: unexpected tensor {extra[0]}{more} for the architecture in config.json"
        )
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{file}: tensor {name} is listed in {_INDEX} but not stored in this shard")
                t = f.get_tensor(name)
                if tuple(t.shape) != expected[name]:
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}"
                    )
                if not t.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {name} is {t.dtype}, expected a floating-point dtype")
                tensors[name] = t
    return tensors


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")  # parses the header: a truncated file fails here
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_hf_state(model: Model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy Hugging Face-named tensors into the model, packing q/k/v and gate/up."""
    p = "model.layers."
    with torch.no_grad():
        model.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
        model.norm.weight.copy_(tensors["model.norm.weight"])
        if model.lm_head is not None:
            model.lm_head.copy_(tensors["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            if layer.input_layernorm is not None:
                layer.input_layernorm.weight.copy_(tensors[f"{p}{i}.input_layernorm.weight"])
            if isinstance(layer.self_attn, GQAAttention):
                a = f"{p}{i}.self_attn."
                qkv = [tensors[a + f"{n}_proj.weight"] for n in "qkv"]
                layer.self_attn.w_qkv.copy_(torch.cat(qkv))
                layer.self_attn.w_o.copy_(tensors[a + "o_proj.weight"])
            elif layer.self_attn is not None:
                layer.self_attn.weight.copy_(tensors[f"{p}{i}.self_attn.linear_attn.weight"])
            if layer.post_attention_layernorm is not None:
                layer.post_attention_layernorm.weight.copy_(tensors[f"{p}{i}.post_attention_layernorm.weight"])
            if isinstance(layer.mlp, SwiGLU):
                m = f"{p}{i}.mlp."
                layer.mlp.w_gate_up.copy_(torch.cat([tensors[m + "gate_proj.weight"], tensors[m + "up_proj.weight"]]))
                layer.mlp.w_down.copy_(tensors[m + "down_proj.weight"])
            elif layer.mlp is not None:
                layer.mlp.weight.copy_(tensors[f"{p}{i}.mlp.linear_mlp.weight"])


def hf_state(model: Model) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (q/k/v and gate/up split back apart)."""
    arch = model.arch
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        if layer.input_layernorm is not None:
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        if isinstance(layer.self_attn, GQAAttention):
            att = layer.self_attn
            q_dim, kv_dim = arch.n_heads * arch.head_dim, att.n_kv_heads * arch.head_dim
            q, k, v = att.w_qkv.split((q_dim, kv_dim, kv_dim))
            out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k})
            out.update({p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": att.w_o})
        elif layer.self_attn is not None:
            out[p + "self_attn.linear_attn.weight"] = layer.self_attn.weight
        if layer.post_attention_layernorm is not None:
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        if isinstance(layer.mlp, SwiGLU):
            gate, up = layer.mlp.w_gate_up.chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
            out[p + "mlp.down_proj.weight"] = layer.mlp.w_down
        elif layer.mlp is not None:
            out[p + "mlp.linear_mlp.weight"] = layer.mlp.weight
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load a Hugging Face Llama or nemotron-nas checkpoint directory as a tessera `Model` in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint with config.json and safetensors)")
    try:
        arch = ArchConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    tensors = read_hf_tensors(path, arch)
    model = Model.empty(arch, device, dtype)
    load_hf_state(model, tensors)
    return model.eval()


def save_model(
    model: Model,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) in HF format.

    The config is LlamaForCausalLM when every layer is the same full block, else nemotron-nas. Tokenizer
    files are copied from `tokenizer_from` when given.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to(dtype or t.dtype).contiguous().cpu() for n, t in hf_state(model).items()}
    stored = next(iter(tensors.values())).dtype
    arch_name = {v: k for k, v in _DTYPES.items()}[stored]
    replace(model.arch, dtype=arch_name).save_json(path / "config.json")
    for old in [*path.glob("model*.safetensors"), path / _INDEX]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file() and src.resolve() != (path / name).resolve():
                shutil.copy(src, path / name)
    return path
