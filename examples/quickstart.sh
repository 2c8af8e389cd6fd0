#!/usr/bin/env bash
# Set up, then compress the embedded default model (offline SmolLM2-135M-Instruct, calibrated on
# offline Wikipedia text) by 20% and print WikiText-2 perplexity before and after. ~6 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
optimum-a3 compress smollm2-offline --ratio 0.2 --nsamples 32 --seqlen 2048 \
  --output outputs/smollm2-a3-20 --overwrite --eval wikitext2 --eval-windows 16 "$@"
