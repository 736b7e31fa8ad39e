# The two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes. torch goes first, pinned: the local
# CPU build; an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest -q --durations=40

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
