# Two commands for a fresh clone: `make demo` (set up, then the whole job on the shared dataset)
# and `make test` (set up, then the test suite). `make setup` alone builds .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The shared dataset next to the checkout, or where this workplace keeps it; override with DATA=...
DATA   ?= $(firstword $(wildcard ../shared/data/covid19-image-dataset /work/shared/data/covid19-image-dataset) ../shared/data/covid19-image-dataset)
OUT    ?= runs/demo
SEED   ?= 0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first and pinned: the CPU wheel on disk; nothing may pull another torch build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/lungxray run "$(DATA)" --model mlp --out $(OUT) --seed $(SEED) --force

test: setup
	LUNGXRAY_SHARED_DATA="$(DATA)" $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
