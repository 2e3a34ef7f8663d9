PYTHON ?= python

.PHONY: test install

install:
	$(PYTHON) -m pip install -r requirements.txt -r requirements-dev.txt

test:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
