# modeldeploy: every entry point a developer or CI needs.
#   make demo   - local control plane, CRD, operator, example rollout (see README)
#   make test   - unit, cluster and Triton tiers against real components
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MODELDEPLOY_CACHE ?= $(HOME)/.cache/modeldeploy
CLUSTER_DIR ?= .cluster
PYTEST_ARGS ?=

.PHONY: help venv binaries node-deps cluster-up cluster-down demo test test-unit test-tools lint typecheck crds chart-crds chart-docs chart-check image images bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,triton,worker]'
	touch $@

venv: $(VENV)/.installed ## create .venv with the package and test tools

binaries: ## build the Go control-plane binaries once, cached under $(MODELDEPLOY_CACHE)
	hack/build-binaries.sh all

node-deps: ## Debian packages of the real node and the image builds (runc, CNI plugins, iptables, mmdebstrap; root)
	@hack/install-node-deps.sh || echo "node-deps: not installed (the real node will say why it cannot start)" >&2

cluster-up: venv binaries node-deps ## start the local control plane (+ the real node where possible) in the background
	$(PY) -m hack.localcluster up --dir $(CLUSTER_DIR)

cluster-down: ## stop the local control plane (and the operator make demo started)
	@if [ -f $(CLUSTER_DIR)/operator.pid ]; then kill $$(cat $(CLUSTER_DIR)/operator.pid) 2>/dev/null || true; rm -f $(CLUSTER_DIR)/operator.pid; fi
	@if [ -x $(PY) ]; then $(PY) -m hack.localcluster down --dir $(CLUSTER_DIR); fi

demo: venv binaries node-deps ## the main job on the local cluster
	hack/demo.sh

test: venv binaries node-deps ## run every test tier (cluster and real-node tests included)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv ## pure unit tests only, no cluster
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-tools: venv ## the tooling tier: chart rendering, local cluster and real node config, images; no cluster
	$(PY) -m pytest tests/tools $(PYTEST_ARGS)

lint: venv ## ruff lint + format check
	$(VENV)/bin/ruff check operator tests hack
	$(VENV)/bin/ruff format --check operator tests hack

typecheck: venv ## mypy --strict on the package
	$(VENV)/bin/mypy

bench: venv binaries ## print speed figures (create latency, burst, steady-state writes, RSS, rollback reaction)
	$(PY) -m hack.bench $(BENCH_ARGS)

crds: venv ## regenerate crds/ and the API references from the typed models (and the chart's copy)
	$(PY) -m modeldeploy crd --kind modeldeployment > crds/modeldeploy.io_modeldeployments.yaml
	$(PY) -m modeldeploy crd --kind batchinference > crds/modeldeploy.io_batchinferences.yaml
	cp crds/*.yaml charts/modeldeploy-operator/crds/
	$(PY) -m modeldeploy api-docs --kind modeldeployment > docs/api-reference.md
	$(PY) -m modeldeploy api-docs --kind batchinference > docs/batchinference-api.md

chart-crds: ## copy the generated CRD into the chart (a test fails on drift)
	cp crds/*.yaml charts/modeldeploy-operator/crds/

chart-docs: venv ## regenerate the chart README's values table and the schema's descriptions/defaults from values.yaml
	$(PY) -m hack.chartdocs

chart-check: binaries ## helm lint --strict + template for every values layout; CRD copy in sync
	hack/chart-check.sh

image: ## build the operator image (needs a Docker engine)
	docker build -t ghcr.io/modeldeploy/operator:$$($(PY) -c 'import modeldeploy;print(modeldeploy.__version__)') .

images: venv ## build the pause, triton and operator OCI archives without Docker (root; cached under $(MODELDEPLOY_CACHE)/images)
	$(PY) -m hack.images build all

clean: cluster-down ## remove local state (not the binary cache)
	rm -rf $(CLUSTER_DIR) .pytest_cache .mypy_cache .ruff_cache
