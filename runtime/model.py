"""The heterogeneous decoder: one readable file, built from an `ArchConfig`.

Each layer builds only the sublayers its block asks for (as vLLM's nemotron_nas.py does): GQA attention
with the layer's own KV-head count, a linear attention replacement, or nothing; a SwiGLU FFN of the
layer's width, a linear FFN replacement, or nothing. A layer computes `h = h + attn(norm1(h))` then
`h = h + ffn(norm2(h))`, each skipped when it is a no-op (DESIGN.md). Weights are packed (q/k/v, gate/up)
so each sublayer is one GEMM in; the loader maps Hugging Face names onto them.

Tokens travel packed, [N, H] with N = all tokens of the batch, so one forward serves whole sequences of
different lengths (training, scoring) and an engine step (prefill chunks and decode tokens over the paged KV
cache, runtime/engine.py). The heavy work
goes through `tessera.kernels` only. This same `DecoderLayer` is what the search distils, scores and
times, and what serving runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from tessera import kernels
from tessera.config import ArchConfig, AttentionConfig, BlockConfig, RopeConfig
from tessera.devices import available_memory
from tessera.kernels import cpu_layout
from tessera.kernels.cpu_layout import COMPUTE_DTYPES
from tessera.runtime.cache import UNCALIBRATED_KV_SCALE, PagedKVCache


@dataclass
class Batch:
    """Where the N packed tokens of one forward pass sit.

    positions [N] int64: each token's position in its sequence.
    cu_seqlens [B+1] int32: sequence b's tokens of this pass are cu_seqlens[b]:cu_seqlens[b+1].
    max_seqlen: the most tokens any sequence has in this pass (sizes attention grids without a device read).

    Without a cache (training, scoring, a plain forward) each sequence is whole and attends causally within
    itself. With one (an engine step), for each KV group of the cache (the layers of one attention window,
    runtime/cache.py), `slots[g]` [N] int64 says where each token's K/V go and `attention[g]` where each
    sequence's cached keys are; all are built once per step (runtime/engine.py). `fresh`: every sequence of the
    step starts in it (position 0), so its keys are all in the step: attention runs the varlen prefill kernel
    over them, without reading the cache (on the H200 run of 2026-11-28, 1.07-1.32x SDPA on prompts where the
    paged kernel's prefill gave 0.85-1.04x), while the K/V are still stored for the steps after.
    """

    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cache: PagedKVCache | None = None
    slots: list[torch.Tensor] | None = None
    attention: list[kernels.PagedAttentionMetadata] | None = None
    fresh: bool = False

    @classmethod
    def sequences(cls, lengths: list[int], device: torch.device) -> Batch:
        """Whole sequences of the given lengths, packed, starting at position 0, no cache."""
        counts = torch.tensor(lengths, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(counts, 0)
        positions = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.int64)
        return cls(positions.to(device), cu.to(device), max(lengths, default=0))


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies [D/2], with Llama-3 scaling when rope.factor is set."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if rope.factor is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, quantize: bool = False
    ) -> torch.Tensor | kernels.Fp8Rows | tuple[torch.Tensor | kernels.Fp8Rows, torch.Tensor]:
        """RMSNorm(x), or with a residual (RMSNorm(x + residual), x + residual): the add fused in. quantize: the
        normed rows quantized per token for the FP8 GEMM that reads them (kernels.rms_norm)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual, quantize)


# Weights of the LM head quantized at once (Model._quantize_head): quantize_weight's fp32 temporaries take ~14 bytes
# a weight (the fp32 copy, the scaled copy, the clamp), ~0.9 GB for 2^26 weights at any width, where a whole head
# of 128k rows x 8,192 would take ~15 GB on top of the loaded model (more than the memory check allows for).
HEAD_QUANTIZE_WEIGHTS = 2**26
# The share of the CPU's available memory that packed twins of the weights may take (Model.lay_out_for_cpu): the
# demo parent's 33 MB of float32 weights anywhere; past it (a large model on a small machine) matrices run dense.
PACK_MEMORY_SHARE = 0.25


