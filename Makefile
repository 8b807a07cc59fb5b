# The README's commands. Each target sets up .venv first when it is missing.
PY      := .venv/bin/python
# the venv's tools first on PATH (its ninja builds the XNOR extension)
export PATH := $(CURDIR)/.venv/bin:$(PATH)
DATA    ?= $(or $(COMPRESS_DATA_DIR),data)
SHARED  := ../shared/data/cifar10/unpack.py

.PHONY: demo test test-slow test-all mutation lint bench data clean

.venv/.ready: pyproject.toml
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

# CIFAR-10 in the standard layout: a local copy when this checkout sits beside one
# (../shared), else the canonical download.
$(DATA)/cifar-10-batches-py/test_batch: | .venv/.ready
	@if [ -f $(SHARED) ]; then $(PY) $(SHARED) $(DATA); \
	else $(PY) -c "from compress.data import load_dataset; load_dataset('cifar10', root='$(DATA)', download=True)"; fi

data: $(DATA)/cifar-10-batches-py/test_batch

demo: .venv/.ready data
	COMPRESS_DATA_DIR=$(DATA) $(PY) train.py experiment=quickstart

test: .venv/.ready
	$(PY) -m pytest -m "not slow"

test-slow: .venv/.ready   # subprocess smoke tests of the entry points, torch.compile, bench/gpu.sh
	$(PY) -m pytest -m slow

test-all: .venv/.ready
	$(PY) -m pytest

mutation: .venv/.ready   # cosmic-ray over the core modules (tests/mutation/), report in docs/mutation.md
	$(PY) -m tests.mutation.run $(ARGS)

lint: .venv/.ready
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: .venv/.ready data
	$(PY) bench/train_speed.py

clean:
	rm -rf outputs .pytest_cache
