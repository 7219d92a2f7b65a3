# mdlgrok: every command sets up its own .venv on first use.
# `make demo` runs the paper's headline run on CPU, `make test` the test suite.
PY      := .venv/bin/python
VENV_OK := .venv/.installed
DEMO    := runs/demo

EXPERIMENTS := rise_and_fall four_tasks unregularized regularizers gamma attention grokfast ungrokking datasize digits
# JOBS: parallel runs. results/<experiment>/ holds the length named cpu in its file (600 epochs for
# the paper's figures, more for the phenomena), results/paper/<experiment>/ the paper's 10,000 epochs.
JOBS        ?= 2

.PHONY: help install test test-slow check demo bench bench-train bench-estimator bench-estimator-sizes bench-stacked bench-sweep bench-measures figures reproduce clean

help:
	@echo "make demo            train add/p=113/ours for 600 epochs on CPU and measure complexity"
	@echo "make test            fast test suite (make test-slow for the long tests)"
	@echo "make check           ruff: lint and format check of the package, tests and benchmarks"
	@echo "make bench           training and estimator benchmarks"
	@echo "make results/<experiment>/table.parquet   run the missing runs of experiments/<experiment>.toml (600 epochs)"
	@echo "make results/paper/<experiment>/table.parquet   the same at the paper's 10,000 epochs"
	@echo "make figures         redraw every figure from the tables in results/ (no training)"
	@echo "make reproduce       every experiment, then the figures"

# torch is installed first and by exact version: 2.13.0 has a CPU build on this machine's
# wheel path, while a range would let pip choose a newer multi-GB CUDA build.
$(VENV_OK): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(VENV_OK)

install: $(VENV_OK)

test: $(VENV_OK)
	$(PY) -m pytest -q

test-slow: $(VENV_OK)
	$(PY) -m pytest -q -m slow

check: $(VENV_OK)
	$(PY) -m ruff check mdlgrok tests benchmarks
	$(PY) -m ruff format --check mdlgrok tests benchmarks

demo: $(VENV_OK)
	rm -rf $(DEMO)
	$(PY) -m mdlgrok train --task add --p 113 --preset ours --epochs 600 --seed 0 --out $(DEMO) --measure
	$(PY) -m mdlgrok summary $(DEMO) --plot $(DEMO)/rise_and_fall.png

bench: bench-train bench-stacked bench-sweep bench-estimator bench-estimator-sizes bench-measures

bench-train: $(VENV_OK)
	$(PY) benchmarks/bench_train.py

# the sizes table first, then the estimator's time per checkpoint (all 7 eps) against the
# paper-faithful search on the same checkpoint of the demo run
bench-estimator: bench-estimator-sizes
	test -f runs/demo/status.json || $(MAKE) demo
	$(PY) benchmarks/bench_estimator.py runs/demo --epochs 600

# one estimate's wall time against the time inside its loss calls, models of 26k-4.3M parameters
bench-estimator-sizes: $(VENV_OK)
	$(PY) benchmarks/bench_estimator_sizes.py

# seconds per checkpoint of each measure but complexity (norms, llc, fourier) on the paper model
bench-measures: $(VENV_OK)
	$(PY) benchmarks/bench_measures.py

bench-sweep: $(VENV_OK)
	$(PY) benchmarks/bench_sweep.py --epochs 200

# N stacked models in one process (DEVICE=auto: cuda when torch sees a GPU, else cpu)
DEVICE ?= auto
bench-stacked: $(VENV_OK)
	$(PY) benchmarks/bench_stacked.py --device $(DEVICE) --n 1 8 64 --steps 10

# One experiment: its missing runs (complete runs are skipped), then its tidy table in results/.
results/%/table.parquet: experiments/%.toml | $(VENV_OK)
	$(PY) -m mdlgrok sweep $< --jobs $(JOBS) --length cpu --root runs/cpu
	mkdir -p $(@D)
	cp runs/cpu/$*/table.parquet $@

# Ungrokking starts from a run of grokfast: that experiment first.
results/ungrokking/table.parquet: results/grokfast/table.parquet

# The same at the paper's length (10,000 epochs), kept apart from the CPU-length tables.
results/paper/%/table.parquet: experiments/%.toml | $(VENV_OK)
	$(PY) -m mdlgrok sweep $< --jobs $(JOBS) --length paper --root runs/paper
	mkdir -p $(@D)
	cp runs/paper/$*/table.parquet $@

# mdlgrok's search against the paper's on checkpoints of the demo run.
results/estimator/bench_demo.parquet: | $(VENV_OK)
	test -f runs/demo/status.json || $(MAKE) demo
	$(PY) benchmarks/bench_estimator.py runs/demo --epochs 86 247 600 --out $@

# The same across the whole fall of two runs (add and mul, "ours", seed 0 of rise_and_fall), with
# the worst ratio: checkpoints from memorization (86) through grokking to the end (600).
results/estimator/bench_fall.parquet: experiments/rise_and_fall.toml | $(VENV_OK)
	$(PY) -m mdlgrok sweep $< --jobs $(JOBS) --length cpu --root runs/cpu
	$(PY) benchmarks/bench_estimator.py runs/cpu/rise_and_fall/add-ours-s0-* runs/cpu/rise_and_fall/mul-ours-s0-* \
		--epochs 86 190 247 321 417 600 --out $@

# Generalization bounds from the shortest descriptions of the grokked rise_and_fall add runs (their
# checkpoints: the sweep trains what runs/ lacks and skips the complete runs).
results/estimator/bounds.csv: experiments/rise_and_fall.toml | $(VENV_OK)
	$(PY) -m mdlgrok sweep $< --jobs $(JOBS) --length cpu --root runs/cpu
	$(PY) benchmarks/bounds.py runs/cpu/rise_and_fall/add-ours-* --out $@

figures: $(VENV_OK)
	$(PY) -m mdlgrok figures --results results

reproduce: $(foreach e,$(EXPERIMENTS),results/$(e)/table.parquet) results/estimator/bench_demo.parquet \
		results/estimator/bench_fall.parquet results/estimator/bounds.csv
	$(MAKE) figures

clean:
	rm -rf runs .pytest_cache