def _fp8_storage(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfilled storage for W's E4M3 values and fp32 scales (Model.empty in kernels.FP8)."""
    return torch.empty_like(w, dtype=kernels.FP8), torch.empty(w.shape[0], dtype=torch.float32)


def _no_scales(module: nn.Module) -> None:
    """Register each of the module's `matrices` a `<name>_scale` buffer, None until Model.to_fp8 quantizes it (a
    None buffer is no state-dict entry: a model in bf16 or fp32 has the state it always had)."""
    for name in module.matrices:
        module.register_buffer(f"{name}_scale", None)


class GQAAttention(nn.Module):
    """Grouped-query attention with the layer's own KV-head count and window, and what the parent's family adds:
    q/k/v biases (Qwen2) in the packed projection, an RMSNorm over each query and key head before RoPE
    (Qwen3)."""

    matrices = ("w_qkv", "w_o")  # what FP8 quantizes (Model.to_fp8), each with a `<name>_scale` buffer

    def __init__(self, arch: ArchConfig, attention: AttentionConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = arch.n_heads, attention.n_kv_heads, arch.head_dim
        self.layer_idx, self.window = layer_idx, attention.window
        q_dim, kv_dim = arch.n_heads * arch.head_dim, attention.n_kv_heads * arch.head_dim
        self.w_qkv = nn.Parameter(torch.empty(q_dim + 2 * kv_dim, arch.hidden_size))  # cat(q, k, v)
        self.b_qkv = nn.Parameter(torch.empty(q_dim + 2 * kv_dim)) if arch.qkv_bias else None
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.w_o = nn.Parameter(torch.empty(arch.hidden_size, q_dim))
        _no_scales(self)
        # An FP8 KV cache's scales for this layer (fp32 [1]; Model.calibrate_kv_scales, or the checkpoint's
        # `self_attn.k_scale`/`v_scale`); None until calibrated. The cache copies them (runtime/cache.py).
        for name in ("k_scale", "v_scale"):
            scale = torch.full((1,), UNCALIBRATED_KV_SCALE, dtype=torch.float32) if arch.kv_cache_scales else None
            self.register_buffer(name, scale)
        self.observe_kv = None  # calibration: called with each pass's rotated keys and values
        self.tp = None  # a tensor-parallel shard's group (runtime/parallel.py): the output is a partial sum

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, hq, hkv, d = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = kernels.linear(x, self.w_qkv, self.b_qkv, self.w_qkv_scale)  # (N, (Hq + 2 Hkv) D)
        qk = qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :hq]), self.k_norm(qk[:, hq:])], dim=1)
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
        cache, layer = batch.cache, self.layer_idx
        # q and k sit side by side in the packed output: one rotation covers both (and in an engine step also
        # stores the keys and values in the layer's cache).
        if cache is None:
            qk = kernels.apply_rope(qk, cos, sin)
        else:
            group = cache.group_of[layer]  # the layer's KV group: its slots and block tables (runtime/cache.py)
            qk = cache.rotate_and_store(layer, batch.slots[group], qk, v, cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]  # (N, Hq, D), (N, Hkv, D)
        if self.observe_kv is not None:
            self.observe_kv(k, v)
        if cache is None or batch.fresh:  # each sequence's every key is in this pass: varlen, no cache read
            out = kernels.attention_prefill(
                q, k, v, batch.cu_seqlens, causal=True, max_seqlen=batch.max_seqlen, window=self.window
            )
        else:
            out = cache.attend(layer, q, batch.attention[group], self.window)
        out = kernels.linear(out.reshape(n, hq * d), self.w_o, scale=self.w_o_scale)
        return out if self.tp is None else self.tp.all_reduce(out)


