# Two commands on a fresh machine: `make up` runs the loop, `make test` checks it.
# `make up GPU=1` also installs vLLM (the `gpu` extra) for [proposer] backend = "vllm".
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU ?=
comma := ,
EXTRAS := dev$(if $(GPU),$(comma)gpu)
STAMP := $(VENV)/.installed$(if $(GPU),-gpu)
# The dashboard's browser tests run in Debian's chromium, installed once (as root, or through sudo).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install up down test bench faults research lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/autoresearch up

down: $(STAMP)
	$(BIN)/autoresearch down

$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	  ($(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

# The fault suite's long form (make test runs a bounded one): bench/results/faults.json.
faults: $(STAMP)
	$(BIN)/python -m bench.faults

# The paper's Table 1 on our target (hours on a CPU; see the README): bench/results/research.json and .png.
# Arguments through ARGS, e.g. make research ARGS="--seeds 2 --experiments 16".
research: $(STAMP)
	$(BIN)/python -m bench.research $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
