"""Offline generation: `Generator`, a thin layer over the serving engine's `Engine.generate`.

Tokens are produced by one path only, the engine's step (chunked prefill and paged decode, CUDA graphs on the
GPU), which `tessera serve` runs and the search's cost model times. So `tessera generate`, `Generator` and the
server give the same tokens for the same seeded sampling parameters (a request draws from a random stream set by
its `seed` alone, read at how many tokens it has sampled: sampling.request_uniforms; so requests given the same
seed draw the same stream, as in vLLM, whatever batch they share), and the finish logic (EOS, stop strings,
max_new_tokens, the context) exists once.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from tessera.runtime.engine import Engine, EngineConfig
from tessera.runtime.model import Model
from tessera.runtime.sampling import Completion, PromptEncoder, SamplingParams

MAX_BATCH = 256  # requests decoded together; more prompts wait their turn in the engine


class Generator:
    """Generation for one model (+ its tokenizer, needed for text prompts and stop strings).

    Keeps one engine, rebuilt only when a call needs more batch slots or a longer context than it has: building
    one allocates the KV pool and, on CUDA, captures the decode step's graphs."""

    def __init__(self, model: Model, tokenizer: Tokenizer | None = None, kv_cache_dtype: str = "auto") -> None:
        self.model, self.tokenizer, self.kv_cache_dtype = model, tokenizer, kv_cache_dtype
        context = model.arch.max_position_embeddings
        self.encoder = PromptEncoder(tokenizer, model.vocab_size, context, "max_position_embeddings")
        self.engine: Engine | None = None

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[Completion]:
        """Serve every prompt to completion (all submitted at once); completions in the prompts' order."""
        if not prompts:
            return []
        context = self.encoder.context
        encoded = [self.encoder(p, f"prompt {i}") for i, p in enumerate(prompts)]
        batch = min(len(encoded), MAX_BATCH)
        wanted = context if params.max_new_tokens is None else max(map(len, encoded)) + params.max_new_tokens
        length = min(context, wanted)
        if self.engine is None or self.engine.config.max_batch < batch or self.engine.max_model_len < length:
            if self.engine is not None:  # grow, never shrink: alternating calls do not rebuild each time
                batch, length = max(batch, self.engine.config.max_batch), max(length, self.engine.max_model_len)
                self.engine = None  # the old pool is freed before the new one is allocated
            config = EngineConfig(max_batch=batch, max_model_len=length, kv_cache_dtype=self.kv_cache_dtype)
            self.engine = Engine(self.model, self.tokenizer, config)
        return self.engine.run([self.engine.admit(tokens, params) for tokens in encoded])
