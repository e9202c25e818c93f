"""`tessera bench`: the kernel suites and the model decode benchmark run end to end (on CPU: the ops' references,
shrunken shapes) and write results that carry the device, commit, versions, baseline and copy bandwidth."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tessera.benchmarks import bench_model, harness
from tessera.cli import main
from tessera.demo import PARENT_DIR


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Where the runs write (--results); the harness's default is pointed there too, so a run that ignored the
    flag would leave the test's folder empty rather than touch the checkout."""
    monkeypatch.setenv("TESSERA_BENCH_RESULTS", str(tmp_path / "default"))
    return tmp_path / "results"


def test_results_default_outside_the_tracked_tree(monkeypatch) -> None:
    monkeypatch.delenv("TESSERA_BENCH_RESULTS", raising=False)
    default = harness.results_dir()
    repo = Path(harness.__file__).resolve().parent.parent
    assert default == repo / "runs" / "bench"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(default / "cpu_kernels_ffn.json")], cwd=repo)
    assert ignored.returncode == 0, f"{default} is not git-ignored"


def test_results_env_and_argument(results_dir, monkeypatch) -> None:
    path = harness.write_results("x", {"a": 1}, "table")
    assert path == results_dir.parent / "default" / "x.json" and path.with_suffix(".md").read_text() == "table\n"
    assert harness.write_results("y", {}, "", results_dir) == results_dir / "y.json"


def test_results_write_non_finite_numbers_as_null(results_dir) -> None:
    """A failed tiling's time (NaN) and an infinite ratio become JSON's null, which a strict parser reads."""
    results = {"rows": [{"ms": float("nan"), "speedup": float("inf"), "name": "x"}], "spread": (1.5, -float("inf"))}
    path = harness.write_results("z", results, "", results_dir)

    def refuse(token: str):
        raise ValueError(f"{token} in {path}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "rows": [{"ms": None, "speedup": None, "name": "x"}],
        "spread": [1.5, None],
    }


def test_in_turns_reverses_the_order_every_other_round_and_compares_round_by_round() -> None:
    """harness.InTurns: every side once a round, the order reversed every other round, round(*args) handing its
    arguments to each side; ratio is the median (min, max) of the rounds' own ratios, not the medians' quotient."""
    calls: list[tuple[str, int]] = []
    a_times, b_times = iter([10.0, 30.0, 20.0, 40.0]), iter([5.0, 10.0, 40.0, 20.0])

    def side(name, times):
        return lambda seed: calls.append((name, seed)) or next(times)

    turns = harness.InTurns({"a": side("a", a_times), "b": side("b", b_times)})
    for seed in range(4):
        turns.round(seed)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert turns.rounds == 4 and turns.times == {"a": [10, 30, 20, 40], "b": [5, 10, 40, 20]}
    assert turns.spread("a") == (25.0, 10.0, 40.0) and turns.spread("b") == (15.0, 5.0, 40.0)
    # Round ratios 2, 3, 0.5, 2: median 2, where the medians' quotient would say 25 / 15.
    assert turns.ratio("a", "b") == (2.0, 0.5, 3.0)
    assert turns.ratio("b", "a") == pytest.approx((0.5, 1 / 3, 2.0))
    assert harness.InTurns({"x": lambda: 1.0, "y": lambda: 2.0}).run(3).ratio("x", "y") == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("suite", ["norm", "ffn", "attention", "ffn_served"])
def test_bench_kernels_suite(results_dir, suite: str, capsys) -> None:
    assert main(["bench", "kernels", "--suite", suite, "--device", "cpu", "--results", str(results_dir)]) == 0
    results = json.loads((results_dir / f"cpu_kernels_{suite}.json").read_text())
    assert {"device", "date", "commit", "torch", "copy_bandwidth_gbps"} <= results.keys()
    rows = results["results"]
    assert rows and all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    for r in rows:
        assert r["tessera_ms"] > 0 and r["baseline_ms"] > 0 and r["baseline"]
        assert r["rounds"] == harness.KERNEL_ROUNDS and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    table = (results_dir / f"cpu_kernels_{suite}.md").read_text()
    assert "| speedup |" in table and table.count("\n") >= len(rows) + 3
    assert "wrote" in capsys.readouterr().out


