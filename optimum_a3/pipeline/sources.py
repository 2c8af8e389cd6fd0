"""Statistics sources: where each decoder layer's statistics come from.

The layer loop (:mod:`optimum_a3.pipeline.loop`) asks a source three things per layer, in order:

* ``attention(idx, layer)``: statistics holding at least the attention part (method page §2);
* ``mlp(idx, layer, compressed)``: the complete statistics; ``compressed`` is the compressed layer with
  its attention already solved (sequential calibration takes the MLP statistics on its output);
* ``advance(idx, layer, compressed, kept_channels)``: prepare the next layer's inputs, once the
  compressed layer is finished.

Sources: :class:`OriginalForward` (the original model, method page §2, the paper), :class:`SequentialForward`
(the model being compressed, method page §6), :class:`StoredStatistics` (handed in by the caller),
:class:`CachedStatistics` (read from the disk cache, each layer's weights checked against the entry), and
:class:`RecordedToCache`, which writes what another source computes into a cache entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint.stats_cache import LayerDigestChain, StatisticsCache
from ..models.adapters import Geometry
from .distributed import LayerOwners, Ranks
from .forward import LayerInput, capture_first_layer_inputs, input_of, layer_output, run_until_stopped, stop
from .statistics import LayerStatistics, OutputFit, OutputFitCollector, StatisticsCollector


class StatisticsSource:
    """The interface; by default a layer's statistics are complete from ``attention`` on."""

    # True when ``mlp`` runs the compressed attention: the loop must put it into ``compressed`` first.
    runs_compressed_attention = False

    def attention(self, idx: int, layer: nn.Module) -> LayerStatistics:
        raise NotImplementedError

    def mlp(self, idx: int, layer: nn.Module, compressed: nn.Module) -> LayerStatistics:
        return self._last

    def advance(self, idx: int, layer: nn.Module, compressed: nn.Module, kept_channels: torch.Tensor) -> None:
        pass

    def close(self, completed: bool) -> None:
        """Called once after the last layer (``completed``) or on a failure."""


class StoredStatistics(StatisticsSource):
    """Statistics computed earlier on the same model and calibration data (e.g. ``last_statistics``)."""

    def __init__(self, statistics: list[LayerStatistics]):
        self.statistics = statistics

    def attention(self, idx, layer):
        self._last = self.statistics[idx]
        return self._last


class CachedStatistics(StatisticsSource):
    """A statistics cache entry; each layer's weights are checked against the entry as the layer is read
    (a mismatch raises :class:`~optimum_a3.checkpoint.stats_cache.StaleCacheEntry`)."""

    def __init__(self, cache: StatisticsCache, owners: LayerOwners | None = None):
        """``owners``: layer-parallel solving, a rank reads only the statistics of the layers it solves
        (``None`` for the others); every rank checks every layer's weights."""
        self.cache, self.weights, self.owners = cache, LayerDigestChain(), owners or LayerOwners(Ranks())

    def attention(self, idx, layer):
        self._last = self.cache.load(idx) if self.owners.solves(idx) else None
        self.cache.check_weights(idx, self.weights.add(layer))
        return self._last


class RecordedToCache(StatisticsSource):
    """Another source whose complete statistics are written into a new cache entry, committed when every
    layer is done and dropped on a failure."""

    def __init__(self, source: StatisticsSource, cache: StatisticsCache, num_layers: int, calibration: dict):
        self.source, self.entry, self.weights = source, cache.writer(num_layers, calibration), LayerDigestChain()
        self.runs_compressed_attention = source.runs_compressed_attention

    def attention(self, idx, layer):
        return self.source.attention(idx, layer)

    def mlp(self, idx, layer, compressed):
        stats = self.source.mlp(idx, layer, compressed)
        self.entry.add(idx, stats, self.weights.add(layer))
        return stats

    def advance(self, idx, layer, compressed, kept_channels):
        self.source.advance(idx, layer, compressed, kept_channels)

    def close(self, completed):
        self.source.close(completed)
        self.entry.commit() if completed else self.entry.abort()


