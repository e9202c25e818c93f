"""A hostile user at the command line (issue 15): every mistake ends in one line and exit status 2 before any
work starts, outputs never replace what they should not, Ctrl-C ends in one line, and `tessera bench` leaves
the committed results alone. The expensive steps are replaced by stand-ins that fail the test if reached."""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera import cli
from tessera.cli import build_parser
from tessera.demo import CORPUS_DIR, PARENT_DIR
from tessera.search.data import read_corpus

from .test_cli import run_cli


def _work_started(*args, **kwargs):
    raise AssertionError("the command started working before its arguments were checked")


@pytest.fixture
def no_work(monkeypatch):
    """Every command's first expensive step fails the test: errors must come before it."""
    import tessera.benchmarks.run
    import tessera.demo.build
    import tessera.runtime.loader
    import tessera.runtime.server
    import tessera.search.cost
    import tessera.search.data
    import tessera.search.pipeline

    monkeypatch.setattr(tessera.search.pipeline, "optimize", _work_started)
    monkeypatch.setattr(tessera.runtime.loader, "load_model", _work_started)
    monkeypatch.setattr(tessera.search.cost, "calibrate", _work_started)
    monkeypatch.setattr(tessera.runtime.server, "build_server", _work_started)
    monkeypatch.setattr(cli, "_generator", _work_started)
    for name in ("run_kernels", "run_model", "run_fusion", "run_serving"):
        monkeypatch.setattr(tessera.benchmarks.run, name, _work_started)
    monkeypatch.setattr(tessera.search.data, "load_parent", _work_started)
    monkeypatch.setattr(tessera.demo.build, "train_parent", _work_started)  # it writes into demo/parent
    monkeypatch.setattr(tessera.demo.build, "snapshot_corpus", _work_started)


@pytest.fixture
def corpus(tmp_path_factory) -> Path:
    """A small corpus cut from the demo's (the fuse tests' stand-in for run_fusion needs real token ids)."""
    root = tmp_path_factory.mktemp("corpus")
    for split in ("train", "validation"):
        (root / f"{split}.txt.xz").write_bytes(lzma.compress(read_corpus(split, CORPUS_DIR)[:20_000].encode()))
    return root


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    got, _, err = run_cli(capsys, *argv)
    assert got == code, (got, err)
    assert err.startswith("tessera: ") and err.count("\n") == 1, err
    return err


def argparse_error(capsys, argv: list[str]) -> str:
    """argparse's own report: usage, then `tessera CMD: error: argument --FLAG: ...` (exit 2)."""
    got, _, err = run_cli(capsys, *argv)
    assert got == 2, err
    return err.strip().splitlines()[-1]


# 1. Output paths are checked before anything runs.


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["optimize", "--out", "{file}"], "is a file"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "{file}"], "is a file"),
        (["optimize", "--out", "{file}/sub"], "is a file"),
        (["calibrate", "--model", str(PARENT_DIR), "--out", "{dir}"], "is a folder"),
        (["calibrate", "--model", str(PARENT_DIR), "--out", "{dir}/missing/cost.json"], "does not exist"),
        (["bench", "kernels", "--results", "{file}"], "is a file"),
    ],
)
def test_output_paths_are_checked_first(no_work, tmp_path, capsys, argv, expected) -> None:
    (tmp_path / "f.txt").write_text("mine\n")
    argv = [a.format(file=tmp_path / "f.txt", dir=tmp_path) for a in argv]
    err = one_line_error(capsys, argv)
    assert expected in err and str(tmp_path) in err
    assert (tmp_path / "f.txt").read_text() == "mine\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [["optimize"], ["fuse", "--model", str(PARENT_DIR)]])
def test_an_output_where_nothing_can_be_written_is_refused_first(no_work, capsys, command) -> None:
    """/proc takes no new folder even from root, whose permission bits all pass: the output's folder is tried by
    making one there, before any work (fuse's analysis was lost to a traceback at its end)."""
    err = one_line_error(capsys, [*command, "--out", "/proc/tessera-out"])
    assert "--out /proc/tessera-out: /proc is not writable (" in err


