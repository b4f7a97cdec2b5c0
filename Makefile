# The two commands a new user runs: `make demo` (the best practice end to end on the embedded tiny default,
# CPU when there is no GPU) and `make test`. Both install into .venv first, from requirements-lock.txt.
PY := .venv/bin/python

.PHONY: setup lock demo test test-gpu
setup:
	@bash scripts/setup_venv.sh

# Re-resolve requirements-lock.txt after a dependency change in pyproject.toml (UPGRADE=1: newest releases),
# then reinstall .venv from it and run the test suite.
lock:
	@bash scripts/lock.sh

demo: setup
	@bash examples/qwen2_5/demo.sh

# Two pytest workers, one test file each at a time (a file's fixtures stay in one worker): the tests' ranks
# start from a warm process, which leaves half of 2 cores idle in one worker (docs/benchmarks.md).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile tests

# The GPU tests (`pytest -m gpu`: CUDA graphs, the variable-length flash path, our GEMM and attention kernels, fp8)
# on any CUDA machine, in that machine's own Python: no `make setup`, no .venv, nothing downloaded. A GPU image
# brings its own torch and CUDA; it needs this project's dependencies (megatron-core==0.19.2, transformers,
# tensorboard, pyyaml, pytest) installed there. GPU_PYTHON=... picks another interpreter. Only the test files that
# carry the mark are imported (tests/conftest.py); with no GPU visible the run stops with an error.
GPU_PYTHON ?= python3
test-gpu:
	$(GPU_PYTHON) -m pytest -m gpu tests
