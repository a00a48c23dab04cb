# The two commands a newcomer needs: `make run` and `make test`.
# Everything lands in .venv; torch and torchvision come from the wheels on this machine's disk.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup run demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the broker worker lands, `run` fits the shipped offline backbone on a synthetic
# part and scores good and defective frames of it.
run: demo

demo: setup
	$(BIN)/inspector demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]  # 5: none selected yet

bench: setup
	$(BIN)/python bench/kde_scoring.py --repeats 21
	$(BIN)/python bench/refit_throughput.py --images 256

clean:
	rm -rf $(VENV) build *.egg-info
