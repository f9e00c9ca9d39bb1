# Two commands matter (see README): `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NATIVE := .native

.PHONY: demo test setup system-deps native lint typecheck pytest clean openapi

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	bash scripts/test.sh

setup: system-deps $(VENV)/.installed native

system-deps:
	@bash scripts/install-system-deps.sh

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# Native pieces built on this machine: the static guest init, the guest kernel + initramfs.
native: $(VENV)/.installed
	$(BIN)/python -m unkey_deploy.dev.native $(NATIVE)

lint:
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck:
	$(BIN)/mypy

openapi:
	$(BIN)/python -m unkey_deploy.gateway.openapi > docs/openapi.json

clean:
	rm -rf $(VENV) $(NATIVE) .unkey .pytest_cache .mypy_cache .ruff_cache
