# model-trainer. `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
# uv installed by pip may not be on PATH yet: fall back to `python3 -m uv`.
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --frozen --no-sync
ARTIFACTS ?= demo-artifacts
PY_TREES := trainer_image operator tests bench scripts
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
CHART := helm/model-trainer
NAMESPACE ?= model-trainer-system
KIND ?= kind
KIND_CLUSTER ?= model-trainer
# The Helm CLI pinned in tools/helm (built once from Go modules), unless HELM names another.
HELM_BIN = $$(bash scripts/helm_tool.sh)

.PHONY: setup k8s-tools helm demo test test-fast lint fmt bench crds manifests images \
	kind-up kind-load deploy kind-down clean help

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
	$(HELM_BIN) lint --strict $(CHART)

fmt: setup
	$(RUN) ruff format $(PY_TREES)
	$(RUN) ruff check --fix $(PY_TREES)

bench: setup ## benchmarks: training tokens/s and tokenizer MB/s against the plain libraries
	$(RUN) python bench/bench_tokenizer.py
	$(RUN) python bench/bench_training.py
	$(RUN) python bench/bench_operator.py

helm: ## build the pinned Helm CLI into .tools/ (Go; once per version)
	@bash scripts/helm_tool.sh

crds: setup ## regenerate crds/ and the chart's crds/ from the pydantic models
	$(RUN) model-trainer crds --out crds
	$(RUN) model-trainer crds --out $(CHART)/crds

manifests: crds ## render operator/deploy/install.yaml (the kubectl bundle) from the chart
	@bash scripts/render_manifests.sh

images: setup ## build the trainer and operator images, offline (installs and starts Docker if needed)
	@bash scripts/images.sh

kind-up: ## a single-node kind cluster whose artifacts live in ./artifacts on your disk
	@command -v $(KIND) >/dev/null || { echo "kind not found: go install sigs.k8s.io/kind@v0.33.0" >&2; exit 1; }
	@# Trainer pods write as uid 10001 into this folder through the node's extraMount.
	mkdir -p artifacts && chmod 0777 artifacts
	$(KIND) get clusters 2>/dev/null | grep -qx $(KIND_CLUSTER) \
		|| $(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml

kind-load: images ## load the locally built images into the kind cluster
	$(KIND) load docker-image --name $(KIND_CLUSTER) \
		model-trainer/trainer:$(VERSION) model-trainer/operator:$(VERSION)

deploy: ## helm upgrade --install the chart into the current context (kind values)
	$(HELM_BIN) upgrade --install model-trainer $(CHART) --namespace $(NAMESPACE) \
		--create-namespace --values examples/kind-values.yaml --wait --timeout 5m

kind-down: ## delete the kind cluster (./artifacts stays)
	$(KIND) delete cluster --name $(KIND_CLUSTER)

clean:
	rm -rf $(ARTIFACTS) bench/results .pytest_cache .mypy_cache .ruff_cache
