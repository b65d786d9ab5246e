# fedrun: `make train` and `make test` are the whole set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-all clean

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

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs
