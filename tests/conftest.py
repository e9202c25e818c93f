"""Shared fixtures: tiny random checkpoints in both Hugging Face formats, and the shared real configs."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. It must be on before tessera.kernels is
# imported: @triton.jit decides at decoration time whether a kernel is compiled or interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"  # real config.json files with their published counts (configs/README.md)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, printed with the mean error for the record."""
    diff = (actual.double() - expected.double()).abs()
    rel = (diff.max() / expected.double().abs().max().clamp_min(1e-30)).item()
    print(f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, rel {rel:.3e}")
    return rel


def write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def hf_llama(path: Path, tie: bool, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama saved by transformers itself (GQA 8/2, Llama-3 rope scaling)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        # head_dim 8, theta 5e5: wavelengths 6.3, 167, 4443, 1.2e5 positions. With original 256 the bands are
        # < 64 kept, 64..256 smoothed, > 256 divided by factor: each of the three occurs.
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():  # HF's init leaves norms at 1; random norms test the weight mapping too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


# A nemotron-nas layout with every block kind: per-layer KV heads 4/2/1, linear and no-op attention,
# SwiGLU widths 256/512, linear and no-op FFN, and a layer where both sublayers are no-ops.
NAS_BLOCKS = [
    ({"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False}, {"ffn_mult": 6.0}),  # kv4, 256
    ({"n_heads_in_group": 4}, {"ffn_mult": 12.0}),  # kv2, 512
    ({"replace_with_linear": True}, {"ffn_mult": 6.0}),  # linear attention
    ({"n_heads_in_group": 8}, {"replace_with_linear": True}),  # kv1, linear FFN
    ({"no_op": True}, {"ffn_mult": 12.0}),  # attention-free
    ({"n_heads_in_group": 4}, {"no_op": True}),  # FFN-free
    ({"no_op": True}, {"no_op": True}),  # both no-op (Ultra-253B has 81 such layers)
    ({"replace_with_linear": True}, {"replace_with_linear": True}),
]


def nas_config(hidden: int = 64, heads: int = 8, vocab: int = 101, blocks=NAS_BLOCKS) -> dict:
    def attention(a):
        return {"n_heads_in_group": None, "no_op": False, "replace_with_linear": False, **a}

    def ffn(f):
        return {"ffn_mult": None, "no_op": False, "replace_with_linear": False, **f}

    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": len(blocks),
        "num_key_value_heads": None,
        "intermediate_size": None,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        # head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283. With original 100 the bands are < 25 kept,
        # 25..100 smoothed, > 100 divided by factor: each occurs.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 100,
        },
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "block_configs": [{"attention": attention(a), "ffn": ffn(f)} for a, f in blocks],
    }


def nas_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names, derived here from the config (not from tessera's code)."""
    gen = torch.Generator().manual_seed(seed)
    h, heads, vocab = config["hidden_size"], config["num_attention_heads"], config["vocab_size"]
    d = h // heads

    def rand(*shape, scale=0.08):
        return torch.randn(shape, generator=gen) * scale

    def norm():
        return 1 + 0.3 * torch.randn(h, generator=gen)

    t = {
        "model.embed_tokens.weight": rand(vocab, h, scale=1.0),
        "model.norm.weight": norm(),
        "lm_head.weight": rand(vocab, h),
    }
    for i, b in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        a, f = b["attention"], b["ffn"]
        if not a["no_op"]:
            t[p + "input_layernorm.weight"] = norm()
            if a["replace_with_linear"]:
                t[p + "self_attn.linear_attn.weight"] = rand(h, h)
            else:
                kv = heads // a["n_heads_in_group"]
                t[p + "self_attn.q_proj.weight"] = rand(heads * d, h)
                t[p + "self_attn.k_proj.weight"] = rand(kv * d, h)
                t[p + "self_attn.v_proj.weight"] = rand(kv * d, h)
                t[p + "self_attn.o_proj.weight"] = rand(h, heads * d)
        if not f["no_op"]:
            t[p + "post_attention_layernorm.weight"] = norm()
            if f["replace_with_linear"]:
                t[p + "mlp.linear_mlp.weight"] = rand(h, h)
            else:
                width = int(2 * f["ffn_mult"] * h / 3)
                width += -width % 256
                t[p + "mlp.gate_proj.weight"] = rand(width, h)
                t[p + "mlp.up_proj.weight"] = rand(width, h)
                t[p + "mlp.down_proj.weight"] = rand(h, width)
    return t


@pytest.fixture
def nas_checkpoint(tmp_path: Path) -> Path:
    config = nas_config()
    return write_checkpoint(tmp_path / "nas", config, nas_tensors(config))


@pytest.fixture(scope="session")
def llama_untied(tmp_path_factory) -> Path:
    return hf_llama(tmp_path_factory.mktemp("llama_untied"), tie=False)


@pytest.fixture(scope="session")
def llama_tied(tmp_path_factory) -> Path:
    return hf_llama(tmp_path_factory.mktemp("llama_tied"), tie=True, seed=1)


# Kernel tests run on the GPU when there is one, else on the CPU under the Triton interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer a kernel launcher allocates starts as NaN, so a tile it forgot to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    with kernel_backend("triton"):
        yield


@contextlib.contextmanager
def kernel_backend(name: str | None):
    """Force a kernel backend for the duration, then restore the previous choice."""
    from tessera import kernels

    previous = kernels.forced_backend()
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(previous)
