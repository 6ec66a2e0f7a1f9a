# Two set-up commands: `make quickstart` and `make test`. Both create .venv first, with the exact
# versions in constraints.txt: what the test suite last passed with.
PYTHON ?= python3
VENV   ?= .venv
# A GPU user overrides this, e.g. `make quickstart TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH  ?= torch==2.13.0
LOCK   := constraints.txt
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The newest releases of every dependency but torch, which stays $(TORCH) (`TORCH=torch` for the newest one:
# a download of several GB).
LATEST := .venv-latest

.PHONY: quickstart test test-latest lock install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/minimind-v quickstart

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Every run starts from an empty environment, so "newest" means newest today, not when it was made; torch,
# installed first, already satisfies the requirement and stays $(TORCH).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q -e ".[test]"
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|gradio|fastapi|numpy)=='
	$(LATEST)/bin/python -m pytest tests

# After `make test-latest` passed: its versions become the lock that `make test` and `make quickstart` install.
lock:
	test -x $(LATEST)/bin/python || { echo "error: run 'make test-latest' first: the lock is what it tested"; exit 2; }
	{ echo "# The versions the test suite passed with; written by 'make lock' from 'make test-latest'."; \
	  echo "# torch is not here: the Makefile's TORCH chooses the wheel (CPU or CUDA)."; \
	  $(LATEST)/bin/pip list --format=freeze --exclude-editable | grep -viE '^(torch|nvidia-.*|cuda-.*|triton|pip|setuptools)=='; \
	} > $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) runs
