# The two commands a new user runs: `make demo` (the best practice end to end on the embedded tiny default,
# CPU when there is no GPU) and `make test`. Both install into .venv first.
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@bash scripts/setup_venv.sh

demo: setup
	@bash examples/qwen2_5/demo.sh

test: setup
	$(PY) -m pytest tests
