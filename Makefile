# vattn: two commands for a newcomer, `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test serve bench bench-results peers lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	-$(PY) -m vattn.attention.cpu_kernels --build  # our CPU kernels (attention, fused layer ops); without a compiler vattn falls back
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/vattn serve $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/vattn bench throughput $(ARGS)

# vLLM's CPU build in its own environment (.venv-peers), for the harness's side-by-side rows
peers: $(STAMP)
	$(PY) -m vattn.bench --setup-peers

# every committed CPU benchmark result and the README's table generated from them (run on an idle machine)
bench-results: $(STAMP)
	$(PY) scripts/bench_results.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-peers build *.egg-info .pytest_cache
