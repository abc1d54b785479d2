# The two commands: `make run` (set up + quickstart) and `make test` (set up + test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: run test venv install install-dev bench lint clean

venv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "decjax needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)

install: venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .

install-dev: venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'

# The quickstart: CheckFree+ against checkpointing and no failures on one shared failure trace.
run: install
	$(PY) experiments/checkfree/run.py --grid=quick --out=$(RUN_DIR)

test: install-dev
	$(PY) -m pytest -n auto -q

bench: install
	$(PY) bench/train_step.py

lint: install-dev
	$(PY) -m ruff check decjax configs tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
