# Two entry points for a fresh machine:  make quickstart   and   make test
# Both create .venv (pip, CPU torch pinned first), install requirements.txt and the package, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-all clean

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~25 s): build it once here, not in a test
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/dopsd train --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf runs .pytest_cache