class OriginalForward(StatisticsSource):
    """Statistics of the ORIGINAL model, as GPTQ and SVD-LLM take them: the inputs of layer 0 are captured
    once, each layer runs on them with the collector's hooks, and its outputs are the next layer's inputs."""

    down_autocorr_stride = 1  # R_d on every token: these statistics may be cached and reused

    def __init__(self, model: nn.Module, adapter, geometry: Geometry, input_ids: torch.Tensor, *, batch_size: int,
                 want_head_autocorr: bool, want_down_autocorr: bool, device=None, ranks: Ranks | None = None,
                 owners: LayerOwners | None = None):
        """``ranks``: the processes sharing the calibration windows (each passes its own share as
        ``input_ids``); their partial sums are all-reduced, so every rank gets the same statistics. With
        layer-parallel ``owners`` they are reduced to the layer's owner only, and the other ranks get ``None``."""
        self.adapter, self.geometry, self.ranks = adapter, geometry, ranks or Ranks()
        self.owners = owners or LayerOwners(self.ranks)
        self.want_head_autocorr, self.want_down_autocorr = want_head_autocorr, want_down_autocorr
        device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        with torch.inference_mode():
            self.inputs: list[LayerInput] = capture_first_layer_inputs(
                model, adapter.layers(model), input_ids, batch_size, device)

    def _collector(self) -> StatisticsCollector:
        self._residual_sq = sum(hidden.to(torch.float64).pow(2).sum().item() for hidden, _ in self.inputs)
        return StatisticsCollector(self.geometry.num_heads, self.geometry.head_dim, self.want_head_autocorr,
                                   self.want_down_autocorr, self.down_autocorr_stride)

    def _ready(self, idx: int, collector: StatisticsCollector, parts: tuple[str, ...],
               result: Callable[[], LayerStatistics]) -> LayerStatistics | None:
        """The collector's ``result`` once its ``parts`` are summed over the ranks (its hooks ran in inference
        mode, so this runs there too), as normal tensors: the solvers run outside inference mode, as on
        statistics read from the cache. ``None`` on a rank that does not solve layer ``idx``."""
        owner = self.owners.owner(idx)
        with torch.inference_mode():
            for part in parts:
                collector.all_reduce_(self.ranks, part, owner)
            if "attention" in parts and self.ranks.distributed:
                residual = torch.tensor([self._residual_sq], dtype=torch.float64)
                self.ranks.all_reduce_([residual])
                self._residual_sq = residual.item()
            if not self.owners.solves(idx):
                return None
            stats = result()
        stats = LayerStatistics(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(stats).items()})
        stats.residual_sq_mean = self._residual_sq / stats.num_tokens
        stats.check_finite(idx)
        return stats

    def attention(self, idx, layer):
        """One forward of the original layer with every statistic's hook (the MLP's too)."""
        collector = self._collector()
        hooks = [self.adapter.attention_input_module(layer).register_forward_pre_hook(collector.attention_input),
                 self.adapter.mlp_down_module(layer).register_forward_pre_hook(collector.down_input)]
        if self.want_head_autocorr:
            hooks.append(self.adapter.attention_output_module(layer).register_forward_pre_hook(collector.attention_output))
        try:
            with torch.inference_mode():
                self._outputs = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in self.inputs]
        finally:
            for h in hooks:
                h.remove()
        self._last = self._ready(idx, collector, ("attention", "mlp"), collector.result)
        return self._last

    def advance(self, idx, layer, compressed, kept_channels):
        self.inputs, self._outputs = self._outputs, None


