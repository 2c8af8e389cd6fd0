"""Runs the vLLM serving tests (tests/vllm_serving) in the vLLM environment `.venv-vllm` (examples/setup_vllm.sh).

vLLM pins its own torch and transformers, so those tests cannot run in this environment; this test runs
them in a subprocess with `.venv-vllm/bin/python -m pytest -q tests/vllm_serving`. Without `.venv-vllm` it fails
under CI (the CI script must build it) and is skipped with the reason otherwise.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# examples/setup_vllm.sh builds it at VLLM_VENV (default: .venv-vllm in the repo root).
VENV_PYTHON = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm") / "bin" / "python"
TIMEOUT_S = 900  # the suite takes ~5 min on 2 CPU cores


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (Linux /proc), whatever its process group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_vllm_serving_suite():
    if not VENV_PYTHON.exists():
        message = f"{VENV_PYTHON} is missing: build it with `bash examples/setup_vllm.sh`"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM tests, but {message}")
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # A new session: every process the suite starts (vLLM's engine core and workers, `vllm serve` in a process
    # group of its own) stays in it, and all of them are killed when the run ends or times out.
    proc = subprocess.Popen([str(VENV_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vllm_serving"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        output, _ = proc.communicate()
        pytest.fail(f"the vLLM tests took over {TIMEOUT_S} s:\n{output[-5000:]}")
    finally:
        kill_session(proc.pid)  # nothing the suite started may outlive it
    sys.stdout.write(output[-3000:])
    assert proc.returncode == 0, f"the vLLM tests failed (exit {proc.returncode}):\n{output[-8000:]}"
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, summary


def test_plugin_import_without_vllm_says_what_to_install():
    """The entry point is loaded by vLLM only, but a direct import without vLLM must say what is missing."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is not None:
        pytest.skip("vLLM is installed in this environment")
    with pytest.raises(ImportError, match=r"needs vLLM: pip install 'optimum-a3\[vllm\]'") as info:
        import optimum_a3.integrations.vllm  # noqa: F401
    assert "\n" not in str(info.value)


def test_entry_point_is_declared():
    """pyproject declares the plugin vLLM loads: `vllm.general_plugins` -> optimum_a3.integrations.vllm:register."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"a3_llama": "optimum_a3.integrations.vllm:register"}
    assert any(req.startswith("vllm") for req in project["optional-dependencies"]["vllm"])