# 2. --out that holds something else is refused unless --overwrite.


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A copy of the demo parent: config, weights, tokenizer, its training.json and plot."""
    return Path(shutil.copytree(PARENT_DIR, tmp_path / "mymodel"))


def test_fuse_refuses_a_model_folder(no_work, model_copy, capsys) -> None:
    before = sorted(p.name for p in model_copy.iterdir())
    err = one_line_error(capsys, ["fuse", "--model", str(PARENT_DIR), "--out", str(model_copy)])
    assert "--overwrite" in err and str(model_copy) in err
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_optimize_refuses_a_model_folder(no_work, model_copy, capsys) -> None:
    err = one_line_error(capsys, ["optimize", "--out", str(model_copy)])
    assert "--overwrite" in err and "optimize" in err


def test_calibrate_refuses_a_file_that_is_not_a_cost_table(no_work, tmp_path, capsys) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    err = one_line_error(capsys, ["calibrate", "--model", str(PARENT_DIR), "--out", str(notes)])
    assert "--overwrite" in err and notes.read_text() == '{"mine": 1}\n'


def test_calibrate_warns_of_a_negative_non_block_part(monkeypatch, tmp_path, capsys) -> None:
    """A table whose blocks add up to more than the whole model (noisy timings) is written, with a warning saying
    what optimize will make of it (it was written without a word)."""
    import tessera.search.cost as cost
    from tessera.search.cost import CostTable

    def noisy(arch, blocks, scenario, device, dtype, validate):
        return CostTable("cpu", "float32", scenario, -10.2, 1.0, {})

    monkeypatch.setattr(cost, "calibrate", noisy)
    code, out, err = run_cli(capsys, "calibrate", "--model", str(PARENT_DIR), "--out", str(tmp_path / "c.json"))
    assert code == 0 and "non-block -10.20 ms" in out and (tmp_path / "c.json").is_file()
    assert "warning: the non-block part came out negative (-10.20 ms" in err
    monkeypatch.setattr(cost, "calibrate", lambda *a: CostTable("cpu", "float32", a[2], 0.5, 1.0, {}))
    code, _, err = run_cli(capsys, "calibrate", "--model", str(PARENT_DIR), "--out", str(tmp_path / "c.json"))
    assert code == 0 and "warning" not in err


def test_outputs_must_not_hold_the_inputs(no_work, tmp_path, capsys) -> None:
    model = Path(shutil.copytree(PARENT_DIR, tmp_path / "work" / "model"))
    err = one_line_error(capsys, ["fuse", "--model", str(model), "--out", str(tmp_path / "work"), "--overwrite"])
    assert "--model" in err and (model / "config.json").is_file()
    err = one_line_error(capsys, ["optimize", "--model", str(model), "--out", str(model), "--overwrite"])
    assert "--model" in err and (model / "config.json").is_file()


def _fake_run_fusion(calls: list):
    def run_fusion(
        model,
        train_ids,
        windows,
        out,
        cfg,
        scenario,
        tokenizer_from=None,
        progress=True,
        timing_dtype=None,
        keep_checkpoint=False,
    ):
        calls.append(Path(out))
        return {"groups": [{"layers": [1, 2]}]}

    return run_fusion


def fuse_argv(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["fuse", "--model", str(PARENT_DIR), "--out", str(out), "--corpus", str(corpus), *extra]


def test_fuse_overwrite_hands_the_folder_to_run_fusion(monkeypatch, model_copy, corpus, capsys) -> None:
    """With --overwrite another model's folder is accepted, and run_fusion gets --out itself: it replaces the
    folder whole (tests/test_fusion.py). A previous fuse output is accepted without --overwrite, unless it holds files
    fuse does not write (a user's), which replacing it would delete."""
    import tessera.search.fusion

    calls: list[Path] = []
    monkeypatch.setattr(tessera.search.fusion, "run_fusion", _fake_run_fusion(calls))
    (model_copy / "fusion.md").write_text("# fused\n")
    (model_copy / "fusion.json").unlink(missing_ok=True)
    code, _, err = run_cli(capsys, *fuse_argv(model_copy, corpus, "--overwrite"))
    assert code == 0 and calls == [model_copy], err
    (model_copy / "fusion.json").write_text("{}\n")  # now a previous fuse output, with files fuse never writes
    err = one_line_error(capsys, fuse_argv(model_copy, corpus))
    assert "also holds training.json, training.png, which `tessera fuse` would delete" in err and "--overwrite" in err
    assert calls == [model_copy] and (model_copy / "training.json").is_file()
    for name in ("training.json", "training.png"):
        (model_copy / name).unlink()
    code, _, err = run_cli(capsys, *fuse_argv(model_copy, corpus))
    assert code == 0 and calls == [model_copy] * 2, err


def _fake_optimize(calls: list):
    def optimize(parent, out, budget, cfg, corpus, fresh=False):
        calls.append((out, fresh))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bld").mkdir(exist_ok=True)
        (out / "cost.json").write_text("{}\n")
        (out / "results.json").write_text("{}\n")
        (out / "report.md").write_text("# report\n")
        return {"child_dir": str(out / "child")}

    return optimize


def test_optimize_resumes_its_own_run_and_overwrite_clears_the_rest(monkeypatch, model_copy, tmp_path, capsys):
    import tessera.search.pipeline

    calls: list = []
    monkeypatch.setattr(tessera.search.pipeline, "optimize", _fake_optimize(calls))
    run = tmp_path / "run"
    (run / "bld").mkdir(parents=True)  # an interrupted run: the cost table and some distilled blocks
    (run / "cost.json").write_text("{}\n")
    assert run_cli(capsys, "optimize", "--out", str(run))[0] == 0 and len(calls) == 1
    # A child/ or fused/ the run replaces whole, holding a file of the user's: refused, as at the top (was deleted).
    for sub in ("child", "fused"):
        (run / sub).mkdir()
        (run / sub / "config.json").write_text("{}")
        (run / sub / "notes.txt").write_text("mine")
        code, _, err = run_cli(capsys, "optimize", "--out", str(run))
        assert (
            code == 2 and f"{run / sub}: the output of a previous `tessera optimize` that also holds notes.txt" in err
        )
        assert len(calls) == 1 and (run / sub / "notes.txt").is_file()
        shutil.rmtree(run / sub)
    code, _, err = run_cli(capsys, "optimize", "--out", str(model_copy), "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in model_copy.iterdir()) == ["bld", "cost.json", "report.md", "results.json"]


def test_further_scenarios_are_taken_once_each_without_the_main_one(monkeypatch, tmp_path, capsys):
    """--also-scenario repeated, or naming the main scenario (here 2x16x8), is not calibrated
    and measured again: each further scenario once."""
    import tessera.search.pipeline
    from tessera.search.cost import Scenario

    seen = []
    monkeypatch.setattr(tessera.search.pipeline, "optimize", lambda parent, out, budget, cfg, *a, **k: seen.append(cfg))
    args = ["optimize", "--out", str(tmp_path / "run"), "--batch", "2", "--prompt-len", "16", "--gen-len", "8"]
    for spec in ("1x16x8", "1x16x8", "2x16x8", "4x16x8"):
        args += ["--also-scenario", spec]
    run_cli(capsys, *args)
    assert seen[0].also_scenarios == (Scenario(1, 16, 8), Scenario(4, 16, 8))


def test_fresh_reaches_the_pipeline(monkeypatch, tmp_path, capsys):
    """--fresh is the pipeline's `fresh` (it deletes the stored blocks: tests/test_bld_store.py)."""
    import tessera.search.pipeline

    calls: list = []
    monkeypatch.setattr(tessera.search.pipeline, "optimize", _fake_optimize(calls))
    assert run_cli(capsys, "optimize", "--out", str(tmp_path / "run"))[0] == 0
    assert run_cli(capsys, "optimize", "--out", str(tmp_path / "run"), "--fresh")[0] == 0
    assert [fresh for _, fresh in calls] == [False, True]


@pytest.fixture
def optimize_configs(monkeypatch) -> list:
    """The OptimizeConfig of each `tessera optimize` run from here on (the search itself faked)."""
    import tessera.search.pipeline

    configs: list = []

    def optimize(parent, out, budget, cfg, corpus, fresh=False):
        configs.append(cfg)
        return _fake_optimize([])(parent, out, budget, cfg, corpus, fresh)

    monkeypatch.setattr(tessera.search.pipeline, "optimize", optimize)
    return configs


def test_scoring_reaches_the_pipeline_and_bad_values_are_refused(optimize_configs, tmp_path, capsys):
    configs = optimize_configs
    run = str(tmp_path / "run")
    assert run_cli(capsys, "optimize", "--out", run)[0] == 0
    assert run_cli(capsys, "optimize", "--out", run, "--scoring", "fisher", "--fisher-samples", "8")[0] == 0
    assert [(c.scoring, c.fisher_samples) for c in configs] == [("exact", 16), ("fisher", 8)]
    code, _, err = run_cli(capsys, "optimize", "--out", run, "--scoring", "taylor")
    assert code == 2 and "invalid choice: 'taylor'" in err
    code, _, err = run_cli(capsys, "optimize", "--out", run, "--fisher-samples", "0")
    assert code == 2 and "--fisher-samples" in err


def test_windows_longer_than_the_scoring_text_are_refused(optimize_configs, tmp_path, capsys):
    """A window as long as the text blocks are distilled and scored on cuts nothing there (its KL would read 0
    while the cost model prices its savings), and on barely longer text almost nothing: text of less than twice the
    widest window is refused, saying what to raise; --seq-len reaches BLD, scoring and GKD."""
    configs = optimize_configs
    run = str(tmp_path / "run")
    err = one_line_error(capsys, ["optimize", "--out", run, "--windows", "128,512"])
    assert "attention windows 512 need text at least twice as long" in err and "on 256-token windows" in err
    assert "a --seq-len of at least 1024" in err and not configs
    assert run_cli(capsys, "optimize", "--out", run, "--windows", "128,512", "--seq-len", "1024")[0] == 0
    assert [(c.seq_len, c.gkd.seq_len, c.space.windows) for c in configs] == [(1024, 1024, (128, 512))]


# 3. Numeric flags: each has a range, checked by argparse.


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["optimize", "--bld-steps", "0"], "--bld-steps"),
        (["optimize", "--seq-len", "0"], "--seq-len"),
        (["optimize", "--gkd-steps", "-1"], "--gkd-steps"),
        (["optimize", "--target-speedup", "nan"], "--target-speedup"),
        (["optimize", "--target-speedup", "0.5"], "--target-speedup"),
        (["optimize", "--max-latency-ms", "-3"], "--max-latency-ms"),
        (["optimize", "--max-memory-mib", "inf"], "--max-memory-mib"),
        (["optimize", "--min-throughput", "0"], "--min-throughput"),
        (["optimize", "--max-kv-heads", "0"], "--max-kv-heads"),
        (["optimize", "--pareto", "1.25,abc"], "--pareto"),
        (["optimize", "--pareto", "nan"], "--pareto"),
        (["optimize", "--batch", "0"], "--batch"),
        (["optimize", "--also-scenario", "1x128"], "--also-scenario"),
        (["optimize", "--also-scenario", "0x128x64"], "--also-scenario"),
        (["optimize", "--ffn-multiple", "0"], "--ffn-multiple"),
        (["calibrate", "--model", str(PARENT_DIR), "--validate", "-1"], "--validate"),
        (["calibrate", "--model", str(PARENT_DIR), "--prompt-len", "0"], "--prompt-len"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "x", "--eval-windows", "0"], "--eval-windows"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "x", "--threshold", "nan"], "--threshold"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "x", "--threshold", "-0.1"], "--threshold"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "x", "--heal-steps", "-1"], "--heal-steps"),
        (["fuse", "--model", str(PARENT_DIR), "--out", "x", "--block-threshold", "inf"], "--block-threshold"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--max-batch", "0"], "--max-batch"),
        (["serve", "--kv-cache-gib", "nan"], "--kv-cache-gib"),
        (["serve", "--graceful-timeout", "-1"], "--graceful-timeout"),
        (["serve", "--max-model-len", "0"], "--max-model-len"),
        (["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--top-p", "inf"], "--top-p"),
        (["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["search", "solve", "--library", "x.json", "--solutions", "0"], "--solutions"),
        (["demo-parent", "train", "--steps", "0"], "--steps"),
    ],
)
def test_numeric_flags_are_range_checked(no_work, capsys, argv, flag) -> None:
    line = argparse_error(capsys, argv)
    assert line.startswith(f"tessera {argv[0]}") and f"error: argument {flag}" in line, line


def test_every_numeric_flag_has_a_range() -> None:
    """A new int/float flag without a checked range fails here (argparse's bare int/float take nan, -1, 70000)."""

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    bare = [
        f"{p.prog} {'/'.join(a.option_strings)}"
        for p in parsers(build_parser())
        for a in p._actions
        if a.type in (int, float)
    ]
    assert bare == []


def test_seed_outside_what_torch_takes(no_work, capsys) -> None:
    line = argparse_error(capsys, ["generate", "--model", str(PARENT_DIR), "--prompt", "x", "--seed", str(2**70)])
    assert "argument --seed: expected an integer in [-9223372036854775808, 18446744073709551615]" in line


def test_more_threads_than_cores_is_refused(no_work, capsys) -> None:
    """5,000 threads on 2 cores: the engine process spun for minutes without starting."""
    cores = os.cpu_count() or 1
    err = one_line_error(capsys, ["serve", "--threads", str(cores + 1)])
    assert f"--threads {cores + 1}: this machine has {cores} cores" in err


# 4. Ctrl-C.


def test_interrupted_optimize_says_how_to_resume(monkeypatch, tmp_path, capsys) -> None:
    import tessera.search.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tessera.search.pipeline, "optimize", interrupted)
    err = one_line_error(capsys, ["optimize", "--out", str(tmp_path / "run")], code=130)
    assert err.startswith("tessera: interrupted") and "rerun the same command to resume" in err
    assert str(tmp_path / "run") in err
    # Rerun as it was, --fresh would delete the blocks it kept: the advice leaves it out.
    err = one_line_error(capsys, ["optimize", "--out", str(tmp_path / "run"), "--fresh"], code=130)
    assert "rerun the command without --fresh to resume" in err


