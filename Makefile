# `make demo` and `make test` are the README's two set-up commands: each creates .venv
# on a fresh machine and then does its job.
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/vtdsl compile policies/fastv.vt --model llava-1.5-7b

# One pytest worker per core, each with one torch thread: the tiny models' kernels gain
# little from a second thread (measured 13.5 s vs 14.7 s), two workers nearly double the
# throughput (the whole suite: 577 s -> 332 s on 2 cores).
PYTEST = HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n auto

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# Issue 8 performance benchmarks (a few minutes on 2 CPU cores): results in
# benchmarks/results/*.json and summary.md; see benchmarks/README.md.
bench: setup
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run_all.py
