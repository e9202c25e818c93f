"""The runtime model against independent references.

- Llama: transformers' LlamaForCausalLM on a random tiny checkpoint it saved itself (GQA, Llama-3 rope
  scaling, tied and untied embeddings). Tolerance: float32 relative error <= 1e-5; both sides compute the
  same math in fp32 with different GEMM groupings (packed q/k/v and gate/up), which moves only the last
  few bits (observed ~5e-7).
- nemotron-nas: a straightforward reference written below from DESIGN.md's semantics (explicit per-head
  loops, an explicit causal mask, HF tensors used by name), on a checkpoint mixing every block kind.
- The paged KV cache: the engine's chunked prefill and decode steps give the logits of one full forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tessera.runtime import load_model
from tessera.runtime.cache import PagedKVCache
from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.model import Batch
from tessera.runtime.sampling import SamplingParams

from .conftest import nas_config, nas_tensors, relative_error

FP32_TOL = 1e-5


@pytest.mark.parametrize("fixture", ["llama_untied", "llama_tied"])
def test_llama_matches_transformers(fixture: str, request) -> None:
    from transformers import LlamaForCausalLM

    path: Path = request.getfixturevalue(fixture)
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path)
    assert (model.lm_head is None) == reference.config.tie_word_embeddings
    # The head's rope frequencies fall in all three llama3 scaling bands (conftest's config); 200 positions.
    ids = torch.randint(0, 97, (3, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = model(ids)
    assert actual.shape == expected.shape == (3, 200, 97)
    assert relative_error(actual, expected) <= FP32_TOL


def test_llama_greedy_generation_matches_transformers(llama_untied: Path) -> None:
    from transformers import LlamaForCausalLM

    from tessera.runtime.generate import Generator
    from tessera.runtime.sampling import SamplingParams

    reference = LlamaForCausalLM.from_pretrained(llama_untied, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 8, 91, 60, 12]
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    [completion] = Generator(load_model(llama_untied)).generate([prompt], SamplingParams(24, ignore_eos=True))
    assert completion.tokens == expected


def reference_rope(x: torch.Tensor, positions: torch.Tensor, rope: dict, theta: float) -> torch.Tensor:
    """x [T, heads, D]: Llama-3 scaled rotate-half RoPE, written from the Llama 3.1 recipe."""
    d = x.shape[-1]
    freqs = []
    for i in range(0, d, 2):
        f = 1.0 / theta ** (i / d)
        wavelen = 2 * math.pi / f
        low, high = (
            rope["original_max_position_embeddings"] / rope["low_freq_factor"],
            rope["original_max_position_embeddings"] / rope["high_freq_factor"],
        )
        if wavelen < high:
            pass
        elif wavelen > low:
            f = f / rope["factor"]
        else:
            s = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            f = (1 - s) * f / rope["factor"] + s * f
        freqs.append(f)
    angles = positions.double()[:, None] * torch.tensor(freqs, dtype=torch.float64)[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_nas_forward(config: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] for one sequence, in float64, straight from the semantics in DESIGN.md."""
    h_dim, heads, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    d = h_dim // heads
    T = ids.shape[0]

    def rms(x, w):
        return w.double() * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        return x @ t[name].double().t()

    positions = torch.arange(T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    h = t["model.embed_tokens.weight"].double()[ids]
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        a, f = block["attention"], block["ffn"]
        if not a["no_op"]:
            x = rms(h, t[p + "input_layernorm.weight"])
            if a["replace_with_linear"]:
                h = h + lin(x, p + "self_attn.linear_attn.weight")
            else:
                group = a["n_heads_in_group"]
                q = reference_rope(
                    lin(x, p + "self_attn.q_proj.weight").view(T, heads, d),
                    positions,
                    config["rope_scaling"],
                    config["rope_theta"],
                )
                k = reference_rope(
                    lin(x, p + "self_attn.k_proj.weight").view(T, heads // group, d),
                    positions,
                    config["rope_scaling"],
                    config["rope_theta"],
                )
                v = lin(x, p + "self_attn.v_proj.weight").view(T, heads // group, d)
                out = torch.empty(T, heads, d, dtype=torch.float64)
                for head in range(heads):
                    kv = head // group
                    scores = (q[:, head] @ k[:, kv].t()) / math.sqrt(d)
                    scores = scores.masked_fill(~mask, float("-inf"))
                    out[:, head] = torch.softmax(scores, -1) @ v[:, kv]
                h = h + lin(out.reshape(T, heads * d), p + "self_attn.o_proj.weight")
        if not f["no_op"]:
            x = rms(h, t[p + "post_attention_layernorm.weight"])
            if f["replace_with_linear"]:
                h = h + lin(x, p + "mlp.linear_mlp.weight")
            else:
                gate, up = lin(x, p + "mlp.gate_proj.weight"), lin(x, p + "mlp.up_proj.weight")
                h = h + lin(F.silu(gate) * up, p + "mlp.down_proj.weight")
    return lin(rms(h, t["model.norm.weight"]), "lm_head.weight")


def test_nas_every_block_kind_matches_reference(nas_checkpoint: Path) -> None:
    config = nas_config()
    tensors = nas_tensors(config)
    model = load_model(nas_checkpoint)
    kinds = {(b.attention.kind, b.ffn.kind) for b in model.arch.blocks}
    assert {
        ("gqa", "swiglu"),
        ("linear", "swiglu"),
        ("gqa", "linear"),
        ("none", "swiglu"),
        ("gqa", "none"),
        ("none", "none"),
        ("linear", "linear"),
    } <= kinds
    assert sorted({b.attention.n_kv_heads for b in model.arch.blocks if b.attention.kind == "gqa"}) == [1, 2, 4]
    ids = torch.randint(0, 101, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        actual = model(ids)
    for row in range(2):
        expected = reference_nas_forward(config, tensors, ids[row])
        # fp32 model vs fp64 reference through 8 layers: rounding of fp32 accumulations only.
        assert relative_error(actual[row], expected) <= FP32_TOL


def test_no_op_layers_build_nothing(nas_checkpoint: Path) -> None:
    model = load_model(nas_checkpoint)
    empty = model.layers[6]
    assert empty.self_attn is None and empty.mlp is None and not list(empty.parameters())
    assert model.layers[4].input_layernorm is None and model.layers[5].post_attention_layernorm is None


def test_kv_cache_is_per_layer_and_unpadded(nas_checkpoint: Path) -> None:
    model = load_model(nas_checkpoint)
    cache = PagedKVCache(model.arch, num_pages=5, page_size=16)
    shapes = [None if k is None else tuple(k.shape) for k in cache.k]
    assert shapes == [(5, 16, 4, 8), (5, 16, 2, 8), None, (5, 16, 1, 8), None, (5, 16, 2, 8), None, None]
    assert cache.nbytes() == model.arch.kv_bytes_per_token("float32") * 5 * 16


@pytest.mark.parametrize("fixture", ["nas_checkpoint", "llama_tied"])
def test_cached_steps_match_full_forward(fixture: str, request, monkeypatch) -> None:
    """The logits each engine step samples from (a prompt prefilled in chunks of 5, then 9 decode steps) equal
    one uncached forward over the whole sequence."""
    model = load_model(request.getfixturevalue(fixture))
    recorded: list[torch.Tensor] = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: recorded.append(out := logits(h)) or out)
    gen = torch.Generator().manual_seed(5)
    for n in (7, 1, 12):  # ragged prompts, one at a time: the rows are then that sequence's, in order
        prompt = torch.randint(0, model.arch.vocab_size, (n,), generator=gen).tolist()
        recorded.clear()
        engine = Engine(model, config=EngineConfig(max_batch=2, max_step_tokens=5, page_size=4))
        [c] = engine.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))
        with torch.no_grad():
            full = logits(model.forward_packed(torch.tensor(prompt + c.tokens), Batch.sequences([n + 10], "cpu")))
        assert relative_error(torch.cat(recorded), full[n - 1 : n + 9]) <= FP32_TOL


def test_packed_sequences_equal_separate(nas_checkpoint: Path) -> None:
    model = load_model(nas_checkpoint)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 101, (n,), generator=gen) for n in (5, 31, 2)]
    with torch.no_grad():
        packed = model.logits(model.forward_packed(torch.cat(seqs), Batch.sequences([5, 31, 2], "cpu")))
        for s, end in zip(seqs, (5, 36, 38)):
            alone = model(s[None])[0]
            assert relative_error(packed[end - len(s) : end], alone) <= FP32_TOL


def test_bfloat16_forward_close_to_float32(llama_untied: Path) -> None:
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_model(llama_untied)(ids)
        bf16 = load_model(llama_untied, dtype=torch.bfloat16)(ids)
    assert bf16.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (2^-8 = 0.4 % per rounding); three layers of rounded GEMMs stay within 3 %.
    assert relative_error(bf16.float(), ref) <= 3e-2


def test_a_cast_copy_is_the_model_loaded_in_that_dtype(nas_checkpoint: Path) -> None:
    """`Model.cast` (the search times fp32-trained children in bf16): every weight equals the checkpoint loaded
    in bf16, bit for bit, so the copy computes what `load_model(..., bfloat16)` does; the original is untouched,
    and a cast to its own dtype is itself."""
    model = load_model(nas_checkpoint)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    copy = model.cast(torch.bfloat16)
    loaded = load_model(nas_checkpoint, dtype=torch.bfloat16)
    assert copy.state_dict().keys() == loaded.state_dict().keys()
    for name, weight in loaded.state_dict().items():
        assert copy.state_dict()[name].dtype == torch.bfloat16 and torch.equal(copy.state_dict()[name], weight), name
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.state_dict().items())
    assert model.cast(torch.float32) is model
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids), loaded(ids))
