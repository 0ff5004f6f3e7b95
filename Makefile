# The two commands: `make run` serves on embedded defaults, `make test` runs every test.
VENV   ?= .venv
PYTHON ?= python3
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 2
APP    := --app app.asgi:create_app
SOURCES := $(wildcard app crypto tests loadtests)
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install lock run serve test lint openapi bench demo clean web-vendor loadtest migration browser-deps softhsm scale

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]' -c constraints.txt
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## constraints.txt from the newest releases pyproject.toml allows (a scratch venv), then `make test`.
lock:
	rm -rf var/lock-venv && $(PYTHON) -m venv var/lock-venv
	var/lock-venv/bin/pip install --quiet --upgrade pip && var/lock-venv/bin/pip install --quiet -e '.[test]'
	{ sed -n '1,2p' constraints.txt; var/lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf var/lock-venv

## Serve on embedded defaults: SQLite under var/, in-process nonce store, dev keys, one worker.
run: install
	$(VENV)/bin/litestar $(APP) ecard db upgrade
	$(VENV)/bin/uvicorn --factory app.asgi:create_app --host $(HOST) --port $(PORT) --http app.server.http_limits:LimitedHttpToolsProtocol

## Production-style: several workers; needs REDIS_URL (and DATABASE_URL, ECARD_KEYS_DIR, ECARD_MODE=production).
## /metrics sums the workers through PROMETHEUS_MULTIPROC_DIR (emptied at each start). Run
## `litestar --app app.asgi:create_app ecard events drain` beside it.
METRICS_DIR ?= var/prometheus
serve: install
	test -n "$(REDIS_URL)" || (echo "serve runs $(WORKERS) workers and needs REDIS_URL" >&2; exit 2)
	$(VENV)/bin/litestar $(APP) ecard db upgrade
	rm -rf $(METRICS_DIR) && mkdir -p $(METRICS_DIR)
	PROMETHEUS_MULTIPROC_DIR=$(METRICS_DIR) WEB_CONCURRENCY=$(WORKERS) \
		$(VENV)/bin/uvicorn --factory app.asgi:create_app --host $(HOST) --port $(PORT) \
		--workers $(WORKERS) --no-access-log --log-config deploy/logging.json --loop uvloop --http app.server.http_limits:LimitedHttpToolsProtocol

## Every test: lint, types, unit and integration (real Redis; SQLite and PostgreSQL; SoftHSM2), browser.
test: browser-deps softhsm install lint
	$(VENV)/bin/pytest

## The browser tests' Debian chromium and CJK fonts: found, or apt-get installed (as root or with
## passwordless sudo), or a message saying what to install (then `make test` stops before pytest).
browser-deps:
	bash scripts/ensure-browser

## SoftHSM2, the PKCS#11 module the HSM tests hold issuer keys in: found, or apt-get installed (as for browser-deps).
softhsm:
	bash scripts/ensure-softhsm

lint: install
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy

## Write app/db/migrations/versions/000N_$(NAME).py: the models' difference from a throwaway SQLite
## database upgraded to head (Alembic autogenerate; read it, and try it on PostgreSQL, before committing).
migration: install
	test -n "$(NAME)" || (echo "usage: make migration NAME=what_it_does (lower-case, digits, underscores)" >&2; exit 2)
	$(VENV)/bin/python -m app.db.migrate "$(NAME)"

## Rewrite openapi/openapi.json from the code (a test fails when they differ).
openapi: install
	$(VENV)/bin/python -m app.server.openapi_export

## Set up a region, an admin, a gate and a card to try the loop by hand (see README).
demo: install
	$(VENV)/bin/litestar $(APP) ecard db upgrade
	$(VENV)/bin/litestar $(APP) ecard demo

## Refresh the browser pages' vendored libraries from npm (jsQR: QR decoding in the gate console
## where the browser has no BarcodeDetector; @noble/ed25519: the device key where WebCrypto lacks
## Ed25519; swagger-ui-dist: the API docs page at /schema). The copies are kept in the repository, checked against their SHA256SUMS; the pages load
## nothing from another host.
WEB_VENDOR := app/web/shared/vendor
web-vendor:
	rm -rf var/web-vendor && mkdir -p var/web-vendor/jsqr var/web-vendor/noble var/web-vendor/swagger var/web-vendor/sm var/web-vendor/out
	cd var/web-vendor && npm pack --silent jsqr@1.4.0 @noble/ed25519@3.2.0 swagger-ui-dist@5.18.2 sm-crypto-v2@1.15.1 >/dev/null
	tar -xzf var/web-vendor/jsqr-1.4.0.tgz -C var/web-vendor/jsqr
	tar -xzf var/web-vendor/noble-ed25519-3.2.0.tgz -C var/web-vendor/noble
	tar -xzf var/web-vendor/swagger-ui-dist-5.18.2.tgz -C var/web-vendor/swagger
	tar -xzf var/web-vendor/sm-crypto-v2-1.15.1.tgz -C var/web-vendor/sm
	cp var/web-vendor/jsqr/package/dist/jsQR.js var/web-vendor/out/jsQR.js
	cp var/web-vendor/jsqr/package/LICENSE var/web-vendor/out/jsQR.LICENSE
	cp var/web-vendor/noble/package/index.js var/web-vendor/out/noble-ed25519.js
	cp var/web-vendor/noble/package/LICENSE var/web-vendor/out/noble-ed25519.LICENSE
	cp var/web-vendor/swagger/package/swagger-ui-bundle.js var/web-vendor/swagger/package/swagger-ui.css var/web-vendor/out/
	cp var/web-vendor/swagger/package/LICENSE var/web-vendor/out/swagger-ui.LICENSE
	cp var/web-vendor/swagger/package/NOTICE var/web-vendor/out/swagger-ui.NOTICE
	cp var/web-vendor/sm/package/dist/index.umd.js var/web-vendor/out/sm-crypto-v2.js
	cp var/web-vendor/sm/package/LICENCE_MIT var/web-vendor/out/sm-crypto-v2.LICENSE
	cd var/web-vendor/out && sha256sum -c $(CURDIR)/$(WEB_VENDOR)/SHA256SUMS
	cp var/web-vendor/out/* $(WEB_VENDOR)/
	rm -rf var/web-vendor

## Verify beside a no-op POST and the naive reference (loadtests/README.md); a calibration line first, to
## compare machines (docs/performance.md). E.g. BENCH_ARGS="--duration 8 --rounds 3 --credential-lifetime 120"
bench: install
	$(VENV)/bin/python -m loadtests.bench_verify $(BENCH_ARGS)

## Locust scenarios headless: starts the service, prepares data, writes CSV/HTML reports; exits 1 on
## failures or a p99 over the limit (loadtests/README.md). A calibration line first; at the end, who used the
## cores (service, Locust, Redis, other work). E.g. LOADTEST_ARGS="-u 60 -t 5m --shape rush-hour", or
## LOADTEST_ARGS="--loop-lag" to see the service's event-loop stalls and collector passes
loadtest: install
	$(VENV)/bin/python -m loadtests.headless $(LOADTEST_ARGS)

## One region at provincial scale in one run (loadtests/scale.py, docs/scale.md): import, activation,
## mirror refill and its Redis memory, terminals, start-up, offline kit, verify at a baseline and at CARDS.
## Needs PostgreSQL ($$DATABASE_URL or the local `test` server) and redis-server. E.g. CARDS=3000000
CARDS ?= 1000000
scale: install
	$(VENV)/bin/python -m loadtests.scale --cards $(CARDS) $(SCALE_ARGS)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis
