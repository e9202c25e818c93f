"""The `tessera` command line: info on bare configs, generate on the shipped demo parent, clean errors."""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.cli import main
from tessera.demo import PARENT_DIR

from .conftest import CONFIGS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("name", "params"),
    [("llama-3_1-nemotron-51b-instruct.json", 51_501_015_040), ("llama-3.1-8b.json", 8_030_261_248)],
)
def test_info_json_on_a_directory_with_only_config(tmp_path: Path, capsys, name: str, params: int) -> None:
    shutil.copy(CONFIGS / name, tmp_path / "config.json")
    code, out, _ = run_cli(capsys, "info", "--model", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["num_params"] == params
    assert info["kv_bytes_per_token"] == sum(layer["kv_bytes_per_token"] for layer in info["layers"])


def test_info_table(capsys) -> None:
    code, out, _ = run_cli(capsys, "info", "--model", str(CONFIGS / "llama-3_1-nemotron-51b-instruct.json"))
    assert code == 0 and "51,501,015,040" in out
    assert "gqa kv=1" in out and "linear" in out and "none" in out


def test_info_bad_config_is_one_line(tmp_path: Path, capsys) -> None:
    cfg = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    cfg["num_key_value_heads"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(capsys, "info", "--model", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "num_key_value_heads=7 does not divide" in err and str(tmp_path) in err


def test_demo_shows_its_training_report_and_passes_over_a_foreign_one(tmp_path: Path, capsys) -> None:
    code, printed, _ = run_cli(capsys, "demo", "--max-new-tokens", "2")
    assert code == 0 and "trained: validation loss" in printed and printed.count("--- finish:") == 6  # 3 prompts x 2
    model = Path(shutil.copytree(PARENT_DIR, tmp_path / "model"))
    for text in ('{"loss": 1}', "{not json"):  # another tool's training.json: a line, not a KeyError
        (model / "training.json").write_text(text)
        code, printed, err = run_cli(capsys, "demo", "--model", str(model), "--max-new-tokens", "2")
        assert code == 0 and "is not a tessera training report" in printed, err


def test_generate_on_demo_parent(capsys) -> None:
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(PARENT_DIR),
        "--prompt",
        "import os\n",
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "8",
        "--json",
    )
    results = json.loads(out)
    assert code == 0 and [r["prompt"] for r in results] == ["import os\n", "def f("]
    assert all(len(r["tokens"]) <= 8 and r["finish_reason"] in ("stop", "length") for r in results)


def test_generate_prints_logprobs(capsys) -> None:
    """--logprobs K: each token's log-probability and its K likeliest (as Generator reports them), in the JSON and in
    the text output; without it, none."""
    from tessera.runtime.generate import Generator
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import SamplingParams, load_tokenizer

    args = ("generate", "--model", str(PARENT_DIR), "--prompt", "def f(", "--max-new-tokens", "5")
    [result] = json.loads(run_cli(capsys, *args, "--logprobs", "2", "--json")[1])
    gen = Generator(load_model(PARENT_DIR), load_tokenizer(PARENT_DIR))
    [expected] = gen.generate(["def f("], SamplingParams(5, logprobs=2))
    assert [e["token"] for e in result["logprobs"]] == result["tokens"] == expected.tokens
    assert [e["logprob"] for e in result["logprobs"]] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert [[t for t, _ in e["top"]] for e in result["logprobs"]] == [[t for t, _ in e.top] for e in expected.logprobs]
    code, printed, _ = run_cli(capsys, *args, "--logprobs", "1")
    assert code == 0 and printed.count("; likeliest: ") == len(expected.tokens)
    assert "logprobs" not in json.loads(run_cli(capsys, *args, "--json")[1])[0]


def test_quantize_then_generate_in_fp8_equals_quantizing_at_load(tmp_path: Path, capsys) -> None:
    """`tessera quantize` writes an FP8 checkpoint; generating from it gives the tokens of the bf16 parent
    quantized at load (the same E4M3 weights either way), and `--overwrite` is needed to write over other files."""
    out = tmp_path / "fp8"
    code, printed, _ = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 0 and "FP8 checkpoint" in printed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    args = ("generate", "--prompt", "def f(", "--max-new-tokens", "12", "--dtype", "fp8", "--json")
    stored = json.loads(run_cli(capsys, *args, "--model", str(out))[1])
    at_load = json.loads(run_cli(capsys, *args, "--model", str(PARENT_DIR))[1])
    assert stored[0]["tokens"] == at_load[0]["tokens"] and len(stored[0]["tokens"]) == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(tmp_path / "other"))
    assert code == 2 and "pass --overwrite" in err
    # Another model's checkpoint (every one has a config.json) is not an earlier quantize output: refused, its
    # weights untouched; with --overwrite replaced whole, none of its files (its tokenizer, notes) kept.
    shutil.copytree(PARENT_DIR, tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "tokenizer.json").write_text("{}")  # another model's tokenizer
    weights = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(tmp_path / "checkpoint"))
    assert code == 2 and "pass --overwrite" in err
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == weights
    code, _, _ = run_cli(
        capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(tmp_path / "checkpoint"), "--overwrite"
    )
    assert code == 0
    assert (tmp_path / "checkpoint" / "tokenizer.json").read_bytes() == (PARENT_DIR / "tokenizer.json").read_bytes()
    assert not (tmp_path / "checkpoint" / "training.json").exists()  # the parent's training report, not this model's
    code, _, _ = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))  # an earlier output
    assert code == 0
    # One the user has added notes to: replacing it whole would delete them, so --overwrite is asked for.
    (out / "README.md").write_text("my notes")
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 2 and "also holds README.md, which `tessera quantize` would delete" in err
    assert (out / "README.md").read_text() == "my notes"
    (out / "README.md").unlink()
    # So is a tokenizer-named file the source does not have (a chat template the user added): it was once taken for
    # one the command writes, and deleted.
    assert not (PARENT_DIR / "chat_template.jinja").exists()
    (out / "chat_template.jinja").write_text("{{ messages }}")
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 2 and "also holds chat_template.jinja" in err and (out / "chat_template.jinja").is_file()
    (out / "chat_template.jinja").unlink()
    # An FP8 checkpoint another tool wrote (llm-compressor records its version) is not one of ours either.
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["version"] = "0.6.0"
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 2 and "pass --overwrite" in err


