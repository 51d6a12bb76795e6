# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-embedded.txt requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test check fmt migrate bench chaos hosts up worker api fake clean

# One JSON log line from make itself: `python3 -c "$$JSON_LINE" EVENT [key=value | tail=FILE]...`.
define JSON_LINE
import json, sys, time
line = {"ts": round(time.time(), 6), "level": "info", "logger": "make", "event": sys.argv[1]}
for arg in sys.argv[2:]:
    key, _, value = arg.partition("=")
    if key == "tail":
        line.update(level="error", log=value, tail=open(value, errors="replace").read()[-4000:])
    else:
        line[key] = value
print(json.dumps(line), file=sys.stderr, flush=True)
endef

install: $(STAMP)

# Quiet, like `run`: one JSON line to say what happens, pip's own output in $(VENV)/install.log (its
# last lines in the JSON line when it fails).
$(STAMP): export JSON_LINE := $(JSON_LINE)
$(STAMP):
	@$(PYTHON) -c "$$JSON_LINE" dev.installing log=$(VENV)/install.log
	@mkdir -p $(VENV) && { test -x $(PY) || $(PYTHON) -m venv $(VENV); } > $(VENV)/install.log 2>&1 \
	  && $(PY) -m pip install -q --disable-pip-version-check -U pip >> $(VENV)/install.log 2>&1 \
	  && $(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e . >> $(VENV)/install.log 2>&1 \
	  || { $(PYTHON) -c "$$JSON_LINE" dev.install_failed tail=$(VENV)/install.log; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

# `make run` writes JSON lines only (`make run 2>&1 | jq`): the recipe is not echoed, and what the
# launcher's children print is JSON or wrapped into it.
run: install ## the whole service on embedded defaults (API on :8000); restarts what exits, Ctrl-C stops all
	@$(PY) -m mediagen.devtools

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
	$(PY) bench/failover.py

chaos: install ## jobs through a faulty Replicate: workers SIGKILLed, a 150 s outage, 30% ambiguous creates; writes docs/reliability.md
	$(PY) bench/chaos.py

hosts: install ## as root: 2 API and 3 worker hosts in network namespaces while hosts die, lose PostgreSQL or Redis, or run 30 s ahead; writes docs/reliability.md
	$(PY) bench/hosts.py

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
