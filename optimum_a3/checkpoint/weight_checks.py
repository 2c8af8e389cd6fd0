"""Refuse NaN/Inf weights by name: when they are read for compression and before they are written.

A damaged weight otherwise surfaces late and misnamed (a failed eigendecomposition, non-finite statistics)
or not at all: an embedding row that calibration never touches is copied into the output as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import A3Error


class NonFiniteWeightsError(A3Error, ValueError):
    """A weight holds NaN or Inf values."""


def _is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: the minimum and maximum are (both propagate NaN). Unlike
    ``isfinite(t).all()`` this allocates no tensor-sized mask, and it is ~30x faster on CPU."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _describe_non_finite(name: str, tensor: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    kinds = " and ".join(kind for kind, count in (("NaN", nan), ("Inf", inf)) if count)
    return f"{name} has {kinds} values ({nan + inf:,} of {tensor.numel():,})"


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], consequence: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor with NaN or Inf values; meta tensors
    (not read yet) and integer tensors are skipped. ``consequence`` ends the message."""
    for name, tensor in named_tensors:
        if not _is_finite(tensor.detach()):
            raise NonFiniteWeightsError(f"{_describe_non_finite(name, tensor.detach())}: {consequence}")


READ_CONSEQUENCE = "the checkpoint is damaged, and A3 needs finite weights"
WRITE_CONSEQUENCE = "refusing to write non-finite weights (nothing was saved)"


def check_weights_read(module: torch.nn.Module, prefix: str = "") -> None:
    """Check the parameters of ``module`` (named with ``prefix``, e.g. ``"model.layers.1."``) before
    A3 computes anything from them."""
    check_finite(((prefix + name, p) for name, p in module.named_parameters()), READ_CONSEQUENCE)


def check_tensors_written(tensors: dict[str, torch.Tensor]) -> None:
    """Check tensors about to be written to a checkpoint."""
    check_finite(tensors.items(), WRITE_CONSEQUENCE)
