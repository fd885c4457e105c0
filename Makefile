# Two commands for a fresh clone: `make demo` (set up, then the whole job on the shared dataset)
# and `make test` (set up, then the test suite, naming its 10 slowest tests). `make setup` alone builds
# .venv; `make test-fast` leaves out the slow, browser, PostgreSQL and process-starting tests (under a
# minute on 2 cores); `make lint` runs ruff.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The shared dataset: ../shared next to the checkout unless DATA=... (or $LUNGXRAY_SHARED_DATA) says where.
DATA   ?= $(or $(LUNGXRAY_SHARED_DATA),../shared/data/covid19-image-dataset)
# Adult X-rays from other hospitals, evaluated after the internal test (never trained on), when present.
EXTERNAL ?= $(dir $(DATA))external-dev
OUT    ?= runs/demo
# What the model card says of the shared dataset's sources (from ../shared/data/README.md)
ifeq ($(DATA),../shared/data/covid19-image-dataset)
DATA_SOURCES ?= Kaggle pranavraikokte/covid19-image-dataset: COVID-19 images from the University of Montreal public COVID chest X-ray collection (adults); Normal and Viral Pneumonia images from a public pediatric pneumonia X-ray collection. Research use only.
endif
SEED   ?= 0
# PyTorch's build: unset, torch==2.13.0 from pip's own index (the CPU wheel on disk here; on Linux, PyPI's
# build is a CUDA one); cpu or a CUDA version, that build from PyTorch's wheel index: `make setup TORCH=cu128`
TORCH  ?=
# The tests `make test-fast` runs: none that trains for long, drives a browser or starts a process or server.
FAST   := not slow and not browser and not postgres and not processes

.PHONY: setup demo test test-fast lint format clean

setup: $(VENV)/.installed

# torch first and pinned (TORCH picks the build); nothing may pull another torch build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH),--index-url https://download.pytorch.org/whl/$(TORCH))
	$(BIN)/pip install --quiet -e '.[test,dicom,postgres,mlflow]'
	touch $@

demo: setup
	$(BIN)/lungxray run "$(DATA)" --model mlp --out $(OUT) --seed $(SEED) --force \
		$(if $(DATA_SOURCES),--data-sources "$(DATA_SOURCES)") \
		$(if $(wildcard $(EXTERNAL)),--external "$(EXTERNAL)")

test: setup
	LUNGXRAY_SHARED_DATA="$(DATA)" $(BIN)/python -m pytest -q --durations=10

test-fast: setup
	LUNGXRAY_SHARED_DATA="$(DATA)" $(BIN)/python -m pytest -q -m "$(FAST)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
