# Two commands: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepprobe-installed
DEMO_DIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast lint pytest bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so the package's range is already satisfied (CPU build here).
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,math,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stepprobe demo run --out $(DEMO_DIR)

# ruff (style, import order, complexity limits on src/), the layers and no-cycles contracts
# (lint-imports, config in pyproject.toml), and no code written twice in src/ (the
# `duplicates` tool, where installed: no pair of 10 or more shared lines).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
	@if command -v duplicates >/dev/null; then \
		out=$$(cd src && duplicates --min-lines 10); echo "$$out" | head -1; \
		echo "$$out" | head -1 | grep -q '^no duplicates' || { echo "$$out" >&2; exit 1; }; \
	else echo "duplicates: not installed here, skipped"; fi

pytest: $(STAMP)
	# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected" >&2; exit 1; fi; exit $$rc

test: lint pytest

# The inner loop: tests/unit only (no real checkpoint, no TRL run; about a minute).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
