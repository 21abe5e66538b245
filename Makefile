# The two commands of the README. Both set up everything they need first.
VENV ?= .venv
CONFIG ?= configs/quick.yaml

.PHONY: run test setup setup-llm-server

setup:
	@scripts/bootstrap.sh

# best effort: the remote-LLM tests run against a real llama.cpp server when this built one, else skip
setup-llm-server: setup
	@timeout 2400 scripts/setup_llm_server.sh || echo "[setup] no LLM server (build failed or timed out): its tests will skip"

run: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedhlm simulate --config $(CONFIG)

test: setup setup-llm-server
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
