"""Checkpoints: Hugging Face Llama, Qwen2, Qwen3, Mistral and nemotron-nas, and tessera's own format for
heterogeneous children of the other families (config.json + safetensors), read and written.

Weights keep Hugging Face names on disk (`model.layers.{i}.self_attn.q_proj.weight`, ...,
`self_attn.linear_attn.weight`, `mlp.linear_mlp.weight`) so a tessera child loads in vLLM or transformers
and a Hugging Face parent loads here. At load, q/k/v and gate/up are packed into one matrix each; at
save they are split back; names, shapes and packing come from the table in runtime/weights.py. Every
name, shape and file is checked before anything is built: a missing, extra or mis-shaped tensor is a
one-line `CheckpointError` naming the file and tensor. So are a malformed shard index, 8-bit float tensors
beside wider ones (a quantised checkpoint whose scales tessera does not read) and NaN or inf values (one
cheap reduction per tensor as it is read).

Saves are atomic (STYLE 15): `save_model` writes a whole checkpoint into a directory beside the target and
swaps it in with renames, so a full disk or a crash mid-save never loses the old checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tessera import hf_config
from tessera.config import ArchConfig, ConfigError, dtype_bytes, json_excerpt, read_json
from tessera.devices import available_memory, check_fp8, dtype_name
from tessera.errors import UserError
from tessera.files import atomic_write_text, default_mode, replaced_folder
from tessera.kernels import FP8, dequantize_weight
from tessera.kernels.fp8 import FP8_MAX, check_kv_scale_values
from tessera.runtime.model import Model
from tessera.runtime.weights import LM_HEAD, WEIGHT_SCALE, hf_weight_shapes, pack_model, unpack_model

# What a checkpoint carries beside its weights and config that a child or a copy keeps: the tokenizer (tessera reads
# tokenizer.json; the rest serve other runtimes' tokenizers), its chat template (transformers >= 4.43 writes it to
# chat_template.jinja) and generation defaults (the end-of-turn ids among them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_INDEX = "model.safetensors.index.json"
# safetensors header dtype -> torch dtype, for checking dtypes from headers before any tensor is read.
_STORED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(UserError):
    """A checkpoint whose files or tensors do not match its config.json; the message names which."""


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index, single = path / _INDEX, path / "model.safetensors"
    if index.is_file():
        data = read_json(index, "a safetensors index", CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index}: weight_map: expected an object mapping tensor names to shard files, "
                f"got {json_excerpt(weight_map)}"
            )
        for name, shard in weight_map.items():
            # A bare file name: "../x.safetensors" or "/x" would read outside the checkpoint.
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(
                    f"{index}: weight_map[{json_excerpt(name)}]: expected a shard file name in {path}, "
                    f"got {json_excerpt(shard)}"
                )
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {shard.name} is listed but missing from {path}")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(sorted(f.keys()), single)
    raise CheckpointError(f"{path}: no model.safetensors or {_INDEX} (expected a Hugging Face checkpoint)")


def read_hf_tensors(
    path: str | Path,
    arch: ArchConfig,
    dtype: torch.dtype | None = None,
    part: Callable[[str, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at `path`, checked against `arch` (names, shapes, dtypes) and for NaN
    and inf; with `dtype`, also that every value fits in it (a weight of 1e5 is inf in float16). With `part`,
    only part of each tensor is read: part(name, lazy) indexes a safetensors slice as a tensor would be
    (a tensor-parallel rank's shard, runtime/parallel.py)."""
    path = Path(path)
    files = _weight_files(path)
    expected = hf_weight_shapes(arch)
    if arch.tie_embeddings:
        files.pop(LM_HEAD.hf, None)  # some tied checkpoints store the copy anyway
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
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    # Headers first: every name, shape and dtype is checked before a byte of tensor data is read.
    dtypes: dict[str, torch.dtype] = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{file}: tensor {name} is listed in {_INDEX} but not stored in this shard")
                info = f.get_slice(name)
                shape, kind = tuple(info.get_shape()), info.get_dtype()
                if shape != expected[name]:
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected {expected[name]}")
                stored_dtype = _STORED_DTYPES.get(kind)
                if stored_dtype is None or not stored_dtype.is_floating_point:
                    raise CheckpointError(
                        f"{file}: tensor {name} is {stored_dtype or kind}, expected a floating-point dtype"
                    )
                dtypes[name] = stored_dtype
    _check_dtype_mix(dtypes, files, arch)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
            for name in names:
                t = f.get_tensor(name) if part is None else part(name, f.get_slice(name))
                _check_values(t, name, file, dtype)
                tensors[name] = t
    return tensors


