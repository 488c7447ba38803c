# `make demo` and `make test` are the README's two set-up commands: each creates .venv
# on a fresh machine and then does its job.
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/vtdsl compile policies/fastv.vt --model llava-1.5-7b

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "not slow"

# Issue 8 performance benchmarks (a few minutes on 2 CPU cores): results in
# benchmarks/results/*.json and summary.md; see benchmarks/README.md.
bench: setup
	HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run_all.py
