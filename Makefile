# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch pair this project is tested with; on this kind of machine pip takes both from local disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
FMNIST ?= /usr/share/datasets/fashion-mnist
SHARDS ?= shards/fashion-mnist
RUN    ?= runs/demo

.PHONY: install data shards demo test lint format results gpu-check clean
.DEFAULT_GOAL := demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Fashion-MNIST is a Debian package here; elsewhere, put the four IDX files in $(FMNIST).
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && [ ! -f $(FMNIST)/train-images-idx3-ubyte ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

shards: install data
	@if [ -f $(SHARDS)/index.json ]; then echo "$(SHARDS) exists: reusing it"; else \
	  $(BIN)/python -m resnet_dist.shard fashion-mnist --root $(FMNIST) --out $(SHARDS) --val-fraction 0.1; fi

# 2 processes on CPU (gloo), bf16 autocast, a width-16 ResNet-18 for 3 epochs: under 3 minutes here (README).
demo: shards
	rm -rf $(RUN)
	WANDB_SILENT=true $(BIN)/accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \
	  --mixed_precision bf16 launch/train.py --data $(SHARDS) --out $(RUN) \
	  --recipe fashion-mnist-demo --num-workers 1 --log-every 50

test: install lint
	$(BIN)/python -m pytest -q

# ruff's linter and formatter, as configured in pyproject.toml; `make format` applies both.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The README's Results: time to 94.0% (6 and 15 min budgets), 95.5% and 94.9% (60 min) on Fashion-MNIST, then
# the curve. Each run starts from nothing (packing included); run them on an otherwise idle machine.
results: install data
	rm -rf results/fm-6min results/fm-15min results/fm-60min-new results/fm-60min
	$(BIN)/python launch/time_to_accuracy.py --recipe fashion-mnist-6min --goal 94.0 --budget 6 --out results/fm-6min
	$(BIN)/python launch/time_to_accuracy.py --recipe fashion-mnist-15min --goal 94.0 --budget 15 --out results/fm-15min
	$(BIN)/python launch/time_to_accuracy.py --recipe fashion-mnist-60min --goal 95.5 --budget 60 --out results/fm-60min-new
	$(BIN)/python launch/time_to_accuracy.py --recipe fashion-mnist-resnet18 --goal 94.9 --budget 60 --out results/fm-60min
	$(BIN)/python launch/time_to_accuracy.py --plot results/fm-6min results/fm-15min results/fm-60min-new \
	  results/fm-60min --to results/fashion-mnist-curve.png

# Every CUDA path on one GPU in about 6 minutes (nvJPEG decode, --decode gpu, the step bench at 32 and 224 px
# with compile on/off, fp16 + SyncBN + resume, a timed recipe); logs and summary.txt in results/gpu-check.
gpu-check: install data
	OUT=results/gpu-check PYTHON=$(BIN)/python FMNIST=$(FMNIST) bash launch/gpu_check.sh

clean:
	rm -rf $(RUN) $(SHARDS) results
