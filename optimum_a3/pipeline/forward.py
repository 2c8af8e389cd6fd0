"""Running parts of a decoder layer: capture its inputs, stop a forward early, grab a submodule's input.

Calibration needs activations at a few points inside each layer, not the layer's output alone. Forward
pre-hooks see them; :class:`StopForward` raised from a hook ends the forward there, so that only as
much of a layer runs as the statistics need.
"""

from __future__ import annotations

import torch
from torch import nn

# One batch of a layer's inputs: the hidden states and the keyword arguments the decoder passes the layer
# (position embeddings, attention mask, ...).
LayerInput = tuple[torch.Tensor, dict]


class StopForward(Exception):
    """Raised by a hook to end a forward early (caught by :func:`run_until_stopped`)."""


def stop(module, inputs):
    """A forward pre-hook that ends the forward at ``module``."""
    raise StopForward


def run_until_stopped(module: nn.Module, *args, **kwargs) -> None:
    try:
        module(*args, **kwargs)
    except StopForward:
        pass


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                               batch_size: int, device) -> list[LayerInput]:
    """Run the embeddings on every batch and capture what the first decoder layer receives."""
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            run_until_stopped(model, input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def input_of(target: nn.Module, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input ``target`` (a submodule of ``layer``) receives when ``layer(hidden, **kwargs)`` runs;
    the rest of the layer's forward is skipped."""
    seen = []

    def grab(_, inputs):
        seen.append(inputs[0])
        raise StopForward

    handle = target.register_forward_pre_hook(grab)
    try:
        run_until_stopped(layer, hidden, **kwargs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(target).__name__} was not called by {type(layer).__name__}")
    return seen[0]


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