def _check_dtype_mix(dtypes: dict[str, torch.dtype], files: dict[str, Path], arch: ArchConfig) -> None:
    """In an FP8 checkpoint (config.json's quantization_config), each matrix with a scale is E4M3 and everything
    else wider. Otherwise 8-bit floats beside wider ones are a quantised checkpoint whose config does not say
    so, or a scheme tessera does not read: loaded as they are, the fp8 weights would be silently wrong. Wider
    floats may mix (fp32 norms beside bf16 matrices are common; each is cast to the run dtype)."""
    if arch.quantization == "fp8":
        quantized = {n.removesuffix("_scale") for n in dtypes if n.endswith(WEIGHT_SCALE)}
        for name, dtype in dtypes.items():
            if (dtype == FP8) != (name in quantized):
                want = "float8_e4m3fn (it has a weight_scale)" if name in quantized else "a 16- or 32-bit float"
                raise CheckpointError(
                    f"{files[name]}: tensor {name} is {dtype_name(dtype)}, expected {want}: config.json's "
                    "quantization_config says FP8 with per-channel scales"
                )
        return
    narrow = sorted(n for n, d in dtypes.items() if d.itemsize == 1)
    wide = sorted(n for n, d in dtypes.items() if d.itemsize > 1)
    if narrow and wide:
        a, b = narrow[0], wide[0]
        raise CheckpointError(
            f"{files[a]}: tensor {a} is {dtypes[a]} but {files[b]}: tensor {b} is {dtypes[b]}; 8-bit float "
            "weights beside wider ones are a quantised checkpoint whose scales tessera does not read "
            "(expected 16-, 32- or 64-bit floats throughout, or 8-bit throughout)"
        )


def _check_values(t: torch.Tensor, name: str, file: Path, dtype: torch.dtype | None) -> None:
    """NaN or inf anywhere (and, with `dtype`, values it cannot hold) refuse the checkpoint. Cost: one
    aminmax pass per tensor, no allocation (NaN propagates to both results, +-inf shows as an extreme):
    56 ms for a 128 MiB bf16 tensor on this repo's 2-core CPU box, ~17 % of the bf16 -> fp32 copy the load
    does anyway, where torch.isfinite(t).all() (a bool mask first) took 990 ms."""
    x = t.float() if t.dtype.itemsize == 1 else t  # aminmax has no 8-bit float kernel; fp8 checkpoints are rare
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CheckpointError(f"{file}: tensor {name} holds NaN or inf values (min {lo}, max {hi})")
    if name.endswith(WEIGHT_SCALE) and lo <= 0:  # a scale of 0 zeroes its row, a negative one flips it
        raise CheckpointError(f"{file}: tensor {name} holds {lo}; FP8 weight scales must be > 0")
    if name.endswith(WEIGHT_SCALE) and dtype is not None and hi * FP8_MAX > torch.finfo(dtype).max:
        # The row's weights are its E4M3 codes (up to 448) times the scale, in `dtype` once dequantized or
        # multiplied out: past its range they are inf.
        raise CheckpointError(
            f"{file}: tensor {name} holds {hi}, which times E4M3's largest value ({FP8_MAX:g}) is beyond "
            f"{dtype}'s range (largest {torch.finfo(dtype).max:.6g}): its weights would load as inf"
        )
    if dtype is not None and dtype.is_floating_point and t.dtype.itemsize > 1:  # an FP8 matrix stays FP8
        largest, limit = max(-lo, hi), torch.finfo(dtype).max
        if largest > limit:
            raise CheckpointError(
                f"{file}: tensor {name} holds {largest}, beyond {dtype}'s range (largest {limit:.6g}): "
                "it would load as inf; load in a wider dtype"
            )


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")  # parses the header: a truncated file fails here
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_hf_state(model: Model, tensors: dict[str, torch.Tensor], arch: ArchConfig | None = None) -> None:
    """Copy Hugging Face-named tensors of a checkpoint of `arch` (default: the model's) into the model, packing
    q/k/v and gate/up (runtime/weights.py); into an FP8 model, a wider checkpoint's matrices are quantized as
    they are packed (Model.load_packed)."""
    model.load_packed(pack_model(arch or model.arch, tensors))


