"""End-to-end decode speed on CPU: tessera's generation loop vs transformers' `generate`, same weights.

Both run the bundled demo parent in float32 with greedy decoding, the same prompts (16 tokens each) and
exactly NEW_TOKENS new tokens per sequence (EOS ignored), at batch 1 and 8. Outputs are compared before
any speed is reported. Tokens/s = batch × NEW_TOKENS / median wall time of the whole `generate` call
(prefill included on both sides; at 16 prompt tokens it is a small share). Goal (issue 2): >= 1.5x at
batch 1. Writes benchmarks/results/cpu_generate.{json,md}.
"""

from __future__ import annotations

import pytest
import torch

from tessera.demo_parent import PARENT_DIR
from tessera.runtime import load_model
from tessera.runtime.generate import Generator
from tessera.runtime.sampling import SamplingParams

from .harness import environment, write_results

PROMPT_LEN, NEW_TOKENS, BATCHES = 16, 64, (1, 8)
_measured: dict[tuple[str, int], float] = {}


def _prompts(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(100, 8000, (batch, PROMPT_LEN), generator=gen)


@pytest.fixture(scope="module")
def models():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM.from_pretrained(PARENT_DIR, dtype=torch.float32).eval()
    return Generator(load_model(PARENT_DIR)), hf


def _run_tessera(gen: Generator, prompts: torch.Tensor) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [c.tokens for c in gen.generate(prompts.tolist(), params)]


def _run_transformers(hf, prompts: torch.Tensor) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, PROMPT_LEN:].tolist()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("engine", ["transformers", "tessera"])
def test_decode_tokens_per_second(benchmark, models, engine: str, batch: int) -> None:
    gen, hf = models
    prompts = _prompts(batch)
    if engine == "tessera":
        # Same greedy tokens as transformers before any speed is reported (fp32, same weights).
        ours, theirs = _run_tessera(gen, prompts), _run_transformers(hf, prompts)
        agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (batch * NEW_TOKENS)
        assert agree >= 0.95, f"tessera and transformers disagree on {1 - agree:.1%} of greedy tokens"
    run = (lambda: _run_tessera(gen, prompts)) if engine == "tessera" else (lambda: _run_transformers(hf, prompts))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain correctness run)
        _measured[(engine, batch)] = batch * NEW_TOKENS / benchmark.stats.stats.median


def test_write_results() -> None:
    if len(_measured) < 2 * len(BATCHES):
        pytest.skip("benchmarks disabled or incomplete")
    rows, lines = [], ["| batch | transformers tokens/s | tessera tokens/s | speedup |", "|---:|---:|---:|---:|"]
    for batch in BATCHES:
        theirs, ours = _measured[("transformers", batch)], _measured[("tessera", batch)]
        rows.append(
            {
                "batch": batch,
                "transformers_tokens_per_s": theirs,
                "tessera_tokens_per_s": ours,
                "speedup": ours / theirs,
            }
        )
        lines.append(f"| {batch} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x |")
    env = environment()
    results = {
        **env,
        "benchmark": "decode tokens/s, demo parent, float32, greedy",
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": NEW_TOKENS,
        "baseline": "transformers LlamaForCausalLM.generate (same weights, same run)",
        "results": rows,
    }
    md = f"Decode speed on {env['device']} (commit {env['commit']}, {env['date']})\n\n" + "\n".join(lines)
    write_results("cpu_generate", results, md)
    print("\n" + md)
