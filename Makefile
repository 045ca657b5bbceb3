# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment lives in .venv; on a machine without an NVIDIA GPU the CPU build of
# torch is installed first, so pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: demo app test lint bench clean install gpu-check gpu-check-smoke

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.6"; \
	elif ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q "torch==$(TORCH_VERSION)" \
		|| $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[dev,app]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/thinkdiff demo --out demo-out

app: $(STAMP)
	$(VENV)/bin/thinkdiff app

# Two worker processes, each test file whole in one of them (its module fixtures built once): on
# the 2-core machine 425-550 s against 642-782 s in one process (docs/development.md).
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The first check on one H100/H200: real dimensions, random weights, no downloads, under 8 minutes
# (docs/gpu-check.md). gpu-check-smoke runs every branch on the CPU (make test runs it too).
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py --out gpu-check

gpu-check-smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py --smoke --out gpu-check-smoke

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out thinkdiff-app-out .pytest_cache .ruff_cache