def test_a_kernel_cases_sides_are_timed_in_turns_and_compared_round_by_round(monkeypatch) -> None:
    """measure_cases times a case's two sides in interleaved rounds (the order reversed every other round) and
    reports the median of the rounds' ratios with their range: here 2x (0.5-3x), where the quotient of the two
    medians (2 ms / 2 ms) would say 1x."""
    from tessera.benchmarks import bench_norm

    case = next(iter(bench_norm.cases(torch.device("cpu"))))
    times = {case.candidate: iter([1.0, 2.0, 4.0]), case.baseline: iter([2.0, 6.0, 2.0])}
    order = []

    def fake_time_ms(fn, device, graph=True, **budget):
        order.append("tessera" if fn is case.candidate else "baseline")
        return next(times[fn]), "fake"

    monkeypatch.setattr(harness, "time_ms", fake_time_ms)
    [row] = harness.measure_cases(iter([case]), torch.device("cpu"), 1.0)
    assert order == ["tessera", "baseline", "baseline", "tessera", "tessera", "baseline"]
    assert (row["speedup"], row["speedup_min"], row["speedup_max"]) == (2.0, 0.5, 3.0)
    assert (row["tessera_ms"], row["baseline_ms"]) == (2.0, 2.0)
    assert "2.00x (0.50-3.00)" in harness.kernel_table([row])


def test_bench_model(results_dir) -> None:
    assert main(["bench", "model", "--device", "cpu", "--results", str(results_dir)]) == 0
    results = json.loads((results_dir / "cpu_model_decode.json").read_text())
    rows = results["results"]
    fp8 = ["fp8 weights, bf16 KV cache", "fp8 weights, fp8 KV cache"]
    assert [(r["batch"], r.get("precision")) for r in rows] == [(b, p) for b in (1, 8) for p in (None, *fp8)]
    for r in rows:
        assert r["kernels"] == "torch" and r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        # On a CPU whose last-level cache holds the model, a step can beat the DRAM copy floor: 10x past it would be
        # a wrong floor (bytes miscounted), not a fast step.
        assert 0 < r["pct_of_bandwidth_floor"] <= 1000
    for plain, *quantized in (rows[:3], rows[3:]):  # each FP8 row against the bf16 step of its scenario
        for r in quantized:
            low, high = r["speedup_vs_unquantized_step_min"], r["speedup_vs_unquantized_step_max"]
            assert r["rounds"] == 3 and low <= r["speedup_vs_unquantized_step"] <= high
            assert r["floor_ms"] < plain["floor_ms"]
            # The CPU serves the FP8 reference path itself: the same bits. Against the unquantized logits, E4M3's
            # rounding (half a step: 6.25 % of a value, averaged down over each dot product) moves them by a few
            # percent, never by nothing; a lost scale would move them by ~100 %.
            assert r["logits_finite"] and r["logits_relative_error_vs_fp8_reference"] == 0.0
            assert 1e-3 < r["logits_relative_error_vs_unquantized"] < 0.1


def test_a_failing_case_is_recorded_and_every_case_written_as_it_ends(results_dir, monkeypatch) -> None:
    """On the GPU suite a case that raises (a kernel new to the device) or a step cut short by its time limit must
    not take the suite's other rows with it: the error is a row, the next case runs, and the file is rewritten
    after every case."""
    from dataclasses import replace

    from tessera.benchmarks import bench_norm

    real = list(bench_norm.cases(torch.device("cpu")))[:3]

    def no_kernel_image():
        raise RuntimeError("no kernel image is available for execution on the device")

    broken = replace(real[1], candidate=no_kernel_image)
    monkeypatch.setattr(bench_norm, "cases", lambda device: iter([real[0], broken, real[2]]))
    assert main(["bench", "kernels", "--suite", "norm", "--device", "cpu", "--results", str(results_dir)]) == 0
    rows = json.loads((results_dir / "cpu_kernels_norm.json").read_text())["results"]
    assert [("error" in r) for r in rows] == [False, True, False]
    assert rows[1]["error"] == "RuntimeError: no kernel image is available for execution on the device"
    assert rows[1].items() >= real[1].shape.items() and rows[2]["correct"]
    table = (results_dir / "cpu_kernels_norm.md").read_text()
    assert "RuntimeError: no kernel image" in table and table.count("x (") == 2  # the two measured rows' speedups
    seen: list[int] = []
    harness.measure_cases(iter(real[:2]), torch.device("cpu"), 1.0, written=lambda r: seen.append(len(r)))
    assert seen == [1, 2]


def test_bench_model_writes_each_scenario_and_records_an_fp8_failure(results_dir, monkeypatch) -> None:
    from tessera.benchmarks import bench_model as model_bench

    def fp8_fails(*args, **kwargs):
        raise RuntimeError("FP8 GEMM failed")

    monkeypatch.setattr(model_bench, "_fp8_rows", fp8_fails)
    partial: list[int] = []
    result = model_bench.run(torch.device("cpu"), 10.0, written=lambda r: partial.append(len(r["results"])))
    assert partial == [1, 2]  # after each of the CPU's two scenarios, its rows so far
    assert [r["batch"] for r in result["results"]] == [1, 8]
    assert result["fp8_errors"] == [f"batch {b} context 64: RuntimeError: FP8 GEMM failed" for b in (1, 8)]


