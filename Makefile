# model-trainer. `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
# uv installed by pip may not be on PATH yet: fall back to `python3 -m uv`.
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --frozen --no-sync
ARTIFACTS ?= demo-artifacts
PY_TREES := trainer_image operator tests bench scripts

.PHONY: setup k8s-tools demo test test-fast lint fmt bench crds clean help

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: ## install uv, redis-server, openssl and the locked virtualenv
	@bash scripts/bootstrap.sh

k8s-tools: ## build etcd, kube-apiserver and kubectl for the k8s tests (Go; once per version)
	@bash scripts/k8s_tools.sh

demo: setup ## train a tokenizer and a small GPT-2 on the Python standard library's source
	@# Start the demo afresh; a real run would resume from its last checkpoint instead.
	rm -rf $(ARTIFACTS)/default
	$(RUN) python scripts/demo_corpus.py $(ARTIFACTS)/corpora/python-stdlib.txt
	$(RUN) model-trainer run -f examples/demo/tokenizerjob.yaml -f examples/demo/trainingrun.yaml \
		--artifacts $(ARTIFACTS)

test: setup ## every test, against real Redis, a real kube-apiserver + etcd and real training
	@bash scripts/bootstrap.sh --k8s
	$(RUN) pytest

lint: setup ## ruff, ruff format, mypy --strict and the guard against Any/cast/type: ignore/print
	$(RUN) ruff check $(PY_TREES)
	$(RUN) ruff format --check $(PY_TREES)
	$(RUN) mypy
	@# Tests too, where pytest fixtures and parametrized arguments may go unannotated.
	$(RUN) mypy --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls tests
	$(RUN) python scripts/guard.py

fmt: setup
	$(RUN) ruff format $(PY_TREES)
	$(RUN) ruff check --fix $(PY_TREES)

bench: setup ## benchmarks: training tokens/s and tokenizer MB/s against the plain libraries
	$(RUN) python bench/bench_tokenizer.py
	$(RUN) python bench/bench_training.py
	$(RUN) python bench/bench_operator.py

crds: setup ## regenerate crds/ from the pydantic models
	$(RUN) model-trainer crds --out crds

clean:
	rm -rf $(ARTIFACTS) bench/results .pytest_cache .mypy_cache .ruff_cache