class LinearSublayer(nn.Module):
    """Puzzle's linear replacement for attention or FFN: one [H, H] matrix, no bias, no KV cache. A
    tensor-parallel shard holds the columns `cols` of it and multiplies that slice of its input."""

    matrices = ("weight",)

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size))
        _no_scales(self)
        self.tp, self.cols = None, None

    def forward(self, x: torch.Tensor, *_: object, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = kernels.linear(x if self.cols is None else x[:, self.cols], self.weight, scale=self.weight_scale)
        if residual is not None and (self.tp is None or self.tp.rank == 0):  # added once across the ranks
            out = residual + out
        return out if self.tp is None else self.tp.all_reduce(out)


class SwiGLU(nn.Module):
    matrices = ("w_gate_up", "w_down")

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size))  # cat(gate, up)
        self.w_down = nn.Parameter(torch.empty(hidden_size, intermediate_size))
        _no_scales(self)
        self.tp = None  # a tensor-parallel shard's group: a share of the width, a partial sum out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """FFN(x), plus the residual when given (added in the down GEMM's epilogue on the Triton path)."""
        if self.tp is not None and self.tp.rank > 0:
            residual = None  # added once across the ranks
        out = kernels.swiglu_ffn(x, self.w_gate_up, self.w_down, residual, self.w_gate_up_scale, self.w_down_scale)
        return out if self.tp is None else self.tp.all_reduce(out)


def _reads_fp8_rows(sublayer: nn.Module) -> bool:
    """Whether a sublayer's first GEMM takes its input quantized (kernels.Fp8Rows): attention's q/k/v and the
    SwiGLU's gate/up in FP8. Not the linear replacement: a tensor-parallel shard of it slices its input's columns."""
    if isinstance(sublayer, GQAAttention):
        return sublayer.w_qkv_scale is not None
    return isinstance(sublayer, SwiGLU) and sublayer.w_gate_up_scale is not None


