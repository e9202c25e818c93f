# Every target sets up (or refreshes) the virtual environment itself, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A pinned CPU build installs from a local file on the CI/dev machines; a looser spec pulls GBs of CUDA.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint format bench bench-kernels parent corpus clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# A rerun resumes runs/demo (its distilled blocks are kept); DEMO_FLAGS=--fresh trains them again (needed after
# `make parent`: the store refuses blocks of another parent). A store from before the manifest is started fresh.
DEMO_FLAGS ?=
# The demo's training budget: enough for its child to keep the parent's quality within a few perplexity points,
# small enough for the whole demo to finish in about 8 minutes on 2 CPU cores.
DEMO_SETTINGS := --bld-steps 100 --gkd-steps 40

demo: setup  ## Puzzle + FFN Fusion on the bundled demo parent (5-8 min on 2 CPU cores), then generate from the child
	@flags="$(DEMO_FLAGS)"; if [ -d runs/demo/bld ] && [ ! -f runs/demo/bld/manifest.json ]; then \
		echo "runs/demo/bld predates the store's manifest: training its blocks again"; flags="$$flags --fresh"; fi; \
	echo "$(BIN)/tessera optimize --out runs/demo --fuse $(DEMO_SETTINGS) $$flags"; \
	$(BIN)/tessera optimize --out runs/demo --fuse $(DEMO_SETTINGS) $$flags
	$(BIN)/tessera demo --model runs/demo/child

test: setup  ## the CPU test suite (kernels run under the Triton interpreter)
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmark results go to BENCH_RESULTS (git-ignored runs/bench/ by default); `make bench
# BENCH_RESULTS=benchmarks/results` updates the committed ones.
BENCH_RESULTS ?= runs/bench

bench: setup  ## CPU benchmarks (pytest-benchmark); results JSON + Markdown under $(BENCH_RESULTS)/
	mkdir -p $(BENCH_RESULTS)
	TESSERA_BENCH_RESULTS=$(BENCH_RESULTS) $(BIN)/pytest benchmarks --benchmark-enable \
		--benchmark-columns=median,iqr,rounds --benchmark-json=$(BENCH_RESULTS)/pytest_benchmark.json

bench-kernels: setup  ## kernel suites + whole-model decode (GPU: Triton vs torch; CPU: references, sanity only)
	$(BIN)/tessera bench kernels --results $(BENCH_RESULTS)
	$(BIN)/tessera bench model --results $(BENCH_RESULTS)

corpus: setup  ## re-snapshot the demo corpus from this Python's standard library
	$(BIN)/tessera demo-parent corpus

parent: setup  ## retrain the demo parent from the committed corpus (seeded; ~35 min on 2 CPU cores)
	$(BIN)/tessera demo-parent train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
