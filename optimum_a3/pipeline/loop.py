"""The per-layer loop: the one place that walks the decoder layers and compresses each.

For every layer, in order: load it -> attention statistics -> solve attention -> (sequential calibration:
put the solved attention in place, its output feeds the MLP statistics; teacher refit: refit o_proj) -> MLP
statistics -> solve the MLP -> fill the compressed layer (teacher refit: refit down_proj) -> next layer's
inputs -> hand the layer to the sink -> release the original. Under layer-parallel solving
(:class:`~optimum_a3.pipeline.distributed.LayerOwners`) a rank solves only the layers it owns and receives the others.
Where statistics come from is a source (:mod:`.sources`); where finished layers go, a sink (:mod:`.sinks`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import A3Config
from ..math.budget import LayerDims
from ..models.adapters import Geometry
from .distributed import LayerOwners, Ranks
from .layer_solver import mlp_kept_channels, refit_to_teacher, solve_attention, solve_mlp
from .sinks import ModelSink, ShardSink
from .sources import StatisticsSource
from .statistics import LayerStatistics
from .surgery import attention_state, fill_layer, layer_state, layers_prefix


class ResidentLayers:
    """The decoder layers of a model held in memory (:class:`~optimum_a3.checkpoint.weights.LazyLayers`
    reads them from a checkpoint instead)."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def get(self, idx: int) -> nn.Module:
        return self.layers[idx]

    def release(self, idx: int) -> None:
        pass

    def release_all(self) -> None:
        pass


@dataclass
class LayerPlan:
    """What the loop compresses to: the architecture's adapter, its shapes, every layer's target dims."""

    adapter: object
    geometry: Geometry
    dims: list[LayerDims]
    config: A3Config


@dataclass
class LoopReport:
    solve_s: float = 0.0
    statistics: list[LayerStatistics] = field(default_factory=list)  # only if asked to keep them


def compress_layers(plan: LayerPlan, originals, compressed: nn.Module, source: StatisticsSource,
                    sink: ModelSink | ShardSink, progress: bool = True, keep_statistics: bool = False,
                    owners: LayerOwners | None = None) -> LoopReport:
    """Compress every decoder layer of ``originals`` into ``compressed``'s layers (see the module docstring).
    ``owners``: under layer-parallel solving, a layer this rank does not own is received from its owner."""
    report, owners = LoopReport(), owners or LayerOwners(Ranks())
    targets, prefix = plan.adapter.layers(compressed), layers_prefix(compressed)
    # Closed on errors too, so that a one-line error is not printed onto the bar's line.
    with tqdm(total=plan.geometry.num_layers, desc="A3 compression", unit="layer", disable=not progress) as bar:
        for idx, target in enumerate(targets):
            layer = originals.get(idx)
            stats = source.attention(idx, layer)
            kept = None
            if owners.solves(idx):  # else another rank solves it and sends it (statistics of the original model)
                stats, kept = _solve_layer(plan, idx, layer, target, stats, source, report)
            owners.share(idx, target)
            source.advance(idx, layer, target, kept)
            sink.add(f"{prefix}{idx}.", target)
            originals.release(idx)
            if keep_statistics:
                report.statistics.append(stats)
            bar.update()
    return report


def _solve_layer(plan: LayerPlan, idx: int, layer: nn.Module, target: nn.Module, stats: LayerStatistics,
                 source: StatisticsSource, report: LoopReport) -> tuple[LayerStatistics, torch.Tensor]:
    """Solve layer ``idx`` into ``target`` from its attention ``stats`` (the source gives the MLP's in
    between); returns the complete statistics and the kept MLP channels. Solve time goes to ``report``."""
    adapter, cfg, dims = plan.adapter, plan.config, plan.dims[idx]
    start = time.perf_counter()
    attention = solve_attention(adapter, layer, _on_solver(stats, cfg), plan.geometry, dims, cfg)
    if source.runs_compressed_attention:
        fill_layer(target, attention_state(adapter, layer, attention), strict=False)
    report.solve_s += time.perf_counter() - start
    if cfg.teacher_refit:
        fit = source.attention_output_fit(idx, target)
        start = time.perf_counter()
        attention = refit_to_teacher(adapter, attention, "o", fit, cfg)
        fill_layer(target, attention_state(adapter, layer, attention), strict=False)
        report.solve_s += time.perf_counter() - start

    stats = source.mlp(idx, layer, target)
    start = time.perf_counter()
    mlp_stats = _on_solver(stats, cfg)  # moved once: the selection and the solve share it
    kept = mlp_kept_channels(adapter, layer, mlp_stats, dims)
    mlp = solve_mlp(adapter, layer, mlp_stats, dims, cfg, kept=kept)
    fill_layer(target, layer_state(layer, {**attention, **mlp}), strict=True)
    report.solve_s += time.perf_counter() - start
    if cfg.teacher_refit:
        fit = source.mlp_output_fit(idx, target, kept)
        start = time.perf_counter()
        mlp = refit_to_teacher(adapter, mlp, "down", fit, cfg)
        fill_layer(target, layer_state(layer, {**attention, **mlp}), strict=True)
        report.solve_s += time.perf_counter() - start
    return stats, kept


def _on_solver(stats: LayerStatistics, cfg: A3Config) -> LayerStatistics:
    """The statistics on the solver's device (``config.device``, else where they were computed)."""
    return stats.to(cfg.device or stats.attn_input_autocorr.device)
