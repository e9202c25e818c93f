"""Tensor parallelism (runtime/parallel.py): 2 ranks in gloo process groups on the CPU give the logits of the
whole model in one process (fp32, 1e-5: the same math with the GEMMs split and summed in another order).

Models: the nemotron-nas test checkpoint (KV heads 4/2/1 of 8 query heads, so the 1-head layer is replicated on
both ranks; linear and no-op sublayers; an odd vocabulary of 101 split 51/50), Qwen2 and Qwen3 children
with every block kind (q/k/v biases, q/k norms, windows), and an FFN-Fusion output (fused wide FFNs, spans).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tessera.runtime.loader import load_model, save_model
from tessera.runtime.parallel import TensorParallel, rank_arch, run_ranks, shard_logits, shard_model
from tessera.search.fusion import FusionGroup, fuse

from .conftest import nas_config, nas_tensors, relative_error, write_checkpoint
from .test_families import mixed_child
from .test_fusion import tiny_model

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    config = nas_config()
    paths = {"nemotron-nas": write_checkpoint(root / "nas", config, nas_tensors(config))}
    for family in ("qwen2", "qwen3"):
        paths[family] = save_model(mixed_child(family), root / family)
    # FFN Fusion's output: runs of attention-free FFNs fused into wide ones (widths 160 and 64, spans saved).
    fused = fuse(tiny_model(), [FusionGroup((1, 3, 4)), FusionGroup((7, 8))])
    paths["fused"] = save_model(fused, root / "fused")
    return paths


@pytest.mark.parametrize("name", ["nemotron-nas", "qwen2", "qwen3", "fused"])
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
    # A rank's user error (here a prompt past the context, found as the ranks read it) is the same one line, not
    # the spawn's traceback of each rank.
    long = " ".join(["x"] * 2000)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(PARENT_DIR), "--prompt", long, "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("tessera: error: ") and "context" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["nemotron-nas", "qwen2", "qwen3"])
def test_a_rank_loads_only_its_parts_of_the_files(checkpoints, name, monkeypatch) -> None:
    """`load_shard` reads each tensor's part through a lazy safetensors slice (never the whole tensor) and builds
    the same shard, bit for bit, as sharding the whole model in memory."""
    import tessera.runtime.parallel as parallel

    path = checkpoints[name]
    read = []
    real = parallel.shard_part
    monkeypatch.setattr(parallel, "shard_part", lambda a, n, t, r, s: read.append(type(t)) or real(a, n, t, r, s))
    whole = load_model(path)
    for rank in range(2):
        read.clear()
        from_files = parallel.load_shard(path, TensorParallel(rank, 2))
        assert read and not any(issubclass(t, torch.Tensor) for t in read)  # lazy slices only
        in_memory = shard_model(whole, TensorParallel(rank, 2))
        assert from_files.arch == in_memory.arch
        for (n, a), b in zip(from_files.state_dict().items(), in_memory.state_dict().values()):
            assert torch.equal(a, b), n


def test_a_model_too_large_for_its_devices_is_refused_before_loading(monkeypatch, capsys) -> None:
    """serve and generate refuse, in one line, weights that do not fit the free memory (each engine process or
    CPU rank holding its copy or share), before anything is loaded."""
    import tessera.runtime.loader as loader
    from tessera.cli import main
    from tessera.demo import PARENT_DIR

    weights = load_model(PARENT_DIR).arch.num_params() * 4  # float32
    monkeypatch.setattr(loader, "available_memory", lambda device: weights - 1)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded before the memory check"))
    for args in (["serve"], ["generate", "--prompt", "x"], ["serve", "--data-parallel-size", "2"]):
        with pytest.raises(SystemExit) as e:
            main([*args, "--model", str(PARENT_DIR), "--device", "cpu"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "the weights need" in err and "GiB free" in err and err.count("\n") == 1
    monkeypatch.setattr(loader, "available_memory", lambda device: weights + 1)
    loader.check_memory(PARENT_DIR, torch.device("cpu"), torch.float32)  # fits
    with pytest.raises(loader.CheckpointError, match="x 2 engine processes"):
        loader.check_memory(PARENT_DIR, torch.device("cpu"), torch.float32, copies=2)


def test_generate_under_torchrun_equals_one_process(tmp_path, capsys, monkeypatch) -> None:
    """`torchrun --nproc-per-node 2 ... tessera generate` (torchrun's ranks, its rendezvous): rank 0 prints the
    single-process completions, greedy and seeded sampling alike; rank 1 prints nothing. The ranks and this process
    lay their weights out alike (TESSERA_CPU_LAYOUT): layouts measured per process may differ under load, and so
    may a seeded sample's last bits."""
    import json

    from tessera.cli import main
    from tessera.demo import PARENT_DIR
    from tessera.kernels.cpu_layout import LAYOUT_ENV

    monkeypatch.setenv(LAYOUT_ENV, "row-major")

    from .conftest import node_ended_well, torchrun

    args = ["generate", "--model", str(PARENT_DIR), "--prompt", "def f(x):", "--prompt", "import os", "--json"]
    args += ["--max-new-tokens", "12", "--temperature", "0.8", "--seed", "3"]
    (node,) = torchrun(args, tmp_path, nproc_per_node=2)
    assert node_ended_well(node, tmp_path / "node0.log", 120), (tmp_path / "node0.log").read_text()
    assert main(args) in (0, None)
    expected = capsys.readouterr().out
    log = (tmp_path / "node0.log").read_text()
    printed = re.search(r"^\[$.*?^\]$", log, re.M | re.S)  # the JSON rank 0 printed, among torchrun's lines
    assert json.loads(printed.group()) == json.loads(expected)
    assert log.count('"prompt": "def f(x):"') == 1  # from rank 0 alone


def _abort_rank_0(tp, when: str) -> int:
    """Rank 0 aborts (SIGABRT, as gloo's teardown sometimes does) before its work, or as its process exits."""
    import multiprocessing.util
    import os

    if tp.rank == 0 and when == "before":
        os.abort()
    if tp.rank == 0:
        multiprocessing.util.Finalize(None, os.abort, exitpriority=100)  # runs after _rank_main returns
    return tp.rank


def test_a_rank_aborting_in_teardown_keeps_the_results_but_not_before(monkeypatch) -> None:
    """`run_ranks` returns the results when a rank dies only after every rank published its own (gloo's
    occasional abort in teardown), and raises when a rank dies before its work is done."""
    import torch.multiprocessing as mp

    # The ranks import this module by name (spawned processes take the parent's sys.path).
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))

    assert run_ranks(_abort_rank_0, 2, "exit") == [0, 1]
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_ranks(_abort_rank_0, 2, "before")


