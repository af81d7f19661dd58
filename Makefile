# kazoo_green: `make demo` runs the broker-free demo, `make test` the full suite.
# The virtualenv is made from Debian's /usr/bin/python3: that is the Python
# Kamailio's app_python3 embeds, so Kamailio imports exactly what tests use.
BASE_PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test unit integration e2e bench compare clean

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	bash tests/tools/venv.sh $(BASE_PYTHON) $(VENV)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/kazoo-green demo

# Everything: installs and starts what the tests need, then runs all of them.
test: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	bash tests/tools/services.sh
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

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
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
