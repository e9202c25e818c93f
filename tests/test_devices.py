"""Device and dtype helpers (tessera/devices.py): flags become devices and dtypes with one-line errors, dtype
names round-trip through the names config.json uses, and the shared timer takes the median it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera import devices
from tessera.benchmarks import harness
from tessera.config import DTYPE_BYTES, dtype_bytes
from tessera.devices import device_name, dtype_name, median_ms, parse_dtype, resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device 'tpu': expected cpu or cuda$"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_run_dtype_names_round_trip(name: str) -> None:
    assert dtype_name(parse_dtype(name)) == name


def test_fp8_is_named_fp8_on_the_command_line_and_float8_e4m3fn_in_results() -> None:
    assert parse_dtype("fp8") == torch.float8_e4m3fn and dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"


def test_parse_dtype_refuses_other_names() -> None:
    # float64 is a storage dtype (a checkpoint may hold it), not one tessera runs in.
    for name in ("float64", "fp16", "torch.float16"):
        with pytest.raises(ValueError, match=rf"^dtype '{name}': expected one of float32, float16, bfloat16, fp8$"):
            parse_dtype(name)


@pytest.mark.parametrize("name", sorted(DTYPE_BYTES))
def test_storage_dtype_names_are_torch_names(name: str) -> None:
    """Every name config.json may declare is the name dtype_name gives the torch dtype, with its true size."""
    dtype = getattr(torch, name)
    assert dtype_name(dtype) == name
    assert dtype_bytes(name) == dtype.itemsize


def test_cpu_device_name() -> None:
    name = device_name(torch.device("cpu"))
    assert name == device_name("cpu")
    assert name.endswith(f" cores, {torch.get_num_threads()} torch threads)")


class _Clock:
    """A fake perf_counter that moves only when the timed function runs."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, iter(durations_ms), 0

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.calls += 1
        self.now += next(self.durations, 0.0) / 1e3


def test_median_ms_skips_the_warm_up_and_takes_the_median(monkeypatch) -> None:
    clock = _Clock([100.0, 4.0, 1.0, 3.0])  # the first call is the warm-up, not timed
    monkeypatch.setattr(devices.time, "perf_counter", clock)
    assert median_ms(clock.run, torch.device("cpu"), min_reps=3, budget_s=0) == pytest.approx(3.0)
    assert clock.calls == 4


def test_median_ms_stops_at_200_repetitions(monkeypatch) -> None:
    clock = _Clock([])  # time never passes, so the budget is never spent
    monkeypatch.setattr(devices.time, "perf_counter", clock)
    assert median_ms(clock.run, torch.device("cpu"), budget_s=1.0) == 0.0
    assert clock.calls == 201


def test_one_timer_and_one_device_name_for_cost_model_and_benchmarks() -> None:
    from tessera.search import cost

    assert harness.median_ms is median_ms
    assert harness.device_name is cost.device_name is device_name
    assert cost.synchronize is devices.synchronize


def test_peak_memory_is_per_stage_on_linux() -> None:
    """A 512 MiB tensor raises the peak; after it is freed, a reset brings the peak back down (what each search
    stage's figure in the report relies on)."""
    from tessera.devices import peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_bytes(cpu)
    x = torch.ones(2**27)  # 512 MiB, touched
    high = peak_memory_bytes(cpu)
    del x
    reset_peak_memory(cpu)
    assert high - before >= 400 * 2**20
    if Path("/proc/self/clear_refs").exists():
        assert peak_memory_bytes(cpu) < high - 400 * 2**20


def _caches(root, sizes: dict[int, str]):
    """A fake /sys/devices/system/cpu/cpu0/cache: one index directory per (level, size)."""
    root.mkdir()
    for i, (level, size) in enumerate(sizes.items()):
        index = root / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "size").write_text(f"{size}\n")
    return root


def test_the_last_level_cache_is_read_from_sysfs(tmp_path) -> None:
    """The largest level counts, sizes in K or M; a directory it cannot read is skipped, and with none the
    fallback (32 MiB) stands in."""
    from tessera.devices import FALLBACK_CACHE_BYTES, last_level_cache_bytes

    cpu = torch.device("cpu")
    caches = _caches(tmp_path / "a", {1: "48K", 3: "32768K", 2: "2M"})
    (caches / "index9").mkdir()  # unreadable: no level or size
    assert last_level_cache_bytes(cpu, caches) == 32 * 2**20
    assert last_level_cache_bytes(cpu, _caches(tmp_path / "b", {1: "32K", 2: "1024K"})) == 2**20
    assert last_level_cache_bytes(cpu, _caches(tmp_path / "c", {3: "huge"})) == FALLBACK_CACHE_BYTES
    assert last_level_cache_bytes(cpu, _caches(tmp_path / "d", {3: ""})) == FALLBACK_CACHE_BYTES
    assert last_level_cache_bytes(cpu, _caches(tmp_path / "e", {2: "4096"})) == 4096  # plain bytes
    assert last_level_cache_bytes(cpu, tmp_path / "missing") == FALLBACK_CACHE_BYTES


def test_the_cache_scrub_streams_twice_the_last_level_through_the_cache(tmp_path, monkeypatch) -> None:
    """The scrub reads every element of a buffer of twice the last-level cache (its sum counts them), capped at
    MAX_SCRUB_BYTES."""
    from tessera.devices import cache_scrubber

    cpu = torch.device("cpu")
    scrub = cache_scrubber(cpu, _caches(tmp_path / "a", {2: "512K", 3: "1M"}))
    assert float(scrub()) == 2 * 2**20 / 4  # fp32 ones: one per 4 bytes of 2 MiB
    monkeypatch.setattr(devices, "MAX_SCRUB_BYTES", 4 * 2**20)
    assert float(cache_scrubber(cpu, _caches(tmp_path / "b", {3: "1G"}))()) == 2**20
