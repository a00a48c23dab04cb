# The two commands a newcomer needs: `make run` and `make test`.
# Everything lands in .venv; torch and torchvision come from the wheels on this machine's disk.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

SAMPLE := sample-line

.PHONY: setup run sample-model demo test test-slow bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The worker, in the foreground. On a fresh clone the store is empty, so a first model is
# fitted from a generated sample line (the shipped offline backbone, no download).
run: setup
	@scripts/local-rabbitmq
	@$(BIN)/python -c "import sys, inspector.config as c, inspector.stores as s; sys.exit(not s.open_store(c.load().store).names())" \
		|| $(MAKE) --no-print-directory sample-model
	$(BIN)/inspector run

sample-model: setup
	@[ -d $(SAMPLE)/train/good ] || $(BIN)/inspector samples --out $(SAMPLE)  # samples refuses a used folder
	$(BIN)/inspector refit --data $(SAMPLE)/train/good --held-out 0.25 --target-false-reject 0.02 --no-announce

demo: setup
	$(BIN)/inspector demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]  # 5: none selected yet

bench: setup
	@scripts/local-rabbitmq
	$(BIN)/inspector bench
	$(BIN)/python bench/kde_scoring.py --repeats 21
	$(BIN)/python bench/backbone_precision.py --rounds 15
	$(BIN)/python bench/refit_throughput.py --images 256

# On a CUDA machine, under 10 minutes: the cuda tests, bench at batches 16-128 in fp32 and fp16, fp16's tolerance
# and AUROC, CPU against GPU JPEG decode, ONNX Runtime's TensorRT/CUDA providers beside torch, the null-plugin
# ceiling; writes gpu-check.json and prints a table.
# Fails (never skips) without CUDA; `scripts/gpu-check --device cpu` is a dry run of the plumbing.
gpu-check: setup
	@scripts/local-rabbitmq || echo "gpu-check: no RabbitMQ here; the whole-path steps will say not available"
	$(BIN)/python scripts/gpu-check

clean:
	rm -rf $(VENV) build *.egg-info $(SAMPLE)
