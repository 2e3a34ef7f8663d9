PYTHON ?= python3
# A CPU build of torch; on a GPU machine install the CUDA build you want first and this step is skipped.
TORCH ?= torch==2.13.0

.PHONY: test install demo compare

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# The toy style-alignment world: RPO alignment of the committed tiny base, before/after scores, a grid (CPU, minutes).
demo: install
	$(PYTHON) -m demo.style_world --demo

# The equal-budget comparison and RPO's open choices behind the README's tables (about an hour on 2 CPU cores).
compare:
	$(PYTHON) -m demo.style_world --compare rpo,dpo,sft --seeds 2 --ablation
