# fedrun: `make train` and `make test` are the whole set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train lint test test-all bench clean

install: $(STAMP)

# torch first, pinned to the CPU wheel on local disk: any other torch spec would pull a
# multi-GB CUDA build, and installing it first makes the project's own `torch` requirement
# already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/fedrun train

# ruff's and mypy's settings are in pyproject.toml; mypy checks the fedrun package and
# tests/typing_protocols.py (each Protocol of fedrun/core.py against its implementations).
lint: install
	$(BIN)/ruff check fedrun tests benchmarks
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

# Flower and pfl in their own environment: flwr 1.42 pins ray, typer and rich, which must not
# constrain fedrun's. torch first again, for the same reason as above; pfl's [pytorch] extra
# then finds it satisfied. transformers and peft (W4's FlowerTune client) at the versions of
# fedrun's .venv, so that both sides build the same model.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet 'flwr[simulation]==1.42.0'
	$(BENCH_VENV)/bin/pip install --quiet 'pfl[pytorch]==0.6.0'
	$(BENCH_VENV)/bin/pip install --quiet 'transformers==5.25.0' 'peft==0.21.2'
	touch $(BENCH_STAMP)

# Speed and memory against a bare PyTorch floor, Flower and pfl (benchmarks/README.md);
# BENCH_QUICK=1 for a few-minute smoke run.
bench: install $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs
