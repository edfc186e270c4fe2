# mlxbatch: `make demo` sets up and runs a real job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# MLX's Linux CPU wheel links the reference BLAS; OpenBLAS, when installed, is ~28x faster.
OPENBLAS := $(wildcard /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)
RUN := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) ,)$(PY)
DEMO := demo

.PHONY: setup demo test test-faults lint bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	@echo "== building a small RANDOM-WEIGHT model in $(DEMO)/model (its text is noise; the pipeline is real)"
	@test -f $(DEMO)/model/config.json || $(RUN) -m mlxbatch.testing.tiny_model $(DEMO)/model --hidden-size 128 --num-hidden-layers 4 --vocab-size 1024
	$(RUN) -m mlxbatch process examples/prompts.jsonl -m $(DEMO)/model --max-tokens 24 -o $(DEMO)/prompts.out.jsonl
	$(RUN) -m mlxbatch process examples/openai_batch.jsonl -m $(DEMO)/model --ignore-model -o $(DEMO)/openai_batch.out.jsonl
	$(RUN) -m mlxbatch process --job jobs/label-sentiment.yaml --model $(DEMO)/model -o $(DEMO)/reviews.labels.parquet
	$(RUN) -m mlxbatch status $(DEMO)/prompts.out.jsonl
	@echo "== first lines of $(DEMO)/prompts.out.jsonl"
	@head -n 3 $(DEMO)/prompts.out.jsonl

test: setup
	$(RUN) -m pytest -m "not slow"

test-faults: setup
	$(RUN) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check mlxbatch tests benchmarks
	$(VENV)/bin/ruff format --check mlxbatch tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(RUN) -m benchmarks.run --workload all

bench-quick: setup
	$(RUN) -m benchmarks.run --quick

clean:
	rm -rf $(DEMO) .bench .pytest_cache .ruff_cache .mypy_cache
