"""Guards shared by every test file."""

import pytest
import torch


@pytest.fixture(autouse=True)
def default_dtype_is_float32():
    """Fail loudly if a test (or an import at collection time) leaves a non-default torch dtype behind."""
    assert torch.get_default_dtype() == torch.float32, "an earlier test or import changed torch's default dtype"
    yield
    assert torch.get_default_dtype() == torch.float32, "this test left torch's default dtype changed"
