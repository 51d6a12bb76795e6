# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-embedded.txt requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test check fmt migrate bench chaos up worker api fake clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
	rm -f $(VENV)/.installed-* && touch $@

run: install ## the whole service on embedded defaults (API on :8000)
	$(PY) -m mediagen.devtools

test: check ## lint, types, then the whole suite against real PostgreSQL, Redis and the fake Replicate
	$(PY) -m pytest

check: install ## lint and type-check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

bench: install ## the benchmark suite (under 5 minutes); writes docs/benchmarks.md
	$(PY) bench/run.py
	$(PY) bench/limits.py

chaos: install ## 1,000 jobs through a faulty Replicate while a worker is SIGKILLed; writes docs/reliability.md
	$(PY) bench/chaos.py

up: ## the whole stack in Docker (PostgreSQL, Redis, MinIO, API, worker, fake Replicate)
	docker compose up --build

migrate: install ## upgrade DATABASE_URL to the newest schema
	$(VENV)/bin/alembic upgrade head

api: install
	$(VENV)/bin/uvicorn --factory mediagen.api.app:create_app --host 127.0.0.1 --port 8000 --http mediagen.api.serving:HeaderTimeoutProtocol

worker: install
	$(PY) -m mediagen.worker

fake: install
	$(PY) -m fake_replicate

clean:
	rm -rf .mediagen media/*/