class DecoderLayer(nn.Module):
    """One block of the heterogeneous decoder; a no-op sublayer is neither built nor called."""

    def __init__(self, arch: ArchConfig, block: BlockConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = arch.hidden_size, arch.rms_norm_eps
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        if block.attention.kind != "none":
            self.input_layernorm = RMSNorm(h, eps)
            if block.attention.kind == "gqa":
                self.self_attn = GQAAttention(arch, block.attention, layer_idx)
            else:
                self.self_attn = LinearSublayer(h)
        if block.ffn.kind != "none":
            self.post_attention_layernorm = RMSNorm(h, eps)
            self.mlp = SwiGLU(h, block.ffn.intermediate_size) if block.ffn.kind == "swiglu" else LinearSublayer(h)

    def forward(self, h: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Both residual adds are fused: the attention output's into the FFN's norm (which returns the new
        # stream), the FFN output's into its last GEMM. Same arithmetic as h + attn, h + ffn, one pass fewer each.
        # Before FP8 weights a norm also quantizes its output per token (as the GEMM would: the same codes).
        attn_out = None
        if self.self_attn is not None:
            x = self.input_layernorm(h, quantize=_reads_fp8_rows(self.self_attn))
            attn_out = self.self_attn(x, batch, cos, sin)
        if self.mlp is None:
            return h if attn_out is None else h + attn_out
        quantize = _reads_fp8_rows(self.mlp)
        if attn_out is None:
            x = self.post_attention_layernorm(h, quantize=quantize)
        else:
            x, h = self.post_attention_layernorm(attn_out, residual=h, quantize=quantize)
        return self.mlp(x, residual=h)

    # The two halves on their own (unfused; same result as forward): the search distils and scores each.

    def attend(self, h: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h + attn(norm1(h)), or h when attention is a no-op."""
        return h if self.self_attn is None else h + self.self_attn(self.input_layernorm(h), batch, cos, sin)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """h + ffn(norm2(h)), or h when the FFN is a no-op."""
        return h if self.mlp is None else self.mlp(self.post_attention_layernorm(h), residual=h)


class Model(nn.Module):
    """Embedding → heterogeneous layers → final norm → LM head (tied to the embedding or not)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, b, i) for i, b in enumerate(arch.blocks))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_embeddings else nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size))
        # In FP8, the LM head's E4M3 copy [vocab, H] and per-row scales [vocab] (_quantize_head), what logits()
        # reads: the head is the largest matrix of a small model and 6-7 % of an 8B FP8 step's bytes. Not stored:
        # the checkpoint keeps the bf16 head (`ignore: ["lm_head"]`), which every FP8 runtime loads (vLLM's and
        # SGLang's stock loaders refuse a quantized head), and loading it in FP8 makes the same copy again.
        self.register_buffer("lm_head_fp8", None, persistent=False)
        self.register_buffer("lm_head_fp8_scale", None, persistent=False)
        # Rotation frequencies [D/2] in fp32, one copy per device, made on first use. Not a buffer: a model
        # cast to bf16 must keep fp32 angles (positions past 256 lose them).
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        # A tensor-parallel shard (runtime/parallel.shard_model): its group, its vocabulary rows and every rank's.
        self.tp, self.vocab_rows, self.vocab_widths = None, None, None

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary (a tensor-parallel shard holds only its rows of it)."""
        return self.arch.vocab_size if self.vocab_widths is None else sum(self.vocab_widths)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    @classmethod
    def empty(cls, arch: ArchConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
        """A model with uninitialised weights allocated directly on `device` in `dtype`: built on the meta
        device (no default init to run and throw away), then given storage once, in the target dtype (an 8B
        model in bf16 never passes through 32 GB of fp32). Follow with init_weights() or a state dict.
        kernels.FP8: to_fp8's layout (E4M3 projection matrices and their scales, bf16 for the rest), to load into."""
        fp8 = dtype == kernels.FP8
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if fp8 else dtype)
        try:
            with torch.device("meta"):
                model = cls(arch)
                if fp8:
                    model._fp8_matrices(_fp8_storage)
        finally:
            torch.set_default_dtype(default)
        model = model.to_empty(device=device)
        model._uncalibrated_kv_scales()  # a state dict with scales overwrites them
        return model

    def _gqa_layers(self) -> list[tuple[int, GQAAttention]]:
        """(layer index, its attention) of the layers with GQA attention: the ones with KV-cache scales."""
        return [
            (i, layer.self_attn) for i, layer in enumerate(self.layers) if isinstance(layer.self_attn, GQAAttention)
        ]

    def _uncalibrated_kv_scales(self) -> None:
        """Every KV-scale buffer at UNCALIBRATED_KV_SCALE (to_empty leaves them unfilled)."""
        for _, attention in self._gqa_layers():
            if attention.k_scale is not None:
                attention.k_scale.fill_(UNCALIBRATED_KV_SCALE)
                attention.v_scale.fill_(UNCALIBRATED_KV_SCALE)

    @property
    def is_fp8(self) -> bool:
        """Whether the projection matrices run in FP8 (to_fp8, or Model.empty in kernels.FP8)."""
        return self.arch.quantization == "fp8"

    @property
    def run_dtype(self) -> torch.dtype:
        """The precision the model runs in, as `--dtype` names it: its compute dtype, or FP8 (kernels.FP8)."""
        return kernels.FP8 if self.is_fp8 else self.embed_tokens.weight.dtype

    def cast(self, dtype: torch.dtype) -> Model:
        """A copy of this model in `dtype` on its device (a model trained in fp32, timed in the precision it is
        served in); itself when it is in `dtype` already. kernels.FP8: bf16 activations and embeddings, FP8
        projections (to_fp8)."""
        if self.run_dtype == dtype:
            return self
        if self.is_fp8:
            raise ValueError(f"an FP8 model is not cast to {dtype}: load its checkpoint in {dtype} instead")
        copy = Model.empty(self.arch, self.embed_tokens.weight.device, dtype)
        copy.load_packed(self.state_dict().items())
        return copy.eval()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint of the model holds, by state-dict name: its parameters and persistent buffers (FP8
        scales, KV-cache scales), not the FP8 head copy made at load."""
        return self.state_dict(keep_vars=True)

    def load_packed(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (state-dict name, tensor) pairs into the model, cast to its dtypes. An FP8 matrix given in a wider
        dtype is quantized as it is copied (kernels.quantize_weight, its scale beside it): an FP8 model loaded or
        cast from fp32 or bf16 weights quantizes the weights as given, and never holds all of them on the device
        at once in the wider dtype. An FP8 model given its head quantizes it too (_quantize_head)."""
        state = self.stored_tensors()
        head = "embed_tokens.weight" if self.lm_head is None else "lm_head"
        with torch.no_grad():
            for name, t in tensors:
                if name == head and self.is_fp8:
                    self._quantize_head(t)
                target = state[name]
                if target.dtype == kernels.FP8 and t.dtype != kernels.FP8:
                    q, scale = kernels.quantize_weight(t.to(target.device))
                    target.copy_(q)
                    state[f"{name}_scale"].copy_(scale)
                else:
                    target.copy_(t.reshape(target.shape))  # FP8 scales: [rows, 1] on disk, [rows] in memory

    def to_fp8(self) -> Model:
        """Quantize in place every projection matrix not in FP8 yet (attention, FFN, linear replacements) to E4M3
        with per-output-channel scales (kernels/fp8.py), and give the LM head its FP8 copy (unless it has one: the
        cost model's timing models share theirs). Embeddings and norms stay in bf16, which activations run in, and
        so does the stored head (`ignore: ["lm_head"]`, what vLLM reads): the model saved is the model in memory
        less its head copy, which loading it in FP8 makes again, bit for bit. Inference only: the FP8 weights take
        no gradients. Returns self."""
        if self.embed_tokens.weight.dtype != torch.bfloat16:  # row-wise scaled cuBLASLt writes bf16 only
            raise ValueError(f"FP8 runs bf16 activations: cast the {self.embed_tokens.weight.dtype} model first")
        with torch.no_grad():
            self._fp8_matrices(kernels.quantize_weight)
            if self.lm_head_fp8 is None:
                self._quantize_head(self.lm_head_weight)
        return self

    def lay_out_for_cpu(self) -> int:
        """Each projection matrix in a compute dtype, and the LM head, in the layout this CPU multiplies fastest
        (kernels/cpu_layout.py): stored row-major or transposed (the same shapes and values, other strides; a tied
        head lays out the embedding it is), and where oneDNN's packed layout is faster still, a packed twin beside
        it, which an engine's steps multiply through (`cpu_layout.twins_active`), so what is served and what is
        timed run them; the parameters stay dense for everything else (training, saving). Twins double the memory
        of what they pack: they are made (the head first: it gains the most) while the process's twins total at
        most PACK_MEMORY_SHARE of the memory there was before them; the rest run dense. A matrix whose twin is
        current keeps it. On other devices the matrices' twins are dropped. Returns how many matrices have one."""
        matrices = [getattr(m, name) for m in self.modules() for name in getattr(m, "matrices", ())]
        head = [self.lm_head_weight] if self.lm_head_fp8 is None else []  # an FP8 head reads its own copy
        matrices = [p for p in [*head, *matrices] if p.dtype in COMPUTE_DTYPES]
        if self.embed_tokens.weight.device.type != "cpu":
            for p in matrices:
                cpu_layout.drop(p)
            return 0
        with torch.no_grad():
            for p in matrices:
                p.data = cpu_layout.fastest_layout(p.data)
        room = PACK_MEMORY_SHARE * (available_memory(torch.device("cpu")) + cpu_layout.twin_bytes())
        packed = 0
        for p in matrices:
            if cpu_layout.layout_for(p).packed and cpu_layout.pack(p, room):
                packed += 1
            else:
                cpu_layout.drop(p)
        return packed

    def _quantize_head(self, head: torch.Tensor) -> None:
        """The FP8 copy of `head` (the LM head's rows, as given) that logits() reads, with its per-row scales,
        quantized HEAD_QUANTIZE_WEIGHTS weights' rows at a time (each row on its own: the same codes as all at
        once)."""
        device = self.embed_tokens.weight.device
        codes = torch.empty(head.shape, dtype=kernels.FP8, device=device)
        scales = torch.empty(head.shape[0], dtype=torch.float32, device=device)
        chunk = max(1, HEAD_QUANTIZE_WEIGHTS // head.shape[1])
        for start in range(0, head.shape[0], chunk):
            rows = slice(start, start + chunk)
            codes[rows], scales[rows] = kernels.quantize_weight(head[rows].to(device, torch.bfloat16))
        self.lm_head_fp8, self.lm_head_fp8_scale = codes, scales

    def _fp8_matrices(self, quantize) -> None:
        """Each projection matrix W not in FP8 yet replaced by quantize(W) = (E4M3 weights, per-row scales); the
        architecture then says "fp8" (its checkpoint tables hold the scales: runtime/weights.py)."""
        for module in self.modules():
            for name in getattr(module, "matrices", ()):
                if getattr(module, name).dtype == kernels.FP8:
                    continue
                q, scale = quantize(getattr(module, name))
                setattr(module, name, nn.Parameter(q, requires_grad=False))
                setattr(module, f"{name}_scale", scale)
        self.arch = replace(self.arch, quantization="fp8")

    def kv_scales(self) -> dict[int, tuple[float, float]]:
        """{layer: (k_scale, v_scale)} of the attention layers with calibrated FP8 KV-cache scales."""
        return {
            i: (attention.k_scale.item(), attention.v_scale.item())
            for i, attention in self._gqa_layers()
            if attention.k_scale is not None
        }

    def drop_kv_scales(self) -> Model:
        """Forget calibrated KV-cache scales (the search's parent: its children's keys and values differ, and
        their layers are built without scale buffers). Returns self."""
        for _, attention in self._gqa_layers():
            attention.k_scale = attention.v_scale = None
        self.arch = replace(self.arch, kv_cache_scales=False)
        return self

    @torch.no_grad()
    def calibrate_kv_scales(self, windows: torch.Tensor, batch_size: int = 8) -> dict[int, tuple[float, float]]:
        """Each attention layer's FP8 KV-cache scales from text: the largest |rotated key| and |value| over the
        token windows [n, T], divided by 448 (E4M3's largest value), llm-compressor's static per-tensor scheme.
        Set on the layers (saved with the model: ArchConfig.kv_cache_scales) and returned as kv_scales() is. Refused:
        no tokens, or keys or values that are not finite (no scale could hold them)."""
        if windows.dim() != 2 or windows.numel() == 0:
            raise ValueError(f"KV-scale calibration needs token windows [n, T] with tokens, got {tuple(windows.shape)}")
        self._check_context(windows.shape[1])
        attention = self._gqa_layers()
        amax = {i: [0.0, 0.0] for i, _ in attention}

        def observer(i: int):
            def observe(k: torch.Tensor, v: torch.Tensor) -> None:
                for j, x in enumerate((k, v)):
                    largest = x.abs().max().item()
                    if not math.isfinite(largest):
                        raise ValueError(f"KV-scale calibration: layer {i}'s {'kv'[j]} holds {largest}")
                    amax[i][j] = max(amax[i][j], largest)

            return observe

        device = self.embed_tokens.weight.device
        for i, module in attention:
            module.observe_kv = observer(i)
        try:
            for start in range(0, windows.shape[0], batch_size):  # the layers only: no logits needed
                chunk = windows[start : start + batch_size].to(device)
                self.forward_packed(chunk.reshape(-1), Batch.sequences([chunk.shape[1]] * chunk.shape[0], device))
        finally:
            for _, module in attention:
                module.observe_kv = None
        for i, module in attention:
            k, v = (max(a / kernels.FP8_MAX, kernels.MIN_SCALE) for a in amax[i])
            module.k_scale = torch.tensor([k], dtype=torch.float32, device=device)
            module.v_scale = torch.tensor([v], dtype=torch.float32, device=device)
        self.arch = replace(self.arch, kv_cache_scales=True)
        return self.kv_scales()

    def init_weights(self, std: float = 0.02, seed: int | None = None, layers_only: bool = False) -> Model:
        """Random init for training from scratch, tests and benchmarks: N(0, std), output projections scaled
        by 1/sqrt(2·layers) (GPT-2), norms at 1. Drawn on the weights' device (same values as before on CPU).
        layers_only: the decoder layers alone (the embedding and head are shared with another model)."""
        drawn = self.layers if layers_only else self
        if any(p.dtype == kernels.FP8 for p in drawn.parameters()):
            raise ValueError("init_weights draws in the compute dtype: initialise before to_fp8, not after")
        device = next(self.layers.parameters(), self.embed_tokens.weight).device
        gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
        out_std = std / math.sqrt(2 * self.arch.n_layers)
        with torch.no_grad():
            for name, p in drawn.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    scale = out_std if name.endswith(("w_o", "w_down")) else std
                    p.copy_(torch.randn(p.shape, generator=gen, device=device) * scale)
        return self

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D/2] (fp32) for token positions [N].

        Computed from the positions at each forward (as transformers does), not gathered from a table over the
        whole context: a table of max_position_embeddings rows costs gigabytes at long contexts (2**24
        positions at D = 128: 8 GiB), while N x D/2 products are a few microseconds. The angles are the same
        fp32 products a table would hold."""
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self.arch.rope, self.arch.head_dim).to(device)
        angles = positions.float()[:, None] * self._inv_freq[device][None, :]  # (N, D/2)
        return angles.cos(), angles.sin()

    def forward_packed(
        self, tokens: torch.Tensor, batch: Batch, layer_outputs: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """tokens [N] -> final hidden states [N, H] (after the final norm); each layer's output [N, H] is
        appended to `layer_outputs` when given (global distillation matches them)."""
        if self.tp is None:
            h = self.embed_tokens(tokens)
        else:  # this rank's vocabulary rows: its tokens looked up, zeros for the rest, summed over the ranks
            rows = self.vocab_rows
            mine = (tokens >= rows.start) & (tokens < rows.stop)
            h = self.tp.all_reduce(self.embed_tokens(torch.where(mine, tokens - rows.start, 0)) * mine[:, None])
        cos, sin = self.rope_tables(batch.positions)
        for layer in self.layers:
            h = layer(h, batch, cos, sin)
            if layer_outputs is not None:
                layer_outputs.append(h)
        return self.norm(h)

    def _check_context(self, tokens: int) -> None:
        if tokens > self.arch.max_position_embeddings:
            raise ValueError(
                f"sequence of {tokens} tokens is longer than the context ({self.arch.max_position_embeddings})"
            )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_fp8 is None:
            weight, scale = self.lm_head_weight, None
        else:
            weight, scale = self.lm_head_fp8, self.lm_head_fp8_scale
        out = kernels.linear(hidden, weight, scale=scale)
        return out if self.tp is None else self.tp.all_gather_columns(out, self.vocab_widths)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (one full sequence per row, no cache) -> logits [B, T, vocab]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        self._check_context(t)
        batch = Batch.sequences([t] * b, input_ids.device)
        return self.logits(self.forward_packed(input_ids.reshape(-1), batch)).view(b, t, -1)
