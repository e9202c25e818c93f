"""Tensor parallelism (runtime/parallel.py): 2 ranks in gloo process groups on the CPU give the logits of the
whole model in one process (fp32, 1e-5: the same math with the GEMMs split and summed in another order).

Models: the nemotron-nas test checkpoint (KV heads 4/2/1 of 8 query heads, so the 1-head layer is replicated on
both ranks; linear and no-op sublayers; an odd vocabulary of 101 split 51/50), and Qwen2 and Qwen3 children
with every block kind (q/k/v biases, q/k norms, windows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.runtime.loader import load_model, save_model
from tessera.runtime.parallel import TensorParallel, rank_arch, run_ranks, shard_logits, shard_model

from .conftest import nas_config, nas_tensors, relative_error, write_checkpoint
from .test_families import mixed_child

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    config = nas_config()
    paths = {"nemotron-nas": write_checkpoint(root / "nas", config, nas_tensors(config))}
    for family in ("qwen2", "qwen3"):
        paths[family] = save_model(mixed_child(family), root / family)
    return paths


@pytest.mark.parametrize("name", ["nemotron-nas", "qwen2", "qwen3"])
def test_two_ranks_give_the_single_process_logits(checkpoints, name) -> None:
    path = checkpoints[name]
    model = load_model(path)
    ids = torch.randint(0, model.arch.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    for logits in run_ranks(shard_logits, 2, str(path), ids):
        assert logits.shape == expected.shape
        assert relative_error(logits, expected) <= FP32_TOL


def test_each_rank_holds_its_share(checkpoints) -> None:
    """A rank's shard has the parameter count `tessera info --tensor-parallel-size` gives, and its KV heads."""
    model = load_model(checkpoints["nemotron-nas"])
    arch = model.arch
    for rank in range(2):
        local = rank_arch(arch, rank, 2)
        assert local.n_heads == arch.n_heads // 2
        assert [b.attention.n_kv_heads for b in local.blocks] == [
            None if b.attention.kind != "gqa" else max(1, b.attention.n_kv_heads // 2) for b in arch.blocks
        ]
    shards = [shard_model(model, TensorParallel(r, 2)) for r in range(2)]
    counts = [sum(p.numel() for p in s.parameters()) for s in shards]
    assert max(counts) == arch.rank_params(2)  # rank 0 holds the larger shares of odd sizes
    assert sum(counts) >= arch.num_params()  # replicated norms and KV heads on top of the split


def test_tensor_parallel_generate_equals_one_process(checkpoints, capsys) -> None:
    """`tessera generate --tensor-parallel-size 2` (every rank running the engine over its shard) gives the
    single-process greedy text on the demo parent; `generate_on_ranks` the same tokens on a Qwen3 child with
    windows, its prompts past the window; a size the heads do not divide is one line naming the flag."""
    import json

    from tessera.cli import main
    from tessera.demo import PARENT_DIR
    from tessera.runtime.generate import Generator
    from tessera.runtime.parallel import generate_on_ranks
    from tessera.runtime.sampling import SamplingParams

    def run(*extra: str) -> list:
        args = ["generate", "--model", str(PARENT_DIR), "--prompt", "def f(x):", "--prompt", "import os"]
        assert main([*args, "--max-new-tokens", "12", "--json", *extra]) in (0, None)
        return json.loads(capsys.readouterr().out)

    assert run("--tensor-parallel-size", "2") == run()
    path = checkpoints["qwen3"]
    prompts = [list(range(3, 40)), [5, 9, 2, 7]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = [c.tokens for c in Generator(load_model(path)).generate(prompts, params)]
    assert [c.tokens for c in generate_on_ranks(path, prompts, params, 2)] == expected
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--tensor-parallel-size", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel-size: tensor parallel size 3" in err and err.count("\n") == 1
