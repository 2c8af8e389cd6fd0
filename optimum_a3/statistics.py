"""Calibration statistics (method page §2), streamed layer by layer from the ORIGINAL model.

As GPTQ and SVD-LLM do, only one decoder layer and its inputs are processed at a time: the inputs of
layer 0 are captured once, then each layer is run on them with forward pre-hooks that accumulate the
statistics in float64, and its outputs become the next layer's inputs.

Sequential calibration (method page §6) takes the statistics from the model being compressed instead:
the attention statistics of layer ``l`` from the output of the compressed layers ``< l``, and its MLP
statistics from the output of layer ``l``'s compressed attention. By default it runs no more than one
layer forward per layer: the original attention only as far as its statistics need (GQA: not at all), the
compressed attention, the original gate/up projections, and the compressed down_proj on the kept channels
of their output (the compressed gate/up are those channels' rows). That output is held for one layer:
tokens x intermediate_size values in the model's dtype. With ``hold_mlp_intermediate=False`` nothing is
held and the whole compressed MLP runs instead (the same values; its gate/up run a second time, at the
kept width, for that memory).
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import A3Error
from .linalg import add_gram_upper_, mirror_gram_upper_


class NonFiniteStatisticsError(A3Error, RuntimeError):
    """Calibration produced NaN/Inf statistics (overflowing activations or a broken model)."""


@dataclass
class LayerStatistics:
    """Float64 statistics of one decoder layer (``T`` tokens)."""

    attn_input_autocorr: torch.Tensor            # R_x (d_model, d_model)
    down_input_sq_mean: torch.Tensor | None      # m_d (intermediate,); None while only attention is known
    head_output_autocorr: torch.Tensor | None    # G_z (num_heads, head_dim, head_dim), MHA OV only
    down_input_autocorr: torch.Tensor | None     # R_d (intermediate, intermediate), refit only
    num_tokens: int
    residual_sq_mean: float = float("nan")       # E||h||² of the residual stream entering the layer
    attn_input_mean: torch.Tensor | None = None  # E[x] (d_model,): with R_x, the statistics of [x, 1] (biases)

    @property
    def complete(self) -> bool:
        """False for the attention-only statistics that sequential calibration yields first."""
        return self.down_input_sq_mean is not None

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
        if self.r_x is None:
            self.r_x, self.s_x = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1])
        add_gram_upper_(self.r_x, x)
        self.s_x.add_(x.sum(dim=0))

    def attention_output(self, module, inputs):
        z = self._rows(inputs).view(-1, self.num_heads, self.head_dim)
        outer = torch.einsum("thi,thj->hij", z, z)
        self.g_z = outer if self.g_z is None else self.g_z.add_(outer)

    def down_input(self, module, inputs):
        x = self._rows(inputs)
        if self.m_d is None:
            self.m_d = x.new_zeros(x.shape[1])
            if self.want_down_autocorr:
                self.r_d = x.new_zeros(x.shape[1], x.shape[1])
        self.m_d.add_(x.pow(2).sum(dim=0))
        if self.want_down_autocorr:
            add_gram_upper_(self.r_d, x)

    def attention_result(self) -> LayerStatistics:
        """The attention statistics (``complete`` False)."""
        t = self.tokens
        return LayerStatistics(
            attn_input_autocorr=mirror_gram_upper_(self.r_x) / t,
            down_input_sq_mean=None,
            head_output_autocorr=self.g_z / t if self.want_head_autocorr else None,
            down_input_autocorr=None,
            num_tokens=t,
            attn_input_mean=self.s_x / t,
        )

    def with_mlp_result(self, stats: LayerStatistics) -> LayerStatistics:
        """``stats`` completed with the MLP statistics."""
        t = self.tokens
        return dataclasses.replace(
            stats, down_input_sq_mean=self.m_d / t,
            down_input_autocorr=mirror_gram_upper_(self.r_d) / t if self.want_down_autocorr else None)

    def result(self) -> LayerStatistics:
        return self.with_mlp_result(self.attention_result())


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
                            layer_loader=None, hold_mlp_intermediate: bool = True
                            ) -> Iterator[tuple[int, LayerStatistics]]:
    """Yield ``(layer_idx, LayerStatistics)`` for every decoder layer, in order.

    By default statistics come from the ORIGINAL model: layer ``l`` sees the original outputs of layers
    ``< l``, and each layer is yielded once.

    Sequential calibration (``propagate`` a dict) yields each layer twice. First its attention
    statistics (``stats.complete`` False), taken on the outputs of the compressed layers ``< l``; the
    consumer then puts into ``propagate[l]`` the compressed layer with its attention solved (its MLP may
    be unset). Then the complete statistics, whose MLP part is taken on that compressed attention's
    output; the consumer puts ``(finished compressed layer, its kept MLP channels)`` into
    ``propagate[l]``, and that layer's outputs feed layer ``l + 1``. ``hold_mlp_intermediate`` (module
    docstring) trades that MLP's time for memory.
    """
    geometry = adapter.geometry(model)
    layers = adapter.layers(model)
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()  # no dropout in the statistics
    if propagate is None:
        stream = _stream_original
    else:
        stream = functools.partial(_stream_sequential, hold_mlp_intermediate=hold_mlp_intermediate)
    try:
        with torch.inference_mode():
            inputs = capture_first_layer_inputs(model, layers, input_ids, batch_size, device)
            # Closed on errors too, so that a one-line error is not printed onto the bar's line.
            with tqdm(total=len(layers), desc="A3 calibration", unit="layer", disable=not progress) as bar:
                for idx, layer in enumerate(layers):
                    if layer_loader is not None:
                        layer_loader.load(idx)
                    acc = _Accumulator(geometry.num_heads, geometry.head_dim, want_head_autocorr, want_down_autocorr)
                    residual_sq = sum(hidden.to(torch.float64).pow(2).sum().item() for hidden, _ in inputs)

                    def ready(stats: LayerStatistics, idx=idx, residual_sq=residual_sq) -> tuple[int, LayerStatistics]:
                        stats.residual_sq_mean = residual_sq / stats.num_tokens
                        stats.check_finite(idx)
                        bar.update(int(stats.complete))
                        return idx, stats

                    inputs = yield from stream(adapter, idx, layer, inputs, acc, want_head_autocorr, propagate, ready)
                    if layer_loader is not None:
                        layer_loader.release(idx)
    finally:
        model.train(was_training)


def _stream_original(adapter, idx, layer, inputs, acc, want_head_autocorr, propagate, ready):
    """One forward of the original layer with every statistic's hook; returns its outputs."""
    hooks = [
        adapter.attention_input_module(layer).register_forward_pre_hook(acc.attention_input),
        adapter.mlp_down_module(layer).register_forward_pre_hook(acc.down_input),
    ]
    if want_head_autocorr:
        hooks.append(adapter.attention_output_module(layer).register_forward_pre_hook(acc.attention_output))
    try:
        outputs = [(_layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
    finally:
        for h in hooks:
            h.remove()
    yield ready(acc.result())
    return outputs


def _stream_sequential(adapter, idx, layer, inputs, acc, want_head_autocorr, propagate, ready,
                       hold_mlp_intermediate=True):
    """Attention statistics, compressed attention, MLP statistics, compressed MLP (module docstring);
    returns the compressed layer's outputs."""
    # 1. Attention statistics from the original layer, run only as far as they need: R_x is the input of
    #    q_proj; G_z (MHA) the input of o_proj.
    last = adapter.attention_output_module(layer) if want_head_autocorr else adapter.attention_input_module(layer)
    hooks = [adapter.attention_input_module(layer).register_forward_pre_hook(acc.attention_input)]
    if want_head_autocorr:
        hooks.append(adapter.attention_output_module(layer).register_forward_pre_hook(acc.attention_output))
    hooks.append(last.register_forward_pre_hook(_stop))
    try:
        for hidden, kwargs in inputs:
            _run_until_stopped(layer, hidden, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    stats = acc.attention_result()
    yield ready(stats)
    compressed = propagate.pop(idx)

    # 2. The residual stream after the compressed attention: what the MLP's norm receives.
    mids = [(_input_of(adapter.post_attention_norm_module(compressed), compressed, hidden, kwargs), kwargs)
            for hidden, kwargs in inputs]

    # 3. MLP statistics of the ORIGINAL gate/up on that stream (down_proj itself is not needed). Their
    #    output, down_proj's input, is held if asked: the compressed gate/up are its kept channels (step 4).
    intermediates = []
    down = adapter.mlp_down_module(layer)
    hooks = [down.register_forward_pre_hook(acc.down_input)]
    if hold_mlp_intermediate:
        hooks.append(down.register_forward_pre_hook(lambda _, args: intermediates.append(args[0])))
    hooks.append(down.register_forward_pre_hook(_stop))
    try:
        for mid, _ in mids:
            _run_until_stopped(adapter.mlp_module(layer), adapter.post_attention_norm_module(layer)(mid))
    finally:
        for h in hooks:
            h.remove()
    yield ready(acc.with_mlp_result(stats))
    compressed, kept_channels = propagate.pop(idx)

    # 4. The compressed MLP completes the compressed layer's output. Its gate/up are the original rows
    #    of the kept channels, so their output is already in hand if it was held: only down_proj runs.
    #    Each batch is replaced in place, so its stream (and held intermediate) is freed as its output is
    #    made: the layer never holds the stream after attention and the outputs in full at once.
    if hold_mlp_intermediate:
        kept_channels = kept_channels.to(intermediates[0].device)  # the solver may run on another device
    for k, (mid, kwargs) in enumerate(mids):
        if hold_mlp_intermediate:
            out = adapter.mlp_residual_from_intermediate(compressed, mid, intermediates[k][..., kept_channels])
            intermediates[k] = None
        else:
            out = adapter.mlp_residual(compressed, mid)
        mids[k] = (out, kwargs)
    return mids


class _StopForward(Exception):
    pass


def _stop(module, inputs):
    raise _StopForward


def _run_until_stopped(module: nn.Module, *args, **kwargs) -> None:
    try:
        module(*args, **kwargs)
    except _StopForward:
        pass


def _input_of(target: nn.Module, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input ``target`` (a submodule of ``layer``) receives when ``layer(hidden, **kwargs)`` runs;
    the rest of the layer's forward is skipped."""
    seen = []

    def grab(_, inputs):
        seen.append(inputs[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(grab)
    try:
        _run_until_stopped(layer, hidden, **kwargs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(target).__name__} was not called by {type(layer).__name__}")
    return seen[0]


def _layer_output(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
