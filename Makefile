# One entry point for people and CI alike.
#   make demo   install (first time) and run the whole pipeline on embedded defaults
#   make test   ruff, mypy and the test suite (unit and integration, with a real local Kafka)
# VENV can point outside the checkout (CI keeps one per lock-file hash).

VENV ?= .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell (cat requirements.lock; python3 --version) | sha256sum | cut -c1-16)

.PHONY: install demo test lint

install:
	@if [ ! -f "$(VENV)/.installed-$(LOCK_HASH)" ]; then \
		echo "creating $(VENV) from requirements.lock (torch and friends: a few GB the first time)"; \
		rm -rf "$(VENV)" && python3 -m venv "$(VENV)" && \
		$(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q -r requirements.lock && \
		touch "$(VENV)/.installed-$(LOCK_HASH)"; \
	fi
	@$(PY) -m pip install -q --no-deps -e .

demo: install
	$(VENV)/bin/rtrec demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -n 2 --dist worksteal  # two sessions, each with its own broker (docs/development.md)
