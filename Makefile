# Two commands: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build found locally; on GPU nodes use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser demo demo-smollm2 test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# DeepSpeed compiles against the torch above; build isolation would fetch a second (CUDA) torch.
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.19"
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

# Headless Chromium for the report's browser test (tests/test_report.py); CI runs `make test` as root on Debian.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

demo: setup
	$(BIN)/harness demo

# The paper's comparison on SmolLM2-135M-Instruct (imported from its PyPI package): see the README.
demo-smollm2: setup
	$(BIN)/harness demo --profile smollm2

test: setup browser
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=10

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf artifacts results mlruns .pytest_cache
