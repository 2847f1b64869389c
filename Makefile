# Two commands: `make lab` opens the course, `make test` runs every test.
# Both create .venv on first use and install requirements.txt plus moe_utils (editable).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8888
TOKEN  ?= moe-course
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install lab test lint unit kernels notebooks-test execute bench clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

lab: install
	@echo "JupyterLab on http://127.0.0.1:$(PORT)/lab/tree/notebooks?token=$(TOKEN)  (port $(PORT), token $(TOKEN))"
	@echo "It opens notebooks/; the exercises are one folder up, in exercises/."
	$(PY) -m jupyter lab --no-browser --ip=127.0.0.1 --port=$(PORT) --ServerApp.token=$(TOKEN) \
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
