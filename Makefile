# The two commands of the README. Both set up everything they need first.
VENV ?= .venv
CONFIG ?= configs/quick.yaml

.PHONY: run test setup

setup:
	@scripts/bootstrap.sh

run: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedhlm simulate --config $(CONFIG)

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
