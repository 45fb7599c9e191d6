# The two commands a newcomer runs:
#   make demo   set everything up, then run the demo (local chain, node, two scripted clients)
#   make test   set everything up, then run the whole test suite (two pytest-xdist workers)
#   make bench  the benchmarks whose figures are in README.md (several minutes)
#   make cluster-demo  three relay nodes as one network over a 3-server NATS cluster
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup bench clean cluster-demo

demo: setup
	$(PY) main.py demo

cluster-demo: setup
	$(PY) -m dm.cli.cluster_demo

test: setup
	$(PY) -m pytest -q -n 2

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

node_modules/.installed: package-lock.json
	npm ci --no-audit --no-fund
	touch $@

bench: setup
	$(PY) bench/gas.py
	$(PY) bench/paid_rate.py
	$(PY) bench/relay.py
	$(PY) bench/channel.py
	$(PY) bench/crypto.py

clean:
	rm -rf $(VENV) node_modules