def hf_state(model: Model) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (q/k/v and gate/up split back apart), in checkpoint order; an
    FP8 model's E4M3 matrices with their `weight_scale`s (the layout vLLM reads: tessera/hf_config.py)."""
    return unpack_model(model.arch, model.stored_tensors())


def dequantize_checkpoint(
    arch: ArchConfig, tensors: Mapping[str, torch.Tensor]
) -> tuple[ArchConfig, Mapping[str, torch.Tensor]]:
    """An FP8 checkpoint's tensors as a plain one's: each `X.weight_scale` folded into X.weight (in fp32, cast on
    load) as X.weight is read. KV-cache scales stay: they are for the cache, whatever the weights' dtype."""
    return replace(arch, quantization=None), _Dequantized(tensors)


class _Dequantized(Mapping):
    """An FP8 checkpoint's tensors, each matrix dequantized when it is read: the loader packs one sublayer at a
    time (weights.pack_model), so it holds one sublayer's fp32 matrices, not the whole model's (Llama-3.1-70B
    dequantized whole would take 4 bytes a weight of host memory beside the model being loaded)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        scale = self.tensors.get(name + "_scale") if name.endswith(".weight") else None
        weight = self.tensors[name]
        return weight if scale is None else dequantize_weight(weight, scale.reshape(-1), torch.float32)

    def __iter__(self) -> Iterator[str]:
        return (n for n in self.tensors if not n.endswith(WEIGHT_SCALE))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def check_memory(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    tensor_parallel: int = 1,
    copies: int = 1,
    remedy: str = "use more devices (--tensor-parallel-size), a smaller dtype or fewer engines",
) -> None:
    """Refuse, before anything is loaded, a model whose weights do not fit: one rank's share (`tensor_parallel`
    ranks, ArchConfig.rank_params) times `copies` (engine processes sharing the device) against the memory
    `device` has free. KV pools and activations come on top; the engine sizes its pool from what is left.
    `remedy`: what the refusal suggests (the flags of the command that asked)."""
    if not (Path(path) / "config.json").is_file():
        return  # not a checkpoint: load_model says so, naming what is missing
    try:
        arch = ArchConfig.from_json(Path(path) / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        arch.check_tensor_parallel(tensor_parallel)
    except ConfigError as e:
        raise ConfigError(f"{path}: --tensor-parallel-size: {e}") from None
    need = arch.rank_weight_bytes(tensor_parallel, dtype_name(dtype)) * copies
    free = available_memory(device)
    if need > free:
        per = f" per rank over {tensor_parallel}" if tensor_parallel > 1 else ""
        times = f" x {copies} engine processes" if copies > 1 else ""
        raise CheckpointError(
            f"{path}: the weights need {need / 2**30:.2f} GiB ({dtype_name(dtype)}{per}{times}) but {device} has "
            f"{free / 2**30:.2f} GiB free; {remedy}"
        )


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a checkpoint folder to read, or the error naming what it is instead."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint with config.json and safetensors)")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Load a Hugging Face Llama or nemotron-nas checkpoint directory as a tessera `Model` in eval mode. dtype
    kernels.FP8: FP8 projections with bf16 activations, from an FP8 checkpoint as stored or quantized from a
    wider one at load; an FP8 checkpoint loaded in another dtype is dequantized."""
    path = checkpoint_dir(path)
    try:
        arch = ArchConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    fp8 = dtype == FP8
    if fp8:
        check_fp8(device, "dtype fp8")
    tensors = read_hf_tensors(path, arch, torch.bfloat16 if fp8 else dtype)  # FP8 runs the rest in bf16
    if arch.quantization == "fp8" and not fp8:
        arch, tensors = dequantize_checkpoint(arch, tensors)
    model = Model.empty(arch, device, dtype)
    load_hf_state(model, tensors, arch)
    check_kv_scales_of(model, path)
    return model.eval()


