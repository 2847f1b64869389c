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

.PHONY: install lab test lint unit kernels notebooks-test notebooks-test-portable execute bench clean

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

# strict nbval: every stored output of every lecture notebook must match a fresh run. A fresh
# model cache per run, so notebook 07 really trains (08-09 then load its models from it).
NBVAL := $(PY) -m pytest --nbval notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg -q -p no:cacheprovider --durations=0
notebooks-test: install
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && MOE_CACHE="$$d" $(NBVAL)

# the same on another CPU code path: PyTorch's portable kernels (no AVX2/AVX-512), MKL limited
# to SSE4.2 and oneDNN to SSE4.1. Training numbers round differently there, so this proves
# that no compared output and no asserted claim depends on this machine's rounding.
PORTABLE_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
notebooks-test-portable: install
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && MOE_CACHE="$$d" $(PORTABLE_CPU) $(NBVAL)

test: lint unit notebooks-test notebooks-test-portable

# re-run every lecture notebook in place (after editing one), printing run times
execute: install
	$(PY) -m moe_utils.notebooks notebooks/*.ipynb

bench: install
	$(PY) -m moe_utils.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
