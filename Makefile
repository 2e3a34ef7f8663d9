PYTHON ?= python3
# A CPU build of torch; on a GPU machine install the CUDA build you want into the environment make uses (below) first
# and this step is skipped.
TORCH ?= torch==2.13.0
VENV ?= .venv

# The environment make installs into and runs: $(PYTHON)'s own when it runs inside a virtual environment (an activated
# .venv, as .ci/run does) or a conda environment; otherwise (a system Python, which PEP 668 may forbid pip to change)
# $(VENV), created with $(PYTHON) when missing.
IN_ENVIRONMENT := $(shell $(PYTHON) -c "import os, sys; print(sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, 'conda-meta')))" 2>/dev/null)
ifeq ($(IN_ENVIRONMENT),True)
ENV_PYTHON := $(PYTHON)
else
ENV_PYTHON := $(VENV)/bin/python
VENV_CREATED := $(ENV_PYTHON)
endif

.PHONY: test lint install demo compare online fix-copies

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

install: $(VENV_CREATED)
	$(ENV_PYTHON) -c "import torch" 2>/dev/null || $(ENV_PYTHON) -m pip install -q $(TORCH)
	$(ENV_PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt

test: install lint
	$(ENV_PYTHON) -m pytest -q -p no:cacheprovider tests

# ruff lint and format check with the settings in pyproject.toml (`ruff format .` applies the formatting).
lint: install
	$(ENV_PYTHON) -m ruff check .
	$(ENV_PYTHON) -m ruff format --check .

# Copy train_diffusion_rpo.py's shared block (after END SCRIPT-SPECIFIC) into the other training scripts.
fix-copies:
	$(PYTHON) tools/fix_copies.py

# The toy style-alignment world: RPO alignment of the committed tiny base, before/after scores, a grid (CPU, minutes).
demo: install
	$(ENV_PYTHON) -m demo.style_world --demo

# The evidence behind demo/README.md: the equal-budget sweep on the five tuning styles and the relative-preference
# world run as independent jobs, two at a time with one thread each (every number in demo/results/ comes from this
# target); then the reports, and each method's chosen configuration on the held-out style.
COMPARE_JOBS = "demo.style_world --compare --seeds 2 --styles stripes" "demo.style_world --compare --seeds 2 --styles frame" \
	"demo.style_world --compare --seeds 2 --styles checks" "demo.style_world --compare --seeds 2 --styles diagonal" \
	"demo.style_world --compare --seeds 2 --styles bands" "demo.relative --seeds 2"
compare: install
	printf '%s\n' $(COMPARE_JOBS) | OMP_NUM_THREADS=1 xargs -P 2 -I{} sh -c '$(ENV_PYTHON) -m {} --results outputs/partial_results'
	$(ENV_PYTHON) -m demo.relative --seeds 2 --report_only
	$(ENV_PYTHON) -m demo.style_world --compare --seeds 2 --report_only
	OMP_NUM_THREADS=1 $(ENV_PYTHON) -m demo.style_world --held_out --seeds 3

# The online evidence behind demo/README.md ("Online rounds"): online_rpo.py rounds against offline training at equal
# labelled pairs and steps, RPO, DPO and SFT at two learning rates, K=4 rounds, beta 500 and the previous-round
# reference, 3 seeds; two jobs at a time with one thread each, then the report (demo/results/online.md).
ONLINE_JOBS = "--only 0 2 4 6 8 10 12 14 16" "--only 1 3 5 7 9 11 13 15"
online: install
	printf '%s\n' $(ONLINE_JOBS) | OMP_NUM_THREADS=1 xargs -P 2 -I{} sh -c '$(ENV_PYTHON) -m demo.online --seeds 3 {} --results outputs/partial_results'
	$(ENV_PYTHON) -m demo.online --seeds 3 --only
