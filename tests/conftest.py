"""Guards shared by every test file."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

# Remote-code modules and any Hub cache the tests write go to a directory of this run, not the user's home
# (set before a test module imports transformers, and inherited by the subprocesses the tests start).
_HF_HOME = tempfile.mkdtemp(prefix="optimum-a3-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
# "Nothing is downloaded at run time" (README): any attempt to reach the Hub fails loudly instead of quietly
# fetching (or hanging offline). huggingface_hub and transformers read these when imported, so they are set
# here, before any test module imports them; subprocesses inherit them. The fake-Hub tests re-enable the
# client explicitly (hub_server.patch_client / client_env), for 127.0.0.1 only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
assert "huggingface_hub" not in sys.modules and "transformers" not in sys.modules, \
    "conftest must run before huggingface_hub/transformers are imported, or HF_HUB_OFFLINE is not read"


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order: no test may depend on one that ran before it")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Fail loudly if a test (or an import at collection time) leaves a non-default torch dtype behind."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or import changed torch's default dtype"
    yield
    assert torch.get_default_dtype() == torch.float32, "this test left torch's default dtype changed"