def test_interrupted_generate_is_one_line(monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_generator", interrupted)
    err = one_line_error(capsys, ["generate", "--model", str(PARENT_DIR), "--prompt", "x"], code=130)
    assert err == "tessera: interrupted\n"


# 5. Text that is not UTF-8 (argv arrives with surrogate escapes).


@pytest.mark.parametrize("flag", ["--prompt", "--stop"])
def test_text_that_is_not_utf8(no_work, capsys, flag) -> None:
    argv = ["generate", "--model", "/nonexistent", "--prompt", "x", flag, "ab\udcff"]
    line = argparse_error(capsys, argv)
    assert f"argument {flag}: not valid UTF-8" in line and "0xff" in line


# 6. Corpus errors.


@pytest.mark.parametrize("command", ["optimize", "fuse"])
def test_missing_corpus_is_found_first_and_not_told_to_rebuild_the_demo(no_work, tmp_path, capsys, command) -> None:
    (tmp_path / "corpus").mkdir()
    argv = [command, "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")]
    argv += ["--model", str(PARENT_DIR)] if command == "fuse" else []
    err = one_line_error(capsys, argv)
    assert str(tmp_path / "corpus" / "train.txt.xz") in err and "validation.txt.xz" in err
    assert "demo-parent corpus" not in err and err.count(str(tmp_path)) == 1
    assert not (tmp_path / "out").exists()


