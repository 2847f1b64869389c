# Two commands: `make lab` opens the course, `make test` runs every test.
# Both create .venv on first use and install requirements.txt plus moe_utils (editable).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8888
# empty: Jupyter makes a random token and prints it; TOKEN=... fixes one (only on a machine you alone use)
TOKEN  ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
TOKEN_FLAG := $(if $(TOKEN),--IdentityProvider.token=$(TOKEN),)
# JupyterLab settings for this environment only (no news pop-up); see lab/overrides.json
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings

.PHONY: install lab test lint unit kernels notebooks-test execute bench clean

$(STAMP): requirements.txt pyproject.toml lab/overrides.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	@mkdir -p $(LAB_SETTINGS) && cp lab/overrides.json $(LAB_SETTINGS)/overrides.json
	@touch $(STAMP)

install: $(STAMP)

lab: install
	@echo "Starting JupyterLab on port $(PORT): open the http://127.0.0.1:$(PORT)/lab?token=... address it prints."
	@echo "It opens notebooks/; the exercises are one folder up, in exercises/."
	$(PY) -m jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) $(TOKEN_FLAG) \
		--ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks $(ROOT_FLAG)

lint: install
	$(PY) -m ruff check moe_utils tests notebooks exercises

# unit, equivalence, kernel (Triton interpreter on CPU) and grader tests
unit: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

# strict nbval: every stored output of every lecture notebook must match a fresh run
notebooks-test: install
	$(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg -q -p no:cacheprovider --durations=0

test: lint unit notebooks-test

# re-run every lecture notebook in place (after editing one), printing run times
execute: install
	$(PY) -m moe_utils.notebooks notebooks/*.ipynb

bench: install
	$(PY) -m moe_utils.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