def test_bench_model_pdl_alternates_the_modes_and_compares_their_logits(results_dir, capsys) -> None:
    """`bench model --pdl` on the CPU: a sanity pass of the GPU suite's PDL comparison (no kernel takes PDL here,
    which the result says): both modes timed in alternating rounds, the ratio and its spread from those times,
    the logits compared bit for bit. `--pdl` with another benchmark is refused by name."""
    assert main(["bench", "model", "--pdl", "--device", "cpu", "--results", str(results_dir)]) == 0
    results = json.loads((results_dir / "cpu_model_decode_pdl.json").read_text())
    assert results["pdl_available"] is False and [r["batch"] for r in results["results"]] == [1, 8]
    for r in results["results"]:
        assert r["same_logits"] is True and r["rounds"] == 5
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert 0 < r["pct_of_bandwidth_floor_with_pdl"] <= 1000  # as in test_bench_model
    assert "sanity pass" in (results_dir / "cpu_model_decode_pdl.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["bench", "fusion", "--pdl", "--device", "cpu", "--results", str(results_dir)])
    assert e.value.code == 2 and "--pdl compares decode steps" in capsys.readouterr().err


def test_a_step_profile_counts_busy_time_once_and_idle_time_between_kernels() -> None:
    """step_profile on a made-up trace of 2 steps: a kernel on a second stream overlapping another counts once in
    busy time (checked against the union counted microsecond by microsecond), the rest of the span is idle (the
    gap between the steps apart), copies and sets count as device work, host events do not, nested CPU operators
    count once, and per-kind and per-kernel rows add up to every launch and microsecond."""
    from tessera.benchmarks import step_profile

    def event(name, ts, dur, tid=7, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}

    steps = [
        event("_rms_norm_kernel", 0, 4),
        event("nvjet_tst_128x64_64x4_h_bz_TNT", 6, 20),
        event("_gate_up_kernel", 30, 10),
        event("Memset (Device)", 41, 1, cat="gpu_memset"),
        event("_matmul_kernel", 35, 8, tid=9),  # a second stream, overlapping gate/up by 5 µs
        event("Memcpy DtoD (Device -> Device)", 44, 1, cat="gpu_memcpy"),
    ]
    trace = {
        "traceEvents": [
            *steps,
            *({**e, "ts": e["ts"] + 50} for e in steps),
            event("cudaGraphLaunch", 0, 90, tid=1, cat="cuda_runtime"),  # host side: not device work
            {"ph": "i", "cat": "kernel", "name": "instant", "ts": 3},
        ]
    }
    events = step_profile.outermost(step_profile.trace_events(trace, step_profile.DEVICE_WORK["cuda"]))
    result = step_profile.breakdown(events, steps=2)
    timeline = set()
    for _, start, dur, _ in events:
        timeline |= set(range(int(start), int(start + dur)))
    assert result["busy_us"] == len(timeline) / 2 == 38.0  # per step 0-4, 6-26, 30-43 (the memset inside), 44-45
    assert result["span_us"] == 47.5 and result["idle_us"] == 9.5  # first start 0, last end 95, over 2 steps
    assert result["between_steps_us"] == 2.5  # 45 to 50, over 2 steps
    assert result["launches"] == 6 and sum(k["launches"] for k in result["kinds"]) == 6
    assert sum(k["us"] for k in result["kernels"]) == sum(k["us"] for k in result["kinds"]) == 44.0
    kinds = {k["kind"]: k for k in result["kinds"]}
    assert kinds["GEMM (cuBLAS / torch)"]["us"] == 20 and kinds["FFN gate/up GEMM (Triton)"]["launches"] == 1
    assert kinds["memory copy / set"] == {"kind": "memory copy / set", "launches": 2, "us": 2.0}
    assert result["kernels"][0]["kernel"].startswith("nvjet")
    uneven = step_profile.breakdown(events[:-1], steps=2)  # 11 launches over 2 steps: no boundary to tell
    assert uneven["between_steps_us"] is None and uneven["launches"] == 5.5
    # CPU operators nest: aten::linear's addmm is inside it and counts once, as the linear.
    cpu = [event("aten::linear", 0, 10, cat="cpu_op"), event("aten::addmm", 2, 7, cat="cpu_op")]
    cpu_events = step_profile.outermost(step_profile.trace_events({"traceEvents": cpu}, ("cpu_op",)))
    assert [e[0] for e in cpu_events] == ["aten::linear"]
    assert step_profile.breakdown([], steps=3) == {"steps": 3, "events": 0}


def test_bench_model_profile_accounts_for_every_projection_of_the_step(results_dir, capsys) -> None:
    """`bench model --profile` on the CPU (the GPU suite's profile of the served step, here over the references'
    operators): every step runs the demo shape's 33 projections (8 layers' q/k/v, o, gate/up and down; the head)
    once, busy and idle time make up the span, and --profile with another benchmark or with --pdl is refused."""
    assert main(["bench", "model", "--profile", "--device", "cpu", "--results", str(results_dir)]) == 0
    results = json.loads((results_dir / "cpu_model_profile.json").read_text())
    assert [(r["batch"], r["weights"]) for r in results["results"]] == [(1, "float32"), (8, "float32")]
    for r in results["results"]:
        assert "error" not in r and r["steps"] == 10
        kernels = {k["kernel"]: k for k in r["kernels"]}
        assert kernels["aten::linear"]["launches"] == 8 * 4 + 1
        assert r["busy_us"] + r["idle_us"] == pytest.approx(r["span_us"]) and 0 <= r["idle_us"] < r["span_us"]
        assert 0 <= r["between_steps_us"] <= r["idle_us"] and r["profiled"] == results["timing"]
        # One thread: nothing overlaps (the trace's timestamps are rounded to the nanosecond: rel 1e-5).
        assert sum(k["us"] for k in r["kinds"]) == pytest.approx(r["busy_us"], rel=1e-5)
    table = (results_dir / "cpu_model_profile.md").read_text()
    assert table.count("| idle (between kernels) |") == 2 and "`aten::linear` | 33 |" in table
    capsys.readouterr()
    for args, why in (
        (["serving", "--profile"], "--profile profiles decode steps"),
        (["model", "--profile", "--pdl"], "one at a time"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["bench", *args, "--device", "cpu", "--results", str(results_dir)])
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_bench_parallel_times_the_step_with_and_without_its_all_reduces_in_turns(results_dir) -> None:
    """`bench parallel` on the CPU: 2 gloo ranks, the demo parent's 16 sharded sublayers (8 attention, 8 FFN)
    each all-reducing once a step; each batch's step with and without them timed in the same interleaved rounds,
    each median within its rounds' range, the all-reduces' cost their difference."""
    assert main(["bench", "parallel", "--device", "cpu", "--results", str(results_dir)]) == 0
    result = json.loads((results_dir / "cpu_parallel.json").read_text())
    assert (result["tensor_parallel_size"], result["backend"], result["all_reduces_per_step"]) == (2, "gloo", 16)
    assert [r["batch"] for r in result["rows"]] == [1, 8] and result["rounds"] == 7
    for r in result["rows"]:
        for kind in ("tensor_parallel", "without_all_reduces"):
            low, high = r[f"{kind}_step_ms_range"]
            assert 0 < low <= r[f"{kind}_step_ms"] <= high
        cost = r["tensor_parallel_step_ms"] - r["without_all_reduces_step_ms"]
        assert r["all_reduce_ms_per_step"] == pytest.approx(cost) and r["single_process_step_ms"] > 0
    assert "interleaved rounds" in (results_dir / "cpu_parallel.md").read_text()


def test_bench_fusion(results_dir) -> None:
    assert main(["bench", "fusion", "--device", "cpu", "--results", str(results_dir)]) == 0
    results = json.loads((results_dir / "cpu_fusion_decode.json").read_text())
    assert results["sequential_depth"] == {"unfused": 18, "fused": 2}
    assert results["fused_width"] == sum(results["widths"][:-1])
    for r in results["results"]:
        # float32 on CPU: the fused stack is the parallel form up to summation order.
        assert r["fused_vs_parallel_relative_error"] <= 1e-5
        assert r["rounds"] == harness.KERNEL_ROUNDS and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert [r["batch"] for r in results["results"]] == [1, 8]


def test_generate_speed_measures_both_sides(results_dir) -> None:
    """The GPU suite's `Generator` vs transformers rows (run here on the CPU, 4 tokens): both timed in interleaved
    rounds, the speedup within its rounds' range, outputs compared token by token. In float32, where the two agree
    on every token (the random prompts' float32 top-2 gaps, 0.0098 at least, are far past its rounding); in bfloat16,
    the suite's precision, a near-tie among them (a gap of 0 once) may go either way on another CPU."""
    rows = bench_model.generate_speed(torch.device("cpu"), new_tokens=4, dtype=torch.float32)
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["tessera_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0 and not r["cuda_graphs"]
        assert r["rounds"] == 5 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert r["same_tokens"] == 1.0


def test_search_scale_counts_each_stages_work(results_dir) -> None:
    """The scaling run on a tiny shape at depths 1 and 2: every stage timed with its peak memory, its work counted
    (scoring's downstream layers grow with depth squared: V·n(n+1)/2), and the 70B extrapolation is the
    deepest run's seconds per unit × the 70B count × the block-size ratio. Target speedup 1.05: a model this
    small is mostly its embedding and LM head, and its fastest architecture measured 1.11-1.36x the parent's on
    a busy 2-core VM, so 1.5 was not always within reach."""
    from tessera.benchmarks import bench_search_scale as scale
    from tessera.search.library import SearchSpace

    tiny = {"hidden_size": 64, "n_heads": 4, "head_dim": 16, "n_kv_heads": 2, "intermediate_size": 256}
    so_far: list[dict] = []  # what a run cut short by a time limit would have written
    result = scale.run(torch.device("cpu"), (1, 2), tiny, on_depth=so_far.append, target_speedup=1.05)
    assert [len(r["rows"]) for r in so_far] == [1, 2] and so_far[-1] == result
    one, two = result["rows"]
    v = one["variants_per_layer"]
    assert v == 4 * 3  # KV heads 2, 1, linear, none × FFN 256, linear, none
    assert one["work_units"]["replace-1-block scoring"] == v and two["work_units"]["replace-1-block scoring"] == 3 * v
    for row in (one, two):
        for stage, units in row["work_units"].items():
            assert row["stage_seconds"][stage] > 0 and row["stage_peak_mib"][stage] > 0 and units > 0
    big = result["llama_70b"]
    stage = "replace-1-block scoring"
    v70 = len(SearchSpace().block_variants(scale.parent_arch(80, scale.LLAMA_70B), 0))
    assert v70 == 6 * 7 and big["work_units"][stage] == v70 * 80 * 81 // 2
    assert big["predicted_seconds"][stage] == pytest.approx(
        two["seconds_per_unit"][stage] * big["work_units"][stage] * big["block_size_ratio"]
    )
    assert big["block_size_ratio"] == pytest.approx(scale.block_params(scale.LLAMA_70B) / scale.block_params(tiny))
    assert "| replace-1-block scoring |" in scale.table(result)


def test_search_scale_counts_fisher_scoring_in_layers_times_variants() -> None:
    """By the Fisher estimate scoring runs every variant once and the parent's forward and samples + 1 backward
    passes (two blocks a layer each): linear in depth where the exact scores grow with its square."""
    from tessera.benchmarks import bench_search_scale as scale
    from tessera.search.library import SearchSpace

    space = SearchSpace()
    for layers in (8, 80):
        arch = scale.parent_arch(layers, scale.LLAMA_70B)
        exact = scale.work_units(arch, space, 1, 3, 1)["replace-1-block scoring"]
        fisher = scale.work_units(arch, space, 1, 3, 1, fisher_samples=16)["replace-1-block scoring"]
        assert exact == 42 * layers * (layers + 1) // 2 and fisher == 42 * layers + layers * (1 + 2 * 17)


def test_cost_model_bench_checks_the_prediction_on_random_architectures(results_dir, monkeypatch) -> None:
    """`bench cost-model` on the CPU (a short scenario): the demo parent calibrated in float32, checked on itself
    and CHECKS random architectures; each row's error is (predicted - measured) / measured and the summary is
    their mean and max; the results carry the device and the table the goal. On the CPU the calibration runs
    as the search runs it and with the cache scrub, alternately (here one repeat each)."""
    from tessera.benchmarks import bench_cost_model, run
    from tessera.search.cost import Scenario

    short = Scenario(batch=1, prompt_len=8, gen_len=4)
    monkeypatch.setattr(bench_cost_model, "Scenario", lambda: short)
    monkeypatch.setattr(bench_cost_model, "SCRUB_REPEATS", 1)
    path = run.run_cost_model(torch.device("cpu"), out=results_dir)
    result = json.loads(path.read_text())
    assert [row["scrub"] for row in result["rows"]] == [False, True]
    assert result["dtype"] == "float32" and result["scenario"] == vars(short)
    for row in result["rows"]:
        assert row["parent"] == "demo parent"
        archs = row["architectures"]
        assert len(archs) == 1 + bench_cost_model.CHECKS and len(archs[0]["blocks"]) == row["layers"] == 8
        for a in archs:
            assert a["error"] == pytest.approx((a["predicted_ms"] - a["measured_ms"]) / a["measured_ms"])
        assert row["mean_abs_error"] == pytest.approx(sum(abs(a["error"]) for a in archs) / len(archs))
        assert row["max_abs_error"] == max(abs(a["error"]) for a in archs)
    assert result["device"] and result["commit"]
    assert "goal: mean absolute error ≤ 3 %" in path.with_suffix(".md").read_text()


def test_every_test_the_gpu_suite_names_exists() -> None:
    """The GPU suite runs on a machine lent for minutes: a test renamed here and not there would cost its step."""
    import re

    root = Path(__file__).resolve().parent.parent
    suite = (root / "benchmarks" / "gpu_suite.sh").read_text()
    nodes = re.findall(r"(tests/\w+\.py)(?:::(test_\w+))?", suite)
    assert len([n for n in nodes if n[1]]) >= 12  # the CUDA-graph and FP8 tests, named one by one
    for file, name in nodes:
        assert (root / file).is_file(), file
        if name:
            assert re.search(rf"^def {name}\(", (root / file).read_text(), re.M), f"{file}::{name}"


def serving_result(*broken: dict) -> dict:
    """A CPU serving result as bench_serving.run_cpu writes it, with one clean run and `broken` ones' changes."""
    ms = {"mean": 1.0, "median": 1.0, "p99": 1.0}
    run = {"name": "rate inf", "request_throughput": 1.0, "output_throughput": 10.0, "failed": 0, "errors": []}
    run |= {"ttft_ms": ms, "tpot_ms": ms, "itl_ms": ms, "e2el_ms": ms}
    result = {"num_prompts": 4, "input_len": 8, "output_len": 8, "model": "m", "dtype": "float32", "max_batch": 4}
    baseline = {"request_throughput": 1.0, "output_throughput": 5.0, "e2el_ms": ms}
    return result | {"baseline": baseline, "runs": [run, *(run | b for b in broken)]}


def test_the_serving_table_names_the_errors_of_every_run() -> None:
    """Failures counted over all runs were shown with the first run's errors only (none, when it was clean)."""
    from tessera.benchmarks import bench_serving

    result = serving_result({"name": "Poisson 2 req/s", "failed": 2, "errors": ["ReadTimeout", "ConnectError"]})
    assert "2 requests failed: ['ConnectError', 'ReadTimeout']" in bench_serving.table(result)


def test_the_serving_bench_compares_every_served_text_with_transformers() -> None:
    """bench_serving.run_cpu end to end, small (2 prompts of 16 tokens, 6 output tokens, one load, one server): each
    streamed text is compared with transformers' greedy text for the same prompt, and all agree (float32, random
    prompts whose float32 top-2 gaps over these tokens are far past the two sides' rounding)."""
    from tessera.benchmarks import bench_serving

    result = bench_serving.run_cpu(
        num_prompts=2, input_len=16, output_len=6, loads=(bench_serving.Load(math.inf, 16),), data_parallel_sizes=(1,)
    )
    (run,) = result["runs"]
    assert run["completed"] == 2 and run["same_text_as_transformers"] == 2 and "texts" not in run
    assert "outputs" not in result["baseline"]
    assert "| 2/2 |" in bench_serving.table(result)


def test_serving_bench_times_the_two_page_layouts_in_turns() -> None:
    """The serving benchmark's decode-step comparison: both layouts timed in each round, each one's median over
    the rounds, and the median and range of the rounds' own ratios (not the medians' quotient)."""
    from tessera.benchmarks import bench_serving

    d = bench_serving.page_layouts(PARENT_DIR, batch=2, input_len=20, rounds=3, steps=2)
    assert (d["batch"], d["rounds"], d["steps_per_round"]) == (2, 3, 2)
    rounds = d["rounds_ms"]
    assert all(len(t) == 3 and min(t) > 0 for t in rounds.values())
    for name in ("pages_16", "whole_context_pages"):
        assert d[name] == pytest.approx(sorted(rounds[name])[1])
    ratios = sorted(a / b for a, b in zip(rounds["pages_16"], rounds["whole_context_pages"]))
    assert d["ratio"] == pytest.approx(ratios[1]) and d["ratio_range"] == pytest.approx([ratios[0], ratios[2]])
    table = bench_serving.table(serving_result() | {"decode_step_ms": d})
    assert "3 interleaved rounds of 2 steps" in table and f"{d['ratio']:.2f} (" in table


def test_the_gpu_serving_sweep_times_decode_steps_with_async_scheduling_on_and_off_in_blocks() -> None:
    """The GPU sweep's step loop, on the CPU: every decode step with the whole batch running is timed but the
    first of each block, the blocks alternating async scheduling on and off; prompt steps are counted apart. The
    tokens are those of an engine that never changes mode (changing it between steps is safe)."""
    from tessera.benchmarks import bench_serving
    from tessera.runtime.engine import Engine, EngineConfig
    from tessera.runtime.loader import load_model
    from tessera.runtime.sampling import SamplingParams

    model = load_model(PARENT_DIR)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = harness.random_prompts(3, 20, model.vocab_size)
    expected = [c.tokens for c in Engine(model).generate(prompts, params)]
    engine = Engine(model, config=EngineConfig(max_batch=3))
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    step = engine.step

    def recorded():
        outputs = step()
        for out in outputs:
            tokens[out.request_id] += out.token_ids
        return outputs

    engine.step = recorded
    step_ms, prefill_s = bench_serving.serve_timed(engine, 3)
    assert [tokens[i] for i in ids] == expected
    # 40 steps after the one prefill step (which samples each first token), the last 39 all decode: blocks of 8
    # (on, off, on, off, on) with 7 of each counted, the fifth block 7 steps long (6 counted).
    block = bench_serving.ASYNC_BLOCK
    assert block == 8 and len(step_ms[True]) == 7 + 7 + 6 and len(step_ms[False]) == 7 + 7
    assert prefill_s > 0 and engine.steps_ahead > 0


def test_prefix_bench_serves_shared_prompts_with_and_without_the_cache(results_dir, monkeypatch) -> None:
    """`bench prefix` (CLI) on the CPU with 3 prompts of 600 shared + 8 own tokens: the first fills the step's 512
    tokens, the other two start in the next step, beside its last 96, and find the 37 pages of 16 within the
    shared tokens cached (592 tokens each: registered as the step that fills them is planned);
    without prefix caching nothing is. Every round is on fresh prompts (the rounds
    find the same number cached), and each ratio is the round's time over the caching engine's of the same model.
    The model with a window of 150 keys on every other layer finds as much cached: the windowed layers' pages
    of the prefix's last 150 tokens are all its next query reads."""
    from tessera.benchmarks import bench_prefix

    monkeypatch.setitem(bench_prefix.WORKLOADS, "cpu", (3, 600, 8, 2))
    monkeypatch.setitem(bench_prefix.ROUNDS, "cpu", 2)
    monkeypatch.setattr(bench_prefix, "ROUTING_WORKLOAD", (12, 3, 48, 4, 2))
    main(["bench", "prefix", "--device", "cpu", "--results", str(results_dir)])
    result = json.loads((results_dir / "cpu_prefix.json").read_text())
    rows = {row["config"]: row for row in result["rows"]}
    assert list(rows) == [f"{c}{kind}" for kind in ("", ", windowed") for c in ("prefix caching", "no prefix caching")]
    assert result["window"] == 150
    for kind in ("", ", windowed"):
        cached, uncached = rows[f"prefix caching{kind}"], rows[f"no prefix caching{kind}"]
        assert cached["cached_tokens"] == 2 * 592 and uncached["cached_tokens"] == 0
        for row in (cached, uncached):
            assert len(row["rounds_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["page_size"] == 16
            ratios = sorted(t / c for t, c in zip(row["rounds_s"], cached["rounds_s"]))
            assert row["time_vs_prefix_caching"] == pytest.approx(ratios[0] / 2 + ratios[1] / 2)
    assert (
        result["device"]
        and result["commit"]
        and "| no prefix caching | 16 |" in (results_dir / "cpu_prefix.md").read_text()
    )
    assert (
        result["data_parallel"]["engines"] == 2
        and "| by cached prefix |" in (results_dir / "cpu_prefix.md").read_text()
    )


def test_prefix_bench_compares_data_parallel_routing(results_dir, monkeypatch) -> None:
    """`bench prefix`'s data-parallel rows: two engine processes each, 12 requests at once over 3 prefixes of 3
    pages, routed by cached prefix and by load. Prefix routing finds more cached than routing by load (which
    sends a prefix's requests to both engines, each computing it), and never more than every request after each
    prefix's first could find; both servers took every request (a warm-up round and 2 timed ones). Submitted at
    once, the requests meet the same loads in every run: the counts are the same every time."""
    from tessera.benchmarks import bench_prefix

    monkeypatch.setattr(bench_prefix, "ROUTING_WORKLOAD", (12, 3, 48, 4, 2))
    result = bench_prefix.data_parallel_routing(rounds=2)
    rows = {row["routing"]: row for row in result["rows"]}
    assert list(rows) == ["by cached prefix", "by load"]
    assert rows["by load"]["cached_tokens"] < rows["by cached prefix"]["cached_tokens"] <= (12 - 3) * 48
    for row in rows.values():
        assert sum(row["requests_per_engine"]) == 3 * 12 and len(row["rounds_s"]) == 2
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert rows["by cached prefix"]["time_vs_prefix_routing"] == 1.0
    assert "| by load |" in bench_prefix.routing_table(result)


def test_the_gemm_tiling_sweep_ranks_only_checked_tilings_and_writes_after_each_shape(tmp_path, monkeypatch) -> None:
    """benchmarks/tune_gemm.py's flow on the CPU (under the interpreter, fp16 for bf16). A clock favours two chosen
    tilings of the decode shape, and a broken one (block_m 0) fails: it is recorded with its failure and never
    ranked, and the best pair is the two favoured tilings together. The results are on disk after each shape, and
    the budget, spent after the second shape, ends the sweep. Two compile workers run beside it (12 on the GPU)."""
    from tessera.benchmarks import tune_gemm
    from tessera.kernels.gemm import GemmTiling

    broken = GemmTiling(0, 64, 128, 4, 4)
    fast_gate_up, fast_down = tune_gemm.DECODE[1], tune_gemm.DECODE[2]
    monkeypatch.setattr(tune_gemm, "DECODE", [*tune_gemm.DECODE[:3], broken])  # both GEMMs' decode list
    shapes = [("bf16", "tiny", 64, 96, 1), ("bf16", "tiny", 64, 96, 20), ("fp8", "tiny", 64, 96, 20)]
    monkeypatch.setattr(tune_gemm, "SHAPES", shapes)
    monkeypatch.setattr(tune_gemm, "copy_bandwidth_gbps", lambda device: 100.0)

    def clock(fn, device) -> float:
        tilings = getattr(fn, "keywords", {})
        if "gate_up_tiling" not in tilings:
            return 1.0  # the baseline
        gate_up, down = tilings["gate_up_tiling"], tilings["down_tiling"]
        return 2.0 - 0.5 * (gate_up == fast_gate_up) - 0.25 * (down == fast_down)

    monkeypatch.setattr(tune_gemm, "_graph_ms", clock)
    now, swept, sweep_shape = [0.0], [], tune_gemm.sweep_shape
    monkeypatch.setattr(tune_gemm.time, "perf_counter", lambda: now[0])

    def one_shape(*args) -> dict:  # each shape takes 60 s of the sweep's clock; what is on disk when it starts
        on_disk = tmp_path / "cpu_tune_gemm.json"
        swept.append(len(json.loads(on_disk.read_text())["shapes"]) if on_disk.exists() else 0)
        now[0] += 60.0
        return sweep_shape(*args)

    monkeypatch.setattr(tune_gemm, "sweep_shape", one_shape)
    result = tune_gemm.sweep(torch.device("cpu"), 100.0, compile_workers=2, out=tmp_path, dtype=torch.float16)
    assert swept == [0, 1] and [s["rows"] for s in result["shapes"]] == [1, 20]  # the FP8 shape: past the budget
    decode, prefill = result["shapes"]
    assert len(decode["gate_up_tilings"]) == 4 and len(decode["down_tilings"]) == 4
    failed = [r for r in decode["gate_up_tilings"] + decode["down_tilings"] if r["failure"]]
    assert [(r["gate_up"]["block_m"], r["down"]["block_m"]) for r in failed] == [(0, 16), (16, 0)]
    assert all(r["ms"] != r["ms"] for r in failed)  # NaN: never timed
    for r in decode["gate_up_tilings"] + decode["down_tilings"] + prefill["gate_up_tilings"]:
        assert r["failure"] or r["relative_error"] <= 2e-3, r  # fp16: TOLERANCES["swiglu_ffn"]
    best = decode["best"]
    assert (best["gate_up"], best["down"]) == (vars(fast_gate_up), vars(fast_down)) and best["ms"] == 1.25
    assert decode["default"]["gate_up"] == vars(tune_gemm.gate_up_blocks(1)) and decode["default"]["ms"] == 2.0
    assert best["speedup"] == 0.8 and not best["persistent"]
    # Past 16 rows the best pair is timed on the persistent schedule too (the interpreter takes tensor descriptors).
    assert [r["persistent"] for r in prefill["best_pairs"]] == [False, True]
    # Beside the results, the winners as a tiling table (kernels/ffn_tilings.py) that reads back: the decode plan is
    # the two favoured tilings, measured at 0.8x the baseline, so cuBLAS would serve its rows.
    from tessera.kernels import ffn_tilings

    plans = ffn_tilings.load_table(tmp_path / "cpu_ffn_tilings.json")
    assert [p.rows for p in plans["bf16"]] == [1, 20] and plans["fp8"] == []
    decode_plan = plans["bf16"][0]
    assert (decode_plan.gate_up, decode_plan.down, decode_plan.speedup) == (fast_gate_up, fast_down, 0.8)
    assert not decode_plan.triton and plans["bf16"][1].persistent == prefill["best"]["persistent"]
    # A failed row is never the best, however fast it was recorded.
    assert tune_gemm._best([{"failure": "wrong", "ms": 0.1}, {"failure": None, "ms": 1.0}])["ms"] == 1.0
    written = json.loads((tmp_path / "cpu_tune_gemm.json").read_text())
    assert [s["best"]["ms"] for s in written["shapes"]] == [1.25, prefill["best"]["ms"]]
    table = (tmp_path / "cpu_tune_gemm.md").read_text()
    assert "| bf16 | tiny | 1 | 1.0000 | 2.0000 | 0.50x | 1.2500 | 0.80x |" in table, table
    # The compile workers (spawned processes, each job carrying its shape and tilings) compile every pair of every
    # shape, whatever this process patched: all but broken's two.
    pairs = sum(len(tune_gemm._pairs(s[0], s[4])) for s in shapes)
    assert tune_gemm.precompile(torch.device("cpu"), 2, torch.float16) == pairs - 2


def test_results_record_the_checkouts_commit_wherever_the_command_runs(tmp_path, monkeypatch) -> None:
    """`commit()` asks git about the checkout tessera runs from, not the current folder: run from another git
    repository it once recorded that repository's commit, and from outside one "unknown"."""
    import subprocess

    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=harness.CHECKOUT, capture_output=True, text=True, check=True
    ).stdout.strip()
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    env = ["-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", *env, "commit", "-q", "--allow-empty", "-m", "x"], cwd=other, check=True)
    for folder in (tmp_path, other):
        monkeypatch.chdir(folder)
        assert harness.commit().removesuffix("-dirty") == head
