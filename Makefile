# Development entry points. `make demo` and `make test` work on a fresh machine: they create
# the virtual environment .venv with the pinned versions first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: dev demo test bench gpu clean

$(BIN)/activate-done: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

dev: $(BIN)/activate-done

demo: dev
	$(BIN)/python -m masked_optim.demo

test: dev
	$(BIN)/python -m pytest -q

bench: dev
	$(BIN)/python -m pytest benchmarks -q

# on a lent CUDA machine with torch and triton preinstalled (no venv, no network): OUT=dir make gpu
gpu:
	bash benchmarks/gpu_session.sh $(or $(OUT),benchmarks/results/gpu)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
