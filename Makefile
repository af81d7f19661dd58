# kazoo_green: `make demo` runs the broker-free demo, `make test` the full suite.
# The virtualenv is made from Debian's /usr/bin/python3: that is the Python
# Kamailio's app_python3 embeds, so Kamailio imports exactly what tests use.
BASE_PYTHON ?= /usr/bin/python3
VENV ?= .venv
VENV_LOWEST ?= .venv-lowest
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test unit integration e2e bench compare clean venv-lowest test-lowest \
	test-harness

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	bash tests/tools/venv.sh $(BASE_PYTHON) $(VENV)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/kazoo-green demo

# Everything: installs and starts what the tests need, then runs all of them at the
# newest versions requirements*.txt allow, then the library-facing ones (unit,
# integration) at the lowest (requirements-lowest.txt), except the CLI's (subprocesses
# of the same calls), the zones' and C semantics' (the same library calls on more brokers
# or payloads) and the pure ones (examples, encode table, topology: our own code only):
# the whole stays under CI's 12 minutes. The TLS node the first run boots is kept for the second
# (KGC_KEEP_NODES=1), then every node is stopped.
test: venv venv-lowest
	bash tests/tools/services.sh
	KGC_KEEP_NODES=1 $(PY) -m pytest tests -m 'not harness' $(PYTEST_ARGS)
	$(VENV_LOWEST)/bin/python tests/tools/check_pins.py requirements-lowest.txt
	KGC_KEEP_NODES=1 $(VENV_LOWEST)/bin/python -m pytest tests/unit tests/integration \
		--ignore=tests/integration/test_cli.py --ignore=tests/integration/test_zones.py \
		--ignore=tests/integration/test_c_semantics.py --ignore=tests/unit/test_examples.py \
		--ignore=tests/unit/test_encode_table.py --ignore=tests/unit/test_topology.py \
		$(PYTEST_ARGS)
	$(PY) -m tests.nodes down

# The harness' own node-restarting self-tests (tests/failover/test_cluster_fixture.py,
# marked `harness`): run them when tests/cluster.py changes.
test-harness: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests/failover/test_cluster_fixture.py $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# The same tests at the LOWEST versions requirements*.txt allow (pinned in
# requirements-lowest.txt), in a venv of their own: the broker-backed tests that
# exercise gevent, kombu and py-amqp (not e2e/failover: Kamailio, a cluster).

$(VENV_LOWEST)/.installed: requirements.txt requirements-test.txt requirements-lowest.txt setup.py
	bash tests/tools/venv.sh $(BASE_PYTHON) $(VENV_LOWEST) requirements-lowest.txt
	$(VENV_LOWEST)/bin/python tests/tools/check_pins.py requirements-lowest.txt
	touch $@

venv-lowest: $(VENV_LOWEST)/.installed

test-lowest: venv-lowest
	$(VENV_LOWEST)/bin/python tests/tools/check_pins.py requirements-lowest.txt
	bash tests/tools/services.sh
	$(VENV_LOWEST)/bin/python -m pytest tests/unit tests/integration $(PYTEST_ARGS)

bench: venv
	bash tests/tools/services.sh
	$(PY) bench/core_bench.py

# kazoo_green against the C kazoo/rabbitmq modules in Kamailio (COMPARE_ARGS=--quick).
COMPARE_ARGS ?=
compare: venv
	bash tests/tools/services.sh --bench
	$(VENV)/bin/pip install -q -r bench/requirements.txt
	$(PY) bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) $(VENV_LOWEST) build dist *.egg-info .pytest_cache
