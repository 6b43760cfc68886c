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

# checkov, the manifests' scanner, has pins of its own that clash with the jobs': it gets a venv of its own.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed: requirements/checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet -r requirements/checkov.txt
	touch $@

install: $(VENV)/.installed $(CHECKOV_VENV)/.installed

# Two workers, each module's tests on one of them (its module-scoped fixtures run once).
test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 --dist loadscope

lint: install
	$(BIN)/ruff check jobs tests bench
	$(BIN)/ruff format --check jobs tests bench

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

# ---- Container image (Dockerfile, docs/container.md) ----
# `make build push IMAGE=registry.example.com/ml/pai-diffusion-jobs`, `make run-local JOB=generate PROMPT=一只猫`.
DOCKER ?= docker
IMAGE ?= pai-diffusion-jobs
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' jobs/__init__.py)
TAG ?= $(VERSION)
BUILD_FLAGS ?=

.PHONY: build push run-local test-image

build:
	$(DOCKER) build $(BUILD_FLAGS) --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown) -t $(IMAGE):$(TAG) .

push:
	@case "$(IMAGE)" in */*) ;; *) echo "push: set IMAGE to a registry path, e.g. IMAGE=registry.example.com/ml/pai-diffusion-jobs" >&2; exit 2;; esac
	$(DOCKER) push $(IMAGE):$(TAG)

# run-local: the job in the image on this machine, with the production container settings (read-only root,
# /tmp tmpfs, UID 1000: DATA, OUTPUTS and MODEL_CACHE must be writable by it). Paths in the job's variables are
# paths in the container: DATA is /data (read-only), OUTPUTS is /outputs, MODEL_CACHE is /cache (HF_HOME's volume).
# Every job setting given to make (PROMPT=..., MODEL_NAME=..., or exported) is passed by name, so values are
# never re-quoted. GPUs: `--gpus all` with docker; podman uses CDI, e.g. GPUS="--device nvidia.com/gpu=all".
JOB ?= generate
DATA ?= $(CURDIR)/data
OUTPUTS ?= $(CURDIR)/outputs
MODEL_CACHE ?= $(HOME)/.cache/pai-diffusion-jobs
GPUS ?= $(if $(filter docker,$(notdir $(DOCKER))),--gpus all)
RUN_FLAGS ?=
# The names of every setting, from the jobs' configuration classes (aliases included), plus CONFIG_FILE and HF_HUB_OFFLINE.
JOB_SETTINGS = $(shell $(BIN)/python -c 'from jobs.config import LAUNCHER_VARIABLES; from jobs.registry import JOBS; \
	names = {n for j in JOBS.values() for f, i in j.config.model_fields.items() for n in (f, *getattr(i.validation_alias, "choices", ()))}; \
	print(*sorted({n.upper() for n in names - LAUNCHER_VARIABLES}))') CONFIG_FILE HF_HUB_OFFLINE
GIVEN_SETTINGS = $(foreach v,$(filter-out OUTPUT_DIR,$(JOB_SETTINGS)),$(if $(filter command environment,$(firstword $(origin $(v)))),$(v)))

run-local: export OUTPUT_DIR ?= /outputs/$(JOB)
run-local: install
	mkdir -p $(DATA) $(OUTPUTS) $(MODEL_CACHE)
	$(DOCKER) run --rm $(GPUS) --read-only --tmpfs /tmp --shm-size 8g \
		-v $(DATA):/data:ro -v $(OUTPUTS):/outputs -v $(MODEL_CACHE):/cache \
		-e OUTPUT_DIR $(addprefix -e ,$(GIVEN_SETTINGS)) $(RUN_FLAGS) $(IMAGE):$(TAG) $(JOB)

# test-image: builds this Dockerfile on a debootstrapped Debian with the CPU torch wheel and runs generate and
# lora in it as production would (tests/image/check_image.py). Needs root and Debian's archive; caches in /var/tmp.
test-image: install
	$(BIN)/python tests/image/check_image.py

# ---- Kubernetes manifests (k8s/, helm/) -------------------------------------------------------
# Offline, with the real tools: kubectl kustomize, Helm's Go SDK (helm lint --strict, the values
# schema), kubernetes-validate --strict for Kubernetes 1.30 and the newest it ships, yamllint,
# checkov over every rendering and the Dockerfile (k8s/checkov-skips.yaml says what it skips and why),
# and the policy and chart/kustomize parity tests. `make test` runs the same checks among the rest.
.PHONY: k8s-validate
k8s-validate: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q tests/test_k8s.py tests/test_helm.py tests/test_scan.py

# ---- Benchmarks (bench/) ----------------------------------------------------------------------
# Each prints ratios against a baseline run in the same invocation; figures go to docs/benchmarks.md.
# A CPU run takes ROUNDS rounds of every contender, as a shared machine's speed drifts (about 25 min
# a round); `make bench ROUNDS=1` for a quick look. bench/data.py adds about 50 minutes, bench/bookkeeping.py 3,
# bench/compiled_pass.py 15 (SD 1.x's sizes), bench/compile.py (one round) 50.
ROUNDS ?= 3
.PHONY: bench bench-gpu
bench: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/generate.py --rounds $(ROUNDS)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/train.py --rounds $(ROUNDS)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/vae_decode.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/step_parts.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/compiled_pass.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/compiled_pass.py --size sd1 --resolution 512 --batch 1 --repeats 4
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/data.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/bookkeeping.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/compile.py --rounds 1

# On a CUDA machine: the full SD 1.x architecture (860M-parameter UNet, random weights) at 512x512.
# compiled_pass.py first: in a few minutes it gives what COMPILE=auto's GPU break-even needs.
bench-gpu: install
	$(BIN)/python bench/compiled_pass.py --size sd1 --device cuda --dtype fp16 --resolution 512 --batch 4
	$(BIN)/python bench/generate.py --size sd1 --device cuda --prompts 256
	$(BIN)/python bench/train.py --size sd1 --device cuda --resolution 512 --batch 8 --steps 40 --images 64
	$(BIN)/python bench/vae_decode.py --size sd1 --device cuda --batch 32 --resolution 512
	$(BIN)/python bench/compile.py --size sd1 --device cuda --dtype fp16 --prompts 256 32 --resolution 512 --batch 8 --rounds 1
