# mailsync: `make demo` runs a real backup against a throwaway local Dovecot; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help deps venv test mutants demo bench clean

help:
	@echo "make demo   - back up sample mail from a throwaway local Dovecot (installs what is missing)"
	@echo "make test   - run the whole test suite (installs what is missing)"
	@echo "make mutants - break the code in named ways (tests/mutants.py) and check the tests notice each"
	@echo "make bench  - benchmarks against the local Dovecot (mailsync vs mbsync, sync, POP3, migrate)"

deps:
	@if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ] || ! command -v openssl >/dev/null 2>&1 \
			|| ! command -v strace >/dev/null 2>&1 || ! command -v mbsync >/dev/null 2>&1 \
			|| ! command -v offlineimap >/dev/null 2>&1; then \
		echo "Installing Dovecot (dovecot-imapd, dovecot-pop3d), openssl, strace, and mbsync and OfflineIMAP"; \
		echo "(isync, offlineimap3: the tests adopt Maildirs these tools wrote)..."; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dovecot-imapd dovecot-pop3d openssl strace \
			isync offlineimap3 >/dev/null; \
	fi
	@if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then \
		echo "Installing redis-server (the Celery fleet's tests start their own, on a free port)..."; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; \
	fi

$(BIN)/mailsync: pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test,fleet]'
	@touch $@

venv: $(BIN)/mailsync

test: deps venv
	$(BIN)/python -m pytest -q

mutants: deps venv
	$(BIN)/python -m tests.mutants

demo: deps venv
	$(BIN)/python -m tests.demo

bench: deps venv
	@missing=""; \
	command -v mbsync >/dev/null 2>&1 || missing="$$missing isync"; \
	command -v offlineimap >/dev/null 2>&1 || missing="$$missing offlineimap3"; \
	command -v mpop >/dev/null 2>&1 || missing="$$missing mpop"; \
	[ -x /usr/bin/time ] || missing="$$missing time"; \
	if [ -n "$$missing" ]; then \
		echo "Installing$$missing..."; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install -q -e '.[test,bench]'
	@# the targets table: mailsync, mbsync, OfflineIMAP (10k only) and mpop side by side; it also rewrites
	@# the tools, scale and pop3 sections of docs/benchmarks.md and their charts (bench.tools is not rerun)
	$(BIN)/python -m bench.targets --messages 10000 --scale 100000 --repeat 3 --write-docs --out .bench/targets.md
	$(BIN)/python -m bench.backup --messages 10000 --mode sync
	$(BIN)/python -m bench.protocols --messages 2000
	$(BIN)/python -m bench.migrate --messages 5000
	$(BIN)/python -m bench.fleet --mailboxes 50 --messages 500 --repeat 3
	$(BIN)/python -m bench.watch --deliveries 50
	@echo; echo "Targets (from the start of this run, also in .bench/targets.md and docs/benchmarks.md):"; echo
	@cat .bench/targets.md

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .hypothesis
