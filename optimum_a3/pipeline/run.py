"""One compression run: choose the statistics source, the target dims and the skeleton, then run the loop.

:func:`run_compression` is what ``A3Compressor.compress`` and ``compress_checkpoint`` both call; they differ
only in where the original layers come from (in memory or read from a checkpoint) and in the sink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.records import CompressionRecord, update_compression_record
from ..checkpoint.stats_cache import (StaleCacheEntry, StaleStatisticsCache, StatisticsCache, statistics_key,
                                      tensor_digest)
from ..checkpoint.weight_checks import check_weights_read
from ..config import A3Config, A3ConfigError
from ..math.allocation import layer_tracks, mixed_dims, scaled_by_sensitivity
from ..math.budget import DIM_FIELDS, LayerDims, decoder_linear_params, kv_cache_bytes_per_token, total_params
from ..models.adapters import adapter_for
from ..version import __version__
from .distributed import LayerOwners, Ranks
from .loop import LayerPlan, ResidentLayers, compress_layers
from .sensitivity import SensitivityProbe, measure_sensitivity
from .sinks import ModelSink, ShardSink
from .sources import (CachedStatistics, OriginalForward, RecordedToCache, SequentialForward, StatisticsSource,
                      StoredStatistics)
from .statistics import LayerStatistics
from .surgery import empty_compressed_model

# Below this many calibration tokens per MLP channel the down_proj refit is skipped (see _refit_sized_to_data).
MIN_TOKENS_PER_CHANNEL_FOR_REFIT = 4
# The method's refit_stride is lowered until R_d samples at least this many tokens per MLP channel.
REFIT_TOKENS_PER_CHANNEL = 8


class StatisticsRun(list):
    """The per-layer statistics of one calibration run (a list of :class:`LayerStatistics`), with the
    description of its calibration data, which a later run reusing them records."""

    def __init__(self, statistics=(), calibration: dict | None = None):
        super().__init__(statistics)
        self.calibration = calibration


@dataclass
class Calibration:
    """The calibration data of a run: token windows (``None`` when statistics are handed in) and the
    description recorded in the checkpoint."""

    ids: torch.Tensor | None
    record: dict


@dataclass
class CompressionResult:
    """What a run returns: the compressed model (streamed: its layers are back on the meta device, their
    tensors in the sink), the effective config, the calibration record, timings and kept statistics."""

    model: nn.Module
    config: A3Config
    calibration: dict
    timings: dict[str, Any]
    statistics: StatisticsRun | None = None


def run_compression(config: A3Config, model: nn.Module, calibration: Callable[[], Calibration], originals,
                    make_sink: Callable[[], ModelSink | ShardSink], *, statistics: list[LayerStatistics] | None = None,
                    stats_cache: str | None = None, progress: bool = True, keep_statistics: bool = False,
                    ranks: Ranks | None = None) -> CompressionResult:
    """Compress ``model`` (whose decoder layers ``originals`` hands out: resident or lazily read).

    ``calibration`` is called once the config has been checked against the model (tokenizing the
    calibration text is the first expensive step). With ``stats_cache``, a cached entry is used when it
    covers the run; one found not to match this model or damaged mid-way is deleted (with a warning) and
    the run starts again computing the statistics. ``make_sink`` gives a fresh sink for each attempt.
    ``ranks``: the processes of a distributed run (:mod:`.distributed`), which share the calibration windows."""
    ranks = ranks or Ranks()
    adapter = adapter_for(model)
    check_weights_read(model)  # what is in memory now; lazily read layers are checked as they are read
    cfg = _restricted_to(adapter, config)
    geometry = adapter.geometry(model)
    dims = cfg.layer_dims(geometry.num_layers, geometry.head_dim, geometry.intermediate_size, rope=geometry.rope)
    torch.manual_seed(cfg.seed)
    data = calibration()
    tokens = statistics[0].num_tokens if statistics else data.record["tokens"]
    cfg = _refit_sized_to_data(cfg, tokens, geometry.intermediate_size)
    _check_reuse(cfg, statistics, stats_cache, geometry.num_layers)
    if ranks.distributed and statistics is not None:
        raise A3ConfigError("a distributed run computes its statistics: reusing statistics in memory is for one "
                            "process (a stats_cache on a filesystem every rank reads works under torchrun)")
    if cfg.probes_whole_model:
        if not isinstance(originals, ResidentLayers):
            raise A3ConfigError("allocation='mixed' measures each layer's sensitivity by running the whole model, "
                                "which layer-streamed compression does not hold: use compress(), allocation='uniform' or "
                                "sensitivity_tokens=0")
        if data.ids is None:
            raise A3ConfigError("allocation='mixed' measures sensitivity on calibration windows: pass calibration_ids "
                                "with the reused statistics, or set sensitivity_tokens=0")
    plan = LayerPlan(adapter, geometry, dims, cfg)
    attempt = functools.partial(_attempt, plan, model, data, originals, make_sink, statistics, stats_cache, ranks,
                                progress=progress and ranks.is_main, keep_statistics=keep_statistics)
    try:
        return attempt(reuse_cache=True)
    except StaleCacheEntry as stale:  # deleted, with a warning: start again, computing the statistics
        if ranks.distributed:  # the other ranks are mid-way through the entry: stop all of them instead
            raise StaleStatisticsCache(f"rank {ranks.rank}: {stale}; a distributed run stops instead: run it again "
                                       "to recompute the statistics") from stale
        return attempt(reuse_cache=False)


def _attempt(plan: LayerPlan, model, calibration: Calibration, originals, make_sink, statistics, stats_cache,
             ranks: Ranks, *, reuse_cache: bool, progress: bool, keep_statistics: bool) -> CompressionResult:
    start = time.perf_counter()
    mixed = plan.config.allocation == "mixed"
    # The mixed allocation needs every layer's statistics before any dim: a first pass on the original
    # model (from the cache or handed in where they are); a sequential run then calibrates again, so its
    # first pass, which only prices the dims, may take fewer windows (allocation_windows).
    first_plan = _original_statistics_plan(plan) if mixed else plan
    first_calibration = _first_pass_calibration(calibration, plan.config, ranks) if mixed else calibration
    cache, cache_hit = (None, False) if statistics is not None else \
        _open_cache(first_plan, model, first_calibration, stats_cache, reuse_cache, ranks)
    sink = make_sink()
    # Layer-parallel solving where no layer's statistics depend on the compressed layers before it, unless
    # a new cache entry is recorded (rank 0 writes every layer's) or the statistics are kept; the mixed
    # allocation's first pass still all-reduces: every rank allocates from every layer's statistics.
    recording = cache is not None and not cache_hit
    owners = LayerOwners(ranks, split=not plan.config.sequential and not keep_statistics and not recording,
                         to_all=sink.on_every_rank)
    source = _source(first_plan, model, first_calibration, statistics, cache, cache_hit, ranks,
                     owners=None if mixed else owners)
    completed = False
    try:
        with _eval_mode(model):
            if mixed:
                stored, plan = _mixed_plan(plan, first_plan.config, model, originals, source, calibration, ranks,
                                           progress)
                source = _source(plan, model, calibration, None, None, False, ranks) if plan.config.sequential \
                    else stored
            record = _record(model, plan.dims, calibration.record, plan.config)
            compressed = empty_compressed_model(plan.adapter, model, plan.dims, record, materialize=sink.materialize)
            report = compress_layers(plan, originals, compressed, source, sink, progress, keep_statistics, owners)
        completed = True
    finally:
        source.close(completed)
        if not completed:
            sink.discard()
            originals.release_all()
    sink.finish(model, compressed)
    # Counted on both models; the base figures cannot be derived from the checkpoint later.
    update_compression_record(compressed.config, sizes={name: [count(model), count(compressed)] for name, count in (
        ("decoder_linear_params", decoder_linear_params), ("total_params", total_params),
        ("kv_cache_bytes_per_token", kv_cache_bytes_per_token))})
    total = time.perf_counter() - start
    timings = {"total_s": total, "solve_s": report.solve_s, "calibration_forward_s": total - report.solve_s,
               "stats_cache_hit": cache_hit}
    kept = StatisticsRun(report.statistics, calibration.record) if keep_statistics else None
    return CompressionResult(compressed.eval(), plan.config, calibration.record, timings, kept)


def _open_cache(plan: LayerPlan, model, calibration: Calibration, stats_cache, reuse_cache: bool,
                ranks: Ranks) -> tuple[StatisticsCache | None, bool]:
    """The run's statistics cache entry (``None`` without ``stats_cache``) and whether it covers the run.
    Under ``torchrun`` it is a hit only if it covers the run on every rank (one filesystem, or copies)."""
    if stats_cache is None:
        return None, False
    cfg, geometry = plan.config, plan.geometry
    key = statistics_key(model.config.to_dict(), _embedding_digest(model), calibration.ids)
    cache = StatisticsCache(str(stats_cache), key)
    hit = reuse_cache and cache.covers(geometry.num_layers, _wants_head_autocorr(plan), cfg.mlp_refit)
    if ranks.distributed:
        misses = torch.tensor([0.0 if hit else 1.0], dtype=torch.float64)
        ranks.all_reduce_([misses])
        hit = misses.item() == 0.0
    return cache, hit


def _wants_head_autocorr(plan: LayerPlan) -> bool:
    """Whether the statistics hold G_z, the per-head o_proj input autocorrelation (MHA's v/o solve)."""
    return plan.geometry.is_mha and "ov" in plan.config.components


def _source(plan: LayerPlan, model, calibration: Calibration, statistics, cache: StatisticsCache | None,
            cache_hit: bool, ranks: Ranks, owners: LayerOwners | None = None) -> StatisticsSource:
    """Where the statistics come from: handed in, the cache entry (``cache_hit``), or a calibration forward
    (recorded to ``cache`` when there is one, by rank 0 under torchrun). ``owners``: layer-parallel solving,
    each layer's statistics read by or reduced to its owner only."""
    if statistics is not None:
        return StoredStatistics(statistics)
    if cache_hit:
        return CachedStatistics(cache, owners)
    cfg, geometry = plan.config, plan.geometry
    forward = SequentialForward if cfg.sequential else OriginalForward
    options = {"hold_mlp_intermediate": cfg.hold_mlp_intermediate, "teacher": cfg.teacher_refit,
               "down_autocorr_stride": cfg.refit_stride} if cfg.sequential else {"owners": owners}
    with _eval_mode(model):
        source = forward(model, plan.adapter, geometry, ranks.share(calibration.ids), batch_size=cfg.batch_size,
                         want_head_autocorr=_wants_head_autocorr(plan),
                         want_down_autocorr=cfg.mlp_refit, device=cfg.device, ranks=ranks, **options)
    if cache is not None and ranks.is_main:
        source = RecordedToCache(source, cache, geometry.num_layers, calibration.record)
    return source


def _original_statistics_plan(plan: LayerPlan) -> LayerPlan:
    """The mixed allocation's first pass: ``plan`` itself without sequential calibration (its statistics are
    then the run's), else the original model's statistics, which only price the dims: no refit of any kind
    (the probes measure the closed form)."""
    cfg = plan.config
    if not cfg.sequential:
        return plan
    return dataclasses.replace(plan, config=dataclasses.replace(cfg, sequential=False, teacher_refit=False,
                                                                mlp_refit=False, refit_stride=1))


def _first_pass_calibration(calibration: Calibration, cfg: A3Config, ranks: Ranks) -> Calibration:
    """The windows of the mixed allocation's first pass: the first ``allocation_windows`` (at least one per
    process) with sequential calibration (the first pass then only prices the dims), else all of them."""
    if not cfg.allocation_windows or not cfg.sequential or calibration.ids is None:
        return calibration
    return dataclasses.replace(calibration, ids=calibration.ids[:max(cfg.allocation_windows, ranks.world_size)])


def _mixed_plan(plan: LayerPlan, probe_config: A3Config, model, originals, source: StatisticsSource,
                calibration: Calibration, ranks: Ranks, progress: bool) -> tuple[StatisticsSource, LayerPlan]:
    """Mixed allocation (§7): a first pass takes every layer's statistics of the original model and its error
    tracks; with ``sensitivity_tokens`` each track is priced by a measured probe (:mod:`.sensitivity`) solved
    as ``probe_config`` says (the first pass's), and the dims are allocated from all of them. Returns the
    statistics of that pass and the plan with the dims."""
    cfg = plan.config
    statistics, tracks = [], []
    for idx in range(plan.geometry.num_layers):
        layer = originals.get(idx)
        source.attention(idx, layer)
        stats = source.mlp(idx, layer, None)
        source.advance(idx, layer, None, None)
        weights = {name: lin.weight.detach().to(torch.float64).T for name, lin in plan.adapter.linears(layer).items()}
        tracks += layer_tracks(idx, weights, stats, plan.geometry, cfg.components)
        statistics.append(stats)
        originals.release(idx)
    source.close(True)
    pools = (("qk",), ("ov", "mlp"))  # analytical errors: score units and output-energy units
    if cfg.sensitivity_tokens:
        probe = SensitivityProbe(model, plan.adapter, _probe_windows(calibration, cfg), batch_size=cfg.batch_size,
                                 device=cfg.device)  # every rank holds all probe tokens: the probes are shared
        kl = measure_sensitivity(probe, plan.adapter, plan.geometry, [originals.get(i) for i in range(len(statistics))],
                                 statistics, plan.dims, cfg.components, probe_config, progress, ranks)
        del probe
        probe_dims = {(t.layer, t.component): plan.dims[t.layer].of(t.component) for t in tracks}
        tracks, pools = scaled_by_sensitivity(tracks, probe_dims, kl), (tuple(cfg.components),)  # all in KL units
    capped = ("qk", "ov") if cfg.cap_kv_dims else ()  # the key/value widths: the KV cache
    dims = mixed_dims(tracks, plan.dims, pools=pools, capped=capped, max_factor=cfg.max_dim_factor)
    return StoredStatistics(statistics), dataclasses.replace(plan, dims=dims)


def _probe_windows(calibration: Calibration, cfg: A3Config) -> torch.Tensor:
    """The first ``sensitivity_tokens`` calibration tokens: a prefix of the first window when that holds them,
    else the first windows that do (rounded up to whole windows)."""
    ids = calibration.ids
    if cfg.sensitivity_tokens <= ids.shape[1]:
        return ids[:1, :cfg.sensitivity_tokens]
    return ids[:-(-cfg.sensitivity_tokens // ids.shape[1])]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """No dropout in the statistics; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_reuse(cfg: A3Config, statistics, stats_cache, num_layers: int) -> None:
    if statistics is not None and len(statistics) != num_layers:
        raise ValueError(f"statistics cover {len(statistics)} layers, the model has {num_layers}")
    if (statistics is not None or stats_cache is not None) and cfg.sequential:
        raise A3ConfigError("sequential calibration cannot reuse statistics (they depend on the compressed "
                            "layers): use method='paper' or sequential=False")
    if statistics is not None and cfg.mlp_refit and statistics[0].down_input_autocorr is None:
        raise ValueError("mlp_refit needs statistics collected with mlp_refit=True (the down_proj autocorrelation)")


def _embedding_digest(model: nn.Module) -> str:
    """Digest of the input embeddings, which the statistics depend on besides the decoder layers (those
    are checked per cache entry as they are read). Materialised in both modes, so no extra read."""
    return tensor_digest(model.get_input_embeddings().state_dict())


def _restricted_to(adapter, cfg: A3Config) -> A3Config:
    """Drop the components this architecture cannot compress (Qwen3's normalised q/k), loudly; an
    explicit dim for such a component is an error."""
    unsupported = [c for c in cfg.components if c not in adapter.compressible_components]
    if not unsupported:
        return cfg
    explicit = [c for c in unsupported if getattr(cfg, DIM_FIELDS[c]) is not None]
    if explicit:
        raise A3ConfigError(f"{type(adapter).__name__}: {', '.join(explicit)} cannot be compressed in this "
                            f"architecture ({adapter.__doc__.strip().splitlines()[0]})")
    kept = tuple(c for c in cfg.components if c in adapter.compressible_components)
    warnings.warn(f"{', '.join(unsupported)} left uncompressed for this architecture (see "
                  f"{type(adapter).__name__}); the ratio applies to {', '.join(kept)} only", stacklevel=4)
    return cfg.replaced(components=kept)


def _refit_sized_to_data(cfg: A3Config, tokens: int | None, intermediate_size: int) -> A3Config:
    """Fit the down_proj refit to the calibration set. The refit solves an intermediate-sized least-squares
    problem on the tokens R_d samples (1 in ``refit_stride``). A stride the method chose (not one asked for)
    is lowered until R_d samples ``REFIT_TOKENS_PER_CHANNEL`` tokens per MLP channel where the data allow:
    on SmolLM2 at 10% with uniform dims, 10.7 sampled tokens per channel raised perplexity by 1.5 over no
    refit and 2.7 by 5.3-5.5 (README, Results). With fewer than ``MIN_TOKENS_PER_CHANNEL_FOR_REFIT`` sampled
    tokens per channel the refit is skipped, loudly."""
    if not cfg.mlp_refit or tokens is None:
        return cfg
    if cfg.refit_stride_adapts and cfg.refit_stride > 1:
        affordable = max(1, tokens // (REFIT_TOKENS_PER_CHANNEL * intermediate_size))
        if affordable < cfg.refit_stride:
            cfg = dataclasses.replace(cfg, refit_stride=affordable)
    sampled = -(-tokens // cfg.refit_stride)
    if sampled < MIN_TOKENS_PER_CHANNEL_FOR_REFIT * intermediate_size:
        every = "" if cfg.refit_stride == 1 else f" (1 in {cfg.refit_stride} of {tokens})"
        warnings.warn(
            f"mlp_refit skipped: {sampled} calibration tokens{every} < {MIN_TOKENS_PER_CHANNEL_FOR_REFIT} x "
            f"intermediate_size ({intermediate_size}); use more calibration data to enable it", stacklevel=4)
        return dataclasses.replace(cfg, mlp_refit=False)
    return cfg


def _record(model, dims: list[LayerDims], calibration: dict, cfg: A3Config) -> dict[str, Any]:
    """The ``a3_compression`` record of the compressed config (``sizes`` are added once counted)."""
    config_dict = cfg.to_dict()
    config_dict["dataset"] = calibration["dataset"]  # never embed user text in the checkpoint
    per_layer = lambda name: [getattr(d, name) for d in dims]  # noqa: E731
    return CompressionRecord(
        library_version=__version__,
        base_model=getattr(model.config, "_name_or_path", None) or None,
        base_model_type=model.config.model_type,
        ratio=cfg.ratio,
        preset=cfg.method,
        allocation=cfg.allocation,
        mlp_refit=cfg.mlp_refit,
        sequential=cfg.sequential,
        components=list(cfg.components),
        dims={name: per_layer(name) for name in ("head_dim_qk", "head_dim_vo", "intermediate_size")},
        calibration=calibration,
        a3_config=config_dict,
    ).to_dict()
