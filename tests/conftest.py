"""Shared fixtures: tiny random checkpoints in both Hugging Face formats, and the shared real configs."""

from __future__ import annotations

import contextlib
import functools
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

from tessera.config import ArchConfig, AttentionConfig, BlockConfig, FFNConfig
from tessera.runtime.model import Model
from tessera.search import activations
from tessera.search.bld import BLDConfig, SublayerStore, run_bld
from tessera.search.library import SearchSpace

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"  # real config.json files with their published counts (configs/README.md)


@functools.cache
def transformers_demo_parent():
    """transformers' LlamaForCausalLM of the bundled demo parent (float32, eval): the independent reference, loaded
    once per process."""
    from transformers import LlamaForCausalLM

    from tessera.demo import PARENT_DIR

    return LlamaForCausalLM.from_pretrained(PARENT_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_float64():
    """The demo parent in float64 with its tokenizer, for tests that compare sampled tokens between paths that
    round differently, such as a request prefilled again after a preemption against one decoded throughout. In
    float32 one of their draws lies 1.3e-7 from a boundary of the inverse-transform CDF, inside the two paths'
    rounding difference (~1e-5 in the logits): on another machine it drew the neighbouring token. In float64 the
    difference is ~1e-14."""
    from tessera.demo import PARENT_DIR
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import load_tokenizer

    return load_model(PARENT_DIR).double(), load_tokenizer(PARENT_DIR)


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
    return save_hf(LlamaForCausalLM(LlamaConfig(**kwargs)), path)


def save_hf(model, path: Path) -> Path:
    """A transformers model saved by transformers, its norms and biases random first: HF's init leaves norms at 1
    and biases at 0, which would not test their mapping."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
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

# float32 and float16 only: the interpreter computes tl.dot on bfloat16 wrongly.
KERNEL_DTYPES = (torch.float32, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}

# Each kernel test's tolerance per dtype, relative to the largest reference value (`relative_error`).
# float32, unless said otherwise: the same products summed in another order; observed <= 1e-6.
TOLERANCES = {
    # fp16: one fp16 rounding (unit roundoff 4.9e-4) of the output.
    "rms_norm": {torch.float32: 1e-5, torch.float16: 1e-3},
    # fp16: the kernel rounds silu(gate)·up to fp16 once and the output once, compared with an fp32 reference
    # computed from the same fp16 inputs; observed <= 6e-4.
    "swiglu_ffn": {torch.float32: 1e-5, torch.float16: 2e-3},
    # Both sides compute in fp32 and round once; only fused multiply-adds may differ (last bit).
    "rope": {torch.float32: 1e-6, torch.float16: 1e-3},
    # float32: online softmax sums in another order; observed <= 1e-6. fp16: the kernel rounds P to fp16 for the
    # P·V product and the output once, against an fp32 reference on the same fp16 inputs; observed <= 5e-4.
    "attention_prefill": {torch.float32: 1e-5, torch.float16: 2e-3},
    # float32: sums in another order; observed <= 2.2e-7. fp16: the kernel rounds P to fp16 for P·V and the
    # output once; observed <= 4.2e-4.
    "attention_paged": {torch.float32: 1e-5, torch.float16: 2e-3},
    # The whole runtime model, Triton kernels against references. float32: the same math summed in other
    # orders; observed <= 6.7e-7. fp16: each of 8 layers rounds activations to fp16 (unit roundoff 4.9e-4) at
    # slightly different points on each side (e.g. silu(gate)·up rounded once instead of three times), and the
    # logits carry those differences; observed <= 1.8e-3.
    "model": {torch.float32: 1e-5, torch.float16: 5e-3},
}


# The engine's KV layouts a test runs in: pages of 4 tokens (several a request, gathered) and a page of the whole
# context a request (EngineConfig.page_size at the context: read in place).
PAGE_SIZES = [pytest.param(4, id="pages"), pytest.param("whole", id="whole-context-pages")]


def tokens_per_page(page_size: int | str, model: Model) -> int:
    """A PAGE_SIZES value as EngineConfig.page_size for `model`."""
    return model.arch.max_position_embeddings if page_size == "whole" else page_size


def dtypes(kernel: str, only: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> pytest.MarkDecorator:
    """The dtype axis of a kernel test: parametrizes ("dtype", "tol"), each dtype carrying its tolerance."""
    params = [pytest.param(d, TOLERANCES[kernel][d], id=DTYPE_IDS[d]) for d in only]
    return pytest.mark.parametrize(("dtype", "tol"), params)


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Seeded normal values on the kernel device, drawn on the CPU: the same numbers on either device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=KERNEL_DEVICE, dtype=dtype)


# NaN elements on each side of a poisoned buffer. Masks that are off by one, or a last tile written without its
# column mask, write just past the end; 64 elements keep the handed-out region 16-byte aligned for fp16 and fp32
# (Triton specialises on pointer alignment, so the GPU runs the same compiled variant as without canaries).
CANARY = 64


class Poison:
    """Every float buffer allocated through torch.empty, torch.empty_like or Tensor.new_empty starts as NaN, so a
    tile a kernel forgot to write fails; and lies between two runs of CANARY NaN elements in one allocation, so
    `check` fails when a kernel wrote before the start or past the end. Under the interpreter a launch copies the
    arguments' whole storages, so the canaries travel with the buffer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.guarded: list[tuple[torch.Tensor, int]] = []  # (the whole allocation, elements handed out)
        empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
        monkeypatch.setattr(torch, "empty", lambda *a, **k: self.guard(empty(*a, **k)))
        monkeypatch.setattr(torch, "empty_like", lambda *a, **k: self.guard(empty_like(*a, **k)))
        monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: self.guard(new_empty(t, *a, **k)))

    def guard(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if t.numel() == 0:  # also the interpreter's `new_empty(0)`, which it then points at an argument's storage
            return t
        # The same shape and strides (empty_like keeps a permuted layout) inside a larger NaN allocation.
        n = t.untyped_storage().nbytes() // t.element_size()
        whole = torch.full((CANARY + n + CANARY,), float("nan"), dtype=t.dtype, device=t.device)
        self.guarded.append((whole, n))
        return whole.as_strided(t.shape, t.stride(), CANARY)

    def check(self) -> None:
        """Every canary of every buffer allocated so far is still NaN."""
        for whole, n in self.guarded:
            before, after = whole[:CANARY], whole[CANARY + n :]
            written = [i - CANARY for i in (~before.isnan()).nonzero().flatten().tolist()]
            written += [n + i for i in (~after.isnan()).nonzero().flatten().tolist()]
            assert not written, f"out-of-bounds write to a {n}-element buffer at element offsets {written[:8]}"


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel tests on the Triton backend with poisoned, canary-guarded outputs (`Poison`), checked at the end."""
    poison = Poison(monkeypatch)
    with kernel_backend("triton"):
        yield poison
    poison.check()


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


# Puzzle's stages on a tiny random parent (test_init, test_library, test_bld, test_scoring, test_assemble, test_cost,
# test_pipeline, test_gkd). `parent` and `trained` are session-wide, as they were module-wide when those tests
# shared one file: the parent is read-only and BLD trains its store once (about 5 s) for all of them.

FP32_EXACT = 1e-5  # same math in a different order (fp32 GEMMs of width ≤ 96): ~1e-7 seen, 1e-5 bound
GQA4, FFN96 = AttentionConfig("gqa", 4), FFNConfig("swiglu", 96)


def tiny_arch(layers: int = 3) -> ArchConfig:
    return ArchConfig(
        vocab_size=97,
        hidden_size=64,
        n_heads=8,
        head_dim=8,
        blocks=(BlockConfig(GQA4, FFN96),) * layers,
        max_position_embeddings=128,
        eos_token_ids=(0,),
        dtype="float32",
    )


@pytest.fixture(scope="session")
def parent() -> Model:
    torch.manual_seed(0)
    model = Model(tiny_arch()).init_weights(std=0.1, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def windows(n: int, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, t + 1), generator=torch.Generator().manual_seed(seed))


BLD_CONFIG = BLDConfig(steps=80, batch_windows=8, lr=3e-3, eval_windows=8)
SPACE = SearchSpace(kv_heads=(4, 2), ffn_ratios=(1.0, 0.5), ffn_multiple=16)


@pytest.fixture(scope="session")
def trained(parent, tmp_path_factory):
    acts = activations.record(parent, windows(40, t=32), progress=False)
    store = SublayerStore(tmp_path_factory.mktemp("bld"))
    losses = run_bld(parent, acts, SPACE, store, BLD_CONFIG, False)
    return store, losses


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


@contextlib.contextmanager
def tolerating_teardown_aborts():
    """Around `torch.multiprocessing.spawn` of gloo ranks: gloo now and then aborts a rank (SIGABRT, "terminate called
    without an active exception") as it tears down after its work (parallel.run_ranks; seen in fresh-clone CI runs).
    Such an abort passes; the test's own checks of what every rank wrote then decide. Any other exit still fails."""
    import torch.multiprocessing as mp

    try:
        yield
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT":
            raise


def node_ended_well(node, log: Path, timeout: float) -> bool:
    """A torchrun node exited 0, or exited otherwise only because gloo aborted a rank as it tore down (its log
    says so; what the ranks wrote is for the test to check)."""
    return node.wait(timeout) == 0 or GLOO_TEARDOWN_ABORT in log.read_text()


def torchrun(args: list[str], logs: Path, nnodes: int = 1, nproc_per_node: int = 1) -> list:
    """`torchrun ... -m tessera.cli ARGS` as `nnodes` nodes on this machine (each its own torchrun, one process
    group, gloo), meeting at a free local port as nodes on separate machines meet at the first node's address.
    Each node in a session of its own (a signal to its group reaches its agent and workers, as Ctrl-C does);
    its output in logs/node{r}.log. Returns the nodes' Popen objects."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node"]
    launch += [str(nproc_per_node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [*launch, "--node-rank", str(r), "-m", "tessera.cli", *args],
            stdout=(logs / f"node{r}.log").open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        for r in range(nnodes)
    ]
