"""Sinks: where the finished compressed layers go.

:class:`ModelSink` keeps them in the compressed model (``A3Compressor.compress``); :class:`ShardSink`
writes each to size-capped safetensors shards as soon as it is finished and frees it
(``A3Compressor.compress_checkpoint``), so that only one compressed layer is in memory at a time.
"""

from __future__ import annotations

from torch import nn

from ..checkpoint.shards import ShardWriter
from ..checkpoint.weights import CheckpointWeights
from .surgery import copy_outside_layers, outside_layer_names


class ModelSink:
    """The compressed model is built whole in memory."""

    materialize = True  # the compressed skeleton is allocated up front
    on_every_rank = True  # distributed: every rank returns the model, so every rank keeps every layer

    def add(self, prefix: str, layer: nn.Module) -> None:
        pass

    def finish(self, model: nn.Module, compressed: nn.Module) -> None:
        copy_outside_layers(model, compressed)

    def discard(self) -> None:
        pass


class ShardSink:
    """Each finished layer goes to ``shards`` and back to the meta device; the tensors outside the decoder
    layers are read from the original checkpoint (``weights``) at the end."""

    materialize = False  # layers are allocated one at a time, as they are filled
    on_every_rank = False  # distributed: rank 0 alone writes the checkpoint

    def __init__(self, shards: ShardWriter, weights: CheckpointWeights):
        self.shards, self.weights = shards, weights

    def add(self, prefix: str, layer: nn.Module) -> None:
        """``prefix``: the layer's name in the compressed model's state dict, e.g. ``"model.layers.3."``."""
        self.shards.add({prefix + k: v for k, v in layer.state_dict().items()})
        layer.to("meta")

    def finish(self, model: nn.Module, compressed: nn.Module) -> None:
        self.shards.add(self.weights.load(outside_layer_names(compressed), model.dtype))

    def discard(self) -> None:
        self.shards.discard()


class DiscardSink:
    """A rank other than 0 in a distributed streamed run: it computes every layer it solves (every layer
    under sequential calibration: its outputs feed the rank's share of the statistics) and frees it; rank 0
    writes the checkpoint."""

    materialize = False
    on_every_rank = False

    def add(self, prefix: str, layer: nn.Module) -> None:
        layer.to("meta")

    def finish(self, model: nn.Module, compressed: nn.Module) -> None:
        pass

    def discard(self) -> None:
        pass
