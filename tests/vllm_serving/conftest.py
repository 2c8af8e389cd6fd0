"""The vLLM tests run in the vLLM environment (`.venv-vllm/bin/python -m pytest -q tests/vllm_serving`, see
examples/setup_vllm.sh); the main suite runs them through tests/test_vllm.py. Without vLLM (the main
environment) nothing here is collected."""

import importlib.util
import os
import sys

if importlib.util.find_spec("vllm") is None:  # not installed
    collect_ignore_glob = ["test_*.py"]

# tests/tiny_models.py (the main suite's tiny random models).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
