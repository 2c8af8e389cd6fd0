"""Guards shared by every test file."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Remote-code modules and any Hub cache the tests write go to a directory of this run, not the user's home
# (set before a test module imports transformers, and inherited by the subprocesses the tests start).
_HF_HOME = tempfile.mkdtemp(prefix="optimum-a3-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Fail loudly if a test (or an import at collection time) leaves a non-default torch dtype behind."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or import changed torch's default dtype"
    yield
    assert torch.get_default_dtype() == torch.float32, "this test left torch's default dtype changed"
