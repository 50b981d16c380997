# Two entry points for a fresh machine (the README's first lines); each sets itself up.
#   make demo   passkey retrieval on the default model (SmolLM2-135M-Instruct), SnapKV vs full cache
#   make test   the test suite (CPU; Pallas kernels in interpret mode)
# Inside an active virtual environment they install into it; otherwise into ./.venv.

PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snapkv-installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m snapkv_jax.demo

# One worker per core (at most 4), a whole file per worker (its session fixtures then run once); the
# timing-sensitive `serial` tests (the notebook's two-minute limit) alone afterwards.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile -m "not serial" tests
	JAX_PLATFORMS=cpu $(PY) -m pytest -m serial tests

clean:
	rm -rf .venv .pytest_cache .hypothesis build *.egg-info