def test_corpus_that_is_not_xz_text(no_work, tmp_path, capsys) -> None:
    for split in ("train", "validation"):
        (tmp_path / f"{split}.txt.xz").write_bytes(b"not xz")
    with pytest.raises(ValueError, match=r"train\.txt\.xz: not xz-compressed"):
        read_corpus("train", tmp_path)


def test_ctrl_c_in_a_real_process(tmp_path) -> None:
    """SIGINT to the console script mid-run (optimize, loading the parent): one line, exit status 130."""
    exe = Path(sys.executable).parent / "tessera"
    out = tmp_path / "run"
    # A shell's background jobs start with SIGINT ignored, and the child would inherit that: restore the default.
    proc = subprocess.Popen(
        [str(exe), "optimize", "--out", str(out), "--bld-steps", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a run that ignored the interrupt must not go on into the next tests
    assert proc.returncode == 130, err
    assert (
        err.splitlines()[-1]
        == f"tessera: interrupted; rerun the same command to resume (the blocks distilled so far, if any, are kept in "
        f"{out}/bld)"
    )


def test_ctrl_c_that_native_code_turns_into_another_error_is_still_an_interrupt(monkeypatch, capsys) -> None:
    """A KeyboardInterrupt raised inside native code can come out as another exception (safetensors reading a
    tensor gave "ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage'", and a
    traceback instead of the one line); after a Ctrl-C any error is the interrupt. Without one, it stays a bug."""
    from tessera import cli

    def interrupted_in_native_code(args) -> None:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(cli, "cmd_info", interrupted_in_native_code)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--model", "demo/parent"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "tessera: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler again

    def a_bug(args) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_info", a_bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["info", "--model", "demo/parent"])


def test_a_full_disk_is_one_line_and_the_earlier_output_stands(monkeypatch, tmp_path, capsys) -> None:
    """A write the file system refuses (a full disk: safetensors' error, or an OSError of a plain write) ends in one
    line naming the file, exit status 2, and the earlier checkpoint as it was (the save is atomic)."""
    import errno

    from safetensors import SafetensorError

    import tessera.runtime.loader as loader

    out = tmp_path / "fp8"
    assert run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(loader, "save_file", full)
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 2 and err.startswith("tessera: error: ") and "model.safetensors: could not be written" in err
    assert err.count("\n") == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == before

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "config.json"))

    monkeypatch.setattr(loader, "atomic_write_text", no_space)
    code, _, err = run_cli(capsys, "quantize", "--model", str(PARENT_DIR), "--out", str(out))
    assert code == 2 and "No space left on device" in err and "config.json" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_refused_optimize_leaves_no_output_folder(tmp_path, capsys) -> None:
    """--out is made once the inputs are checked: a missing parent (named as not a directory, not by its absent
    tokenizer) or a window past the parent's context leaves no empty folder behind (it once did)."""
    for extra, message in (
        (["--model", str(tmp_path / "nowhere")], "nowhere: not a directory"),
        (["--seq-len", "100000"], "seq_len 100000: the parent's context is"),
    ):
        out = tmp_path / "run" / "out"
        code, _, err = run_cli(capsys, "optimize", "--out", str(out), *extra)
        assert code == 2 and message in err and not (tmp_path / "run").exists(), err
