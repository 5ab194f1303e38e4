# Two commands on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv on first use (torch, a patched Horovod build, the
# project) and reuse it afterwards.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrapped
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint format clean-venv

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(if $(QUICK),--quick)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
