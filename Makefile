# nmtkit: the two commands of the README quick start, and a few helpers.
#   make train   set up .venv, train the tiny English→Chinese config (~10 min on 2 CPU cores), translate a sample
#   make test    set up .venv with the dev tools and run the whole test suite

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
CONFIG ?= configs/tatoeba-en-zh-tiny.yaml
RUN    ?= checkpoints/tatoeba-en-zh-tiny

.PHONY: train test install lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: a bare `torch` requirement on an empty venv could pull a multi-GB build
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,plot,tensorboard]"
	touch $@

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(BIN)/nmtkit train --config $(CONFIG)
	$(BIN)/nmtkit translate --checkpoint $(RUN) --show-tokens \
		--reference "告诉我关于你的事情" "Tell me something about yourself"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy src

clean-venv:
	rm -rf $(VENV)
