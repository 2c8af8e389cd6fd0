"""Shared by the tests that reload a checkpoint in a fresh process where ``optimum_a3`` is blocked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RELOAD_SCRIPT = Path(__file__).resolve().parent / "reload_check.py"


def save_reference(model, input_ids: torch.Tensor, path) -> None:
    """Logits and a greedy generation of the in-memory model, for reload_check.py to compare against."""
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids[:1, :6], max_new_tokens=10, do_sample=False)
    torch.save({"input_ids": input_ids, "logits": logits, "generated": generated}, path)


def reload_in_fresh_process(checkpoint: str, reference, cwd, env: dict | None = None) -> dict:
    """Run reload_check.py on ``checkpoint`` (a directory or a repo id) and assert an identical reload."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(RELOAD_SCRIPT), str(checkpoint), str(reference)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["optimum_a3_importable"] is False
    assert result["class_module"].startswith("transformers_modules")
    assert result["logits_equal"], result
    assert result["generate_cached_equals_uncached"] and result["generated_equals_in_memory"], result
    return result
