# Two set-up commands: `make quickstart` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
# A GPU user overrides this, e.g. `make quickstart TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/minimind-v quickstart

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
