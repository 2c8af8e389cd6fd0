"""Calibration statistics (method page §2), streamed layer by layer from the ORIGINAL model.

As GPTQ and SVD-LLM do, only one decoder layer and its inputs are processed at a time: the inputs of
layer 0 are captured once, then each layer is run on them with forward pre-hooks that accumulate the
statistics in float64, and its outputs become the next layer's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


class NonFiniteStatisticsError(RuntimeError):
    """Calibration produced NaN/Inf statistics (overflowing activations or a broken model)."""


@dataclass
class LayerStatistics:
    """Float64 statistics of one decoder layer (``T`` tokens)."""

    attn_input_autocorr: torch.Tensor            # R_x (d_model, d_model)
    down_input_sq_mean: torch.Tensor             # m_d (intermediate,)
    head_output_autocorr: torch.Tensor | None    # G_z (num_heads, head_dim, head_dim), MHA OV only
    down_input_autocorr: torch.Tensor | None     # R_d (intermediate, intermediate), refit only
    num_tokens: int
    residual_sq_mean: float = float("nan")       # E||h||² of the residual stream entering the layer
    attn_input_mean: torch.Tensor | None = None  # E[x] (d_model,): with R_x, the statistics of [x, 1] (biases)

    def augmented_attn_input_autocorr(self) -> torch.Tensor:
        """Autocorrelation of the input augmented with a constant 1, ``E[[x,1]ᵀ[x,1]]`` (method §6, biases)."""
        mean = self.attn_input_mean
        top = torch.cat([self.attn_input_autocorr, mean[:, None]], dim=1)
        bottom = torch.cat([mean, mean.new_ones(1)])[None]
        return torch.cat([top, bottom], dim=0)

    def check_finite(self, layer_idx: int) -> None:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
                raise NonFiniteStatisticsError(f"layer {layer_idx}: non-finite values in {name}")

    def to(self, device) -> LayerStatistics:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return LayerStatistics(**moved)


class _Accumulator:
    """Forward pre-hooks summing outer products (float64) of the inputs of three projections."""

    def __init__(self, num_heads: int, head_dim: int, want_head_autocorr: bool, want_down_autocorr: bool):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.want_head_autocorr, self.want_down_autocorr = want_head_autocorr, want_down_autocorr
        self.r_x = self.s_x = self.g_z = self.m_d = self.r_d = None
        self.tokens = 0

    @staticmethod
    def _rows(inputs) -> torch.Tensor:
        x = inputs[0]
        return x.reshape(-1, x.shape[-1]).to(torch.float64)

    def attention_input(self, module, inputs):
        x = self._rows(inputs)
        self.tokens += x.shape[0]
        self.r_x = x.T @ x if self.r_x is None else self.r_x.addmm_(x.T, x)
        self.s_x = x.sum(dim=0) if self.s_x is None else self.s_x.add_(x.sum(dim=0))

    def attention_output(self, module, inputs):
        z = self._rows(inputs).view(-1, self.num_heads, self.head_dim)
        outer = torch.einsum("thi,thj->hij", z, z)
        self.g_z = outer if self.g_z is None else self.g_z.add_(outer)

    def down_input(self, module, inputs):
        x = self._rows(inputs)
        sq = x.pow(2).sum(dim=0)
        self.m_d = sq if self.m_d is None else self.m_d.add_(sq)
        if self.want_down_autocorr:
            self.r_d = x.T @ x if self.r_d is None else self.r_d.addmm_(x.T, x)

    def result(self) -> LayerStatistics:
        t = self.tokens
        return LayerStatistics(
            attn_input_autocorr=self.r_x / t,
            down_input_sq_mean=self.m_d / t,
            head_output_autocorr=self.g_z / t if self.want_head_autocorr else None,
            down_input_autocorr=self.r_d / t if self.want_down_autocorr else None,
            num_tokens=t,
            attn_input_mean=self.s_x / t,
        )


class _StopForward(Exception):
    pass


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor,
                               batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """Run the embeddings on every batch and capture what the first decoder layer receives."""
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def stream_layer_statistics(model: nn.Module, adapter, input_ids: torch.Tensor, batch_size: int = 1,
                            want_head_autocorr: bool = False, want_down_autocorr: bool = False,
                            device=None, progress: bool = True, propagate: dict | None = None,
                            layer_loader=None) -> Iterator[tuple[int, LayerStatistics]]:
    """Yield ``(layer_idx, LayerStatistics)`` for every decoder layer, in order.

    By default statistics come from the ORIGINAL model: layer ``l`` sees the original outputs of layers
    ``< l``. For sequential calibration, put the compressed layer into ``propagate[l]`` after receiving
    layer ``l``'s statistics: its outputs become layer ``l + 1``'s inputs.
    """
    geometry = adapter.geometry(model)
    layers = adapter.layers(model)
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()  # no dropout in the statistics
    try:
        yield from _stream(model, adapter, layers, geometry, input_ids, batch_size, want_head_autocorr,
                           want_down_autocorr, device, progress, propagate, layer_loader)
    finally:
        model.train(was_training)


def _stream(model, adapter, layers, geometry, input_ids, batch_size, want_head_autocorr, want_down_autocorr,
            device, progress, propagate, layer_loader):
    with torch.inference_mode():
        inputs = capture_first_layer_inputs(model, layers, input_ids, batch_size, device)
        bar = tqdm(total=len(layers), desc="A3 calibration", unit="layer", disable=not progress)
        for idx, layer in enumerate(layers):
            if layer_loader is not None:
                layer_loader.load(idx)
            acc = _Accumulator(geometry.num_heads, geometry.head_dim, want_head_autocorr, want_down_autocorr)
            hooks = [
                adapter.attention_input_module(layer).register_forward_pre_hook(acc.attention_input),
                adapter.mlp_down_module(layer).register_forward_pre_hook(acc.down_input),
            ]
            if want_head_autocorr:
                hooks.append(adapter.attention_output_module(layer).register_forward_pre_hook(acc.attention_output))
            residual_sq = 0.0
            try:
                outputs = []
                for hidden, kwargs in inputs:
                    residual_sq += hidden.to(torch.float64).pow(2).sum().item()
                    outputs.append((_layer_output(layer, hidden, kwargs), kwargs))
            finally:
                for h in hooks:
                    h.remove()
            stats = acc.result()
            stats.residual_sq_mean = residual_sq / stats.num_tokens
            stats.check_finite(idx)
            bar.update(1)
            yield idx, stats
            # Sequential calibration: the consumer may hand back the compressed layer, whose outputs
            # then feed the next layer instead of the original ones.
            replacement = propagate.pop(idx, None) if propagate is not None else None
            if replacement is not None:
                outputs = None  # free the original outputs first: at most two copies of the activations live
                outputs = [(_layer_output(replacement, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
            inputs = outputs
            if layer_loader is not None:
                layer_loader.release(idx)
        bar.close()


def _layer_output(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out