def test_quantize_with_kv_cache_scales_then_generate_with_an_fp8_cache(tmp_path: Path, capsys) -> None:
    """`quantize --kv-cache-scales` calibrates every attention layer's scales into the checkpoint; generating with
    `--kv-cache-dtype fp8` from it says nothing about them, from the parent (no scales) it says they are 1.0."""
    out = tmp_path / "fp8"
    code, printed, _ = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out), "--kv-cache-scales")
    assert code == 0 and "FP8 KV-cache scales of 8 layers" in printed
    assert "kv_cache_scheme" in json.loads((out / "config.json").read_text())["quantization_config"]
    args = ("generate", "--prompt", "def f(", "--max-new-tokens", "6", "--kv-cache-dtype", "fp8", "--json")
    code, printed, err = run_cli(capsys, *args, "--model", str(out), "--dtype", "fp8")
    assert code == 0 and len(json.loads(printed)[0]["tokens"]) == 6 and "scale 1.0" not in err
    code, _, err = run_cli(capsys, *args, "--model", str(PARENT_DIR))
    assert code == 0 and "no FP8 KV-cache scales" in err
    code, _, err = run_cli(capsys, *args[:-1], "--model", str(PARENT_DIR), "--kv-cache-dtype", "int4")
    assert code == 2 and "--kv-cache-dtype" in err
    code, _, err = run_cli(
        capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(tmp_path / "q"), "--corpus", "."
    )
    assert code == 2 and "add --kv-cache-scales" in err
    tiny = tmp_path / "tiny"  # a corpus shorter than one calibration window: said, not a torch.stack traceback
    tiny.mkdir()
    for split in ("train", "validation"):
        (tiny / f"{split}.txt.xz").write_bytes(lzma.compress(b"def f(x):\n    return x\n"))
    argv = ("quantize", "--model", str(PARENT_DIR), "--out", str(tmp_path / "q"), "--kv-cache-scales")
    code, _, err = run_cli(capsys, *argv, "--corpus", str(tiny))
    assert code == 2 and "its train split is 10 tokens, too few for windows of 512 (at least 513)" in err
    assert not (tmp_path / "q").exists()


def test_generate_sampled_is_seeded(capsys) -> None:
    args = ("generate", "--model", str(PARENT_DIR), "--prompt", "class ", "--max-new-tokens", "10")
    sampled = ("--temperature", "0.9", "--seed", "7", "--json")
    first = run_cli(capsys, *args, *sampled)[1]
    assert first == run_cli(capsys, *args, *sampled)[1]


def test_generate_prompt_longer_than_context(capsys) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(PARENT_DIR), "--prompt", "x = 1\n" * 2000)
    assert code == 2 and "the context is 1024 tokens" in err and err.count("\n") == 1


def test_generate_cuda_without_a_gpu(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "generate", "--model", str(PARENT_DIR), "--prompt", "x", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "tessera"
    result = subprocess.run([str(exe), "info", "--model", str(PARENT_DIR), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_layers"] == 8


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys) -> None:
    """UserError (and its subclasses: ConfigError, CheckpointError, ...) ends in one line, exit 2; any other
    exception, a plain ValueError from a kernel launcher's shape check say, is a bug and propagates."""
    import tessera.cli as cli
    from tessera.config import ConfigError

    def fail_with(error: Exception):
        def run(args) -> None:
            raise error

        return run

    monkeypatch.setattr(cli, "cmd_info", fail_with(ConfigError("config.json: hidden_size: expected an integer")))
    code, _, err = run_cli(capsys, "info", "--model", str(PARENT_DIR))
    assert code == 2 and err == "tessera: error: config.json: hidden_size: expected an integer\n"
    monkeypatch.setattr(cli, "cmd_info", fail_with(ValueError("swiglu_ffn: x must be 2-D, got (3, 4, 5)")))
    with pytest.raises(ValueError, match="must be 2-D"):
        main(["info", "--model", str(PARENT_DIR)])


@pytest.mark.parametrize(
    "command",
    [["calibrate", "--model", str(PARENT_DIR)], ["fuse", "--model", str(PARENT_DIR), "--groups", "1-2"]],
    ids=["calibrate", "fuse"],
)
def test_commands_of_rank_0_alone_leave_the_other_torchrun_ranks_idle(tmp_path: Path, monkeypatch, capsys, command):
    """Under `torchrun`, calibrate and fuse run on rank 0: rank 1 says so and writes nothing."""
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    assert main([*command, "--out", str(out)]) == 0
    assert "rank 1 has nothing to do" in capsys.readouterr().err and not out.exists()