def check_kv_scales_of(model: Model, path: Path) -> None:
    """A checkpoint's FP8 KV-cache scales must be finite and positive (NaN and inf are refused with every tensor)."""
    try:
        check_kv_scale_values(model.kv_scales(), str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def save_model(
    model: Model,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_from: str | Path | None = None,
    fmt: hf_config.Format = "auto",
    carry_over: bool = True,
) -> Path:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) in HF format.

    `fmt` "auto": the config is the family's own format when it expresses the model, else nemotron-nas (Llama
    family) or tessera's (the family's config plus block_configs); or the one asked (tessera/hf_config.py).
    Tokenizer files are copied from `tokenizer_from` when given.

    Atomic (`files.replaced_folder`): written into a folder beside `path` that then replaces it whole, so a
    failure (a full disk) leaves the old checkpoint untouched. Files of an existing `path` that this function
    does not write (a tokenizer written before the call, reports, plots) are carried over, as hard links where
    possible; its old weights are not, nor anything when `carry_over` is False (a model replacing another's
    folder: nothing there is its). Needs disk room for both checkpoints during the save.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory (expected a checkpoint directory to write)")
    target = path.resolve() if path.is_symlink() else path  # replace the directory a link names, keep the link
    tensors = {n: _stored(n, t, dtype) for n, t in hf_state(model).items()}
    stored = next(iter(tensors.values())).dtype
    stored_name = dtype_name(stored)
    try:
        dtype_bytes(stored_name)  # the dtypes config.json readers (and `tessera info`) accept
    except ConfigError as e:
        raise CheckpointError(f"{path}: cannot save {stored} weights ({e})") from None
    with replaced_folder(target) as tmp:
        only_tessera = _write_checkpoint(tmp, replace(model.arch, dtype=stored_name), tensors, max_shard_bytes, fmt)
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy(src, tmp / name)
        if carry_over and target.is_dir():
            _carry_over(target, tmp)
    if only_tessera:
        warnings.warn(f"{path}: {only_tessera}", stacklevel=2)
    return path


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the mode a plain write gives (save_file makes it readable by its owner alone)."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors (a full disk) as the file system gave them, without the file
        raise CheckpointError(f"{path}: could not be written ({e})") from None
    default_mode(path)


def _stored(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A tensor as saved: in `dtype` when given, except an FP8 model's E4M3 matrices and fp32 scales."""
    keep = dtype is None or t.dtype == FP8 or name.endswith("_scale")
    return t.detach().to(t.dtype if keep else dtype).contiguous().cpu()


def _write_checkpoint(
    out: Path, arch: ArchConfig, tensors: dict[str, torch.Tensor], max_shard_bytes: int, fmt: hf_config.Format
) -> str | None:
    """Write the checkpoint into `out`; returns why only tessera can load it, when that is so."""
    config = arch.to_hf_dict(fmt)
    if arch.quantization == "fp8" or arch.kv_cache_scales:
        config["quantization_config"] = hf_config.quantization_config(arch.quantization == "fp8", arch.kv_cache_scales)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save_shard(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _save_shard(shard, out / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return config.get(hf_config.TESSERA_ONLY)


def _is_weight_file(name: str) -> bool:
    return name == _INDEX or (name.startswith("model") and name.endswith(".safetensors"))


def is_checkpoint_file(name: str, tokenizer_from: str | Path | None = None) -> bool:
    """A name `save_model` writes in a checkpoint folder: config.json, weights, and the tokenizer files that
    `tokenizer_from` has (a chat template a user added to an earlier output is not one: a rerun would lose it)."""
    if name in TOKENIZER_FILES:
        return tokenizer_from is not None and (Path(tokenizer_from) / name).is_file()
    return name == "config.json" or _is_weight_file(name)


def _carry_over(old: Path, new: Path) -> None:
    """Copy into `new` what `old` holds and `new` does not, except weights: callers write beside the weights
    (demo/build.py the tokenizer before saving, the search and fusion reports and plots) and a directory swap
    must not drop those. Hard links: instant, and the old directory is deleted right after."""

    def link_or_copy(src: str | Path, dst: str | Path) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(src, dst, follow_symlinks=False)

    for entry in old.iterdir():
        dst = new / entry.name
        if _is_weight_file(entry.name) or dst.exists() or dst.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, dst)