class SequentialForward(OriginalForward):
    """Statistics of the model being compressed (method page §6): layer ``l``'s attention statistics on the
    output of the compressed layers ``< l``, its MLP statistics on the output of its compressed attention.

    It runs no more than one layer forward per layer: the original attention only as far as its statistics
    need (GQA: not at all), the compressed attention, the original gate/up projections, and the compressed
    down_proj on the kept channels of their output (the compressed gate/up are those channels' rows). That
    output is held for one layer: tokens x intermediate_size values in the model's dtype. With
    ``hold_mlp_intermediate=False`` nothing is held and the whole compressed MLP runs instead (the same
    values; its gate/up run a second time, at the kept width, for that memory).

    With ``teacher=True`` it also carries the ORIGINAL model's residual stream (one more original layer
    forward per layer) and gives the statistics of the teacher refit: :meth:`attention_output_fit` and
    :meth:`mlp_output_fit`, the inputs of the compressed o_proj / down_proj against what the original model's
    attention / MLP block outputs for the same tokens, less what the compressed stream already holds.
    """

    runs_compressed_attention = True

    def __init__(self, *args, hold_mlp_intermediate: bool = True, teacher: bool = False, down_autocorr_stride: int = 1,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.down_autocorr_stride = down_autocorr_stride  # R_d on every this many-th token (refit_stride)
        self.hold_mlp_intermediate = hold_mlp_intermediate
        self.teacher = teacher
        # The original model's stream: it starts from the same embeddings.
        self.teacher_inputs = [hidden for hidden, _ in self.inputs] if teacher else None
        self._heads = self._teacher_mid = self._teacher_out = None

    def attention(self, idx, layer):
        """R_x is the input of q_proj and G_z (MHA) the input of o_proj: the original layer runs that far."""
        self._collector_of_layer = collector = self._collector()
        adapter = self.adapter
        last = adapter.attention_output_module(layer) if self.want_head_autocorr else adapter.attention_input_module(layer)
        hooks = [adapter.attention_input_module(layer).register_forward_pre_hook(collector.attention_input)]
        if self.want_head_autocorr:
            hooks.append(adapter.attention_output_module(layer).register_forward_pre_hook(collector.attention_output))
        hooks.append(last.register_forward_pre_hook(stop))
        try:
            with torch.inference_mode():
                for hidden, kwargs in self.inputs:
                    run_until_stopped(layer, hidden, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        self._attention = self._ready(idx, collector, ("attention",), collector.attention_result)
        if self.teacher:
            self._run_teacher(layer)
        return self._attention

    def _run_teacher(self, layer):
        """The original layer on the original stream: its residual stream after attention and its output."""
        mids, outs = [], []
        hook = self.adapter.post_attention_norm_module(layer).register_forward_pre_hook(
            lambda _, args: mids.append(args[0]))
        try:
            with torch.inference_mode():
                for k, (_, kwargs) in enumerate(self.inputs):
                    outs.append(layer_output(layer, self.teacher_inputs[k], kwargs))
                    self.teacher_inputs[k] = None
        finally:
            hook.remove()
        self._teacher_mid, self._teacher_out = mids, outs

    def attention_output_fit(self, idx, compressed) -> OutputFit:
        """Teacher refit of o_proj: its input in the compressed attention (held for :meth:`mlp`) against the
        original attention block's contribution the compressed residual stream lacks, ``h_orig_mid - h``."""
        o_proj, collector = self.adapter.attention_output_module(compressed), OutputFitCollector()
        self._heads = []
        with torch.inference_mode():
            for k, (hidden, kwargs) in enumerate(self.inputs):
                heads = input_of(o_proj, compressed, hidden, kwargs)
                collector.add(heads, _less_bias(self._teacher_mid[k] - hidden, o_proj))
                self._teacher_mid[k] = None
                self._heads.append(heads)
        return self._fit_ready(idx, collector)

    def mlp_output_fit(self, idx, compressed, kept_channels) -> OutputFit:
        """Teacher refit of down_proj: its input in the compressed MLP against the original layer's output
        less the compressed residual stream after attention."""
        adapter, collector = self.adapter, OutputFitCollector()
        down = adapter.mlp_down_module(compressed)
        with torch.inference_mode():
            for k, (mid, _) in enumerate(self._mids):
                if self.hold_mlp_intermediate:
                    inputs = self._held_kept(k, kept_channels, store=True)
                else:
                    inputs = input_of(down, adapter.mlp_module(compressed),
                                      adapter.post_attention_norm_module(compressed)(mid), {})
                collector.add(inputs, _less_bias(self._teacher_out[k] - mid, down))
        return self._fit_ready(idx, collector)

    def _fit_ready(self, idx, collector: OutputFitCollector) -> OutputFit:
        """The collector's sums over the ranks, as normal tensors (see :meth:`_ready`)."""
        with torch.inference_mode():
            fit = collector.result(self.ranks)
        fit = OutputFit(fit.gram.clone(), fit.cross.clone(), fit.target_sq, fit.num_tokens)
        fit.check_finite(idx)
        return fit

    def _held_kept(self, k: int, kept_channels: torch.Tensor, store: bool = False) -> torch.Tensor:
        """Batch ``k``'s held intermediate at the kept channels; ``store`` keeps the gather in place of the
        whole intermediate (the teacher refit, so that :meth:`advance` need not gather again). The kept channels
        are sorted, so a batch already at their width is either gathered or, at full width, its own gather."""
        held = self._intermediates[k]
        if held.shape[-1] != kept_channels.numel():
            held = held[..., kept_channels.to(held.device)]
            if store:
                self._intermediates[k] = held
        return held

    def mlp(self, idx, layer, compressed):
        """The MLP statistics of the ORIGINAL gate/up on the residual stream after the compressed attention
        (down_proj itself need not run); its input is held if asked (see :meth:`advance`)."""
        adapter, collector = self.adapter, self._collector_of_layer
        self._intermediates = []
        down = adapter.mlp_down_module(layer)
        hooks = [down.register_forward_pre_hook(collector.down_input)]
        if self.hold_mlp_intermediate:
            hooks.append(down.register_forward_pre_hook(lambda _, args: self._intermediates.append(args[0])))
        hooks.append(down.register_forward_pre_hook(stop))
        try:
            with torch.inference_mode():
                # The residual stream after the compressed attention: what the MLP's norm receives. The
                # teacher refit holds o_proj's input, so only the (refit) o_proj runs again.
                if self._heads is not None:
                    self._mids = [(adapter.attention_residual_from_heads(compressed, hidden, heads), kwargs)
                                  for (hidden, kwargs), heads in zip(self.inputs, self._heads)]
                    self._heads = None
                else:
                    self._mids = [(input_of(adapter.post_attention_norm_module(compressed), compressed, hidden, kwargs),
                                   kwargs) for hidden, kwargs in self.inputs]
                for mid, _ in self._mids:
                    run_until_stopped(adapter.mlp_module(layer), adapter.post_attention_norm_module(layer)(mid))
        finally:
            for h in hooks:
                h.remove()
        return self._ready(idx, collector, ("mlp",), lambda: collector.with_mlp_result(self._attention))

    def advance(self, idx, layer, compressed, kept_channels):
        """The compressed MLP completes the compressed layer's output. Its gate/up are the original rows of
        the kept channels, so their output is in hand if it was held: only down_proj runs. Each batch is
        replaced in place, so the layer never holds the stream after attention and the outputs in full."""
        mids = self._mids
        with torch.inference_mode():
            for k, (mid, kwargs) in enumerate(mids):
                if self.hold_mlp_intermediate:
                    out = self.adapter.mlp_residual_from_intermediate(compressed, mid, self._held_kept(k, kept_channels))
                    self._intermediates[k] = None
                else:
                    out = self.adapter.mlp_residual(compressed, mid)
                mids[k] = (out, kwargs)
        self.inputs, self._mids, self._intermediates = mids, None, None
        if self.teacher:
            self.teacher_inputs, self._teacher_out = self._teacher_out, None


def _less_bias(target: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """A refit target less the projection's bias, which the refit keeps."""
    return target if linear.bias is None else target - linear.bias