def _start_with_rank_1_failing(rank: int, checkpoint: str, port: int, out: str) -> None:
    """_start_rank on 2 ranks where rank 1's shard fails to load (out of memory, say); each rank's error to a file."""
    import tessera.runtime.async_engine as async_engine
    from tessera.runtime.engine import EngineConfig

    async_engine.load_tokenizer = lambda path: None  # the test checkpoint has none: serve token ids
    if rank == 1:

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("CUDA out of memory on rank 1 (simulated)")

        async_engine.load_shard = out_of_memory
    spec = async_engine.EngineSpec(
        checkpoint, config=EngineConfig(max_batch=2, max_model_len=64), tensor_parallel_size=2
    )
    error = async_engine._start_rank(spec, rank, port)[2]
    try:
        torch.distributed.barrier()  # both ranks heard the errors before either tears its group down
        Path(out, f"rank{rank}.txt").write_text(error)
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_that_cannot_load_its_shard_names_itself_on_every_rank(checkpoints, tmp_path, monkeypatch) -> None:
    """Loading a shard takes no collective and ends in an exchange of errors before the engine (whose KV-pool
    agreement is a collective) is built: rank 1's failure reaches rank 0 as it is. Before, rank 0's pool agreement
    paired with rank 1's error exchange, and each read the other's message as an error."""
    import torch.multiprocessing as mp

    from tessera.runtime.parallel import free_port

    from .conftest import tolerating_teardown_aborts

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    # Once both ranks wrote what they heard, the check below stands; without the files it fails there.
    with tolerating_teardown_aborts():
        mp.spawn(
            _start_with_rank_1_failing, args=(str(checkpoints["nemotron-nas"]), free_port(), str(tmp_path)), nprocs=2
        )
    expected = "rank 1: RuntimeError: CUDA out of memory on rank 1 (simulated)"
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == [expected, expected]
