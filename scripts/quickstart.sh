#!/usr/bin/env bash
# The main job on a fresh machine: set up, quantize SmolLM2-135M with LoaQ, print the perplexity table,
# export the compressed-tensors checkpoint and check it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/smollm2-loaq-w4g64}
loaq quantize --method loaq --bits 4 --group-size 64 --nsamples 32 --seqlen 512 \
    --out "$OUT" --export "$OUT-ct" --force --eval "$@"
loaq-export --check "$OUT-ct"
