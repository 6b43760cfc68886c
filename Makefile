# pai-diffusion-jobs: `make demo` runs the jobs on a tiny model on this machine, `make test` checks everything.
SHELL := bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := out/demo

.PHONY: install test demo lint

# requirements/dev.txt pins every package (torch==2.13.0 takes the local CPU wheel on our machines).
$(VENV)/.installed: requirements/runtime.txt requirements/dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest

lint: install
	$(BIN)/ruff check jobs tests
	$(BIN)/ruff format --check jobs tests

# A tiny PAI-shaped model with random weights, then generate and img2img on CPU: images and index.html.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning; on a busy machine spinning
# threads starve each other (measured: 8 images in 33 s instead of 3 s on 2 shared cores).
demo: export OMP_WAIT_POLICY = PASSIVE
demo: install
	rm -rf $(DEMO)
	TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/python tests/tiny_model.py $(DEMO)/model
	HF_HUB_OFFLINE=1 MODEL_NAME=$(DEMO)/model PROMPTS_FILE=tests/data/prompts.txt OUTPUT_DIR=$(DEMO)/generate \
		NUM_IMAGES_PER_PROMPT=2 $(BIN)/pai-diffusion generate
	HF_HUB_OFFLINE=1 MODEL_NAME=$(DEMO)/model INPUT_DIR=$(DEMO)/generate PROMPT="水彩画风格" OUTPUT_DIR=$(DEMO)/img2img \
		$(BIN)/pai-diffusion img2img
	@echo "open $(DEMO)/generate/index.html and $(DEMO)/img2img/index.html"

# ---- Kubernetes manifests (k8s/, helm/) -------------------------------------------------------
# Offline, with the real tools: kubectl kustomize, Helm's Go SDK (helm lint --strict, the values
# schema), kubernetes-validate --strict for Kubernetes 1.30 and the newest it ships, yamllint,
# and the policy and chart/kustomize parity tests. `make test` runs the same checks among the rest.
.PHONY: k8s-validate
k8s-validate: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q tests/test_k8s.py tests/test_helm.py

# ---- Benchmarks (bench/) ----------------------------------------------------------------------
# Each prints ratios against a baseline run in the same invocation; figures go to docs/benchmarks.md.
.PHONY: bench bench-gpu
bench: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/generate.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/train.py

# On a CUDA machine: the full SD 1.x architecture (860M-parameter UNet, random weights) at 512x512.
bench-gpu: install
	$(BIN)/python bench/generate.py --size sd1 --device cuda --prompts 256
	$(BIN)/python bench/train.py --size sd1 --device cuda --resolution 512 --batch 8 --steps 40 --images 64
