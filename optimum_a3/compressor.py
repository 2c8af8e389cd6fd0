"""``A3Compressor``: the user-facing entry point, in the shape of Optimum's ``GPTQQuantizer``."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .adapters import adapter_for, decoder_layers
from .allocation import layer_tracks, mixed_dims
from .budget import LayerDims, decoder_linear_params, kv_cache_bytes_per_token, total_params
from .calibration import calibration_windows
from .config import _DIM_FIELDS, A3Config, A3ConfigError
from .data import describe_source
from .layer_solver import mlp_kept_channels, solve_attention, solve_layer, solve_mlp
from .model_card import write_model_card
from .models.a3_llama import A3LlamaConfig, A3LlamaForCausalLM
from .records import CompressionRecord, update_compression_record
from .saving import check_output_dir, model_sources, save_tokenizer, write_atomically
from .statistics import LayerStatistics, stream_layer_statistics
from .stats_cache import LayerDigestChain, StaleCacheEntry, StatisticsCache, statistics_key, tensor_digest
from .streaming import (CheckpointWeights, LazyLayers, ShardWriter, empty_model, materialize, move_buffers,
                        resolve_checkpoint_dir, return_large_frees_to_the_os)
from .version import __version__
from .weight_checks import check_tensors_written, check_weights_read

# Below this many calibration tokens per MLP channel the down_proj refit is skipped (see compress).
MIN_TOKENS_PER_CHANNEL_FOR_REFIT = 2

# save_pretrained writes `auto_map` and copies the self-contained modeling files for these classes.
A3LlamaConfig.register_for_auto_class()
A3LlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")


class A3Compressor(OptimumQuantizer):
    """Compress a causal LM with A3 (arXiv 2505.12942) into a smaller dense model.

    Example::

        compressor = A3Compressor(A3Config(ratio=0.2, nsamples=128, seqlen=2048))
        small = compressor.compress(model, tokenizer)
        compressor.save(small, "smollm2-a3-20", tokenizer=tokenizer)

    Args:
        config: an :class:`A3Config`, a dict from ``A3Config.to_dict()``, or ``None`` to build one from
            ``kwargs`` (e.g. ``A3Compressor(ratio=0.2)``).
    """

    def __init__(self, config: A3Config | dict | None = None, **kwargs):
        if config is None:
            config = A3Config(**kwargs)
        elif isinstance(config, dict):
            config = A3Config.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("pass either an A3Config or keyword arguments, not both")
        self.config = config
        self.last_timings: dict[str, float] = {}
        self.last_statistics: list[LayerStatistics] | None = None
        self.last_calibration: dict | None = None
        self.last_effective_config: A3Config | None = None
        self._model = None
        self._tokenizer = None

    # ------------------------------------------------------------------------------ compress
    def compress(self, model: nn.Module, tokenizer=None, calibration_ids: torch.Tensor | None = None,
                 progress: bool = True, statistics: list[LayerStatistics] | None = None,
                 keep_statistics: bool = False, stats_cache: str | Path | None = None) -> nn.Module:
        """Return the A3-compressed copy of ``model`` (the input model is left unchanged).

        Args:
            model: a supported Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3 families), in eval mode.
            tokenizer: tokenizes the calibration text of ``config.dataset``.
            calibration_ids: optional ``(n, seqlen)`` token ids used instead of ``config.dataset``.
            progress: show progress bars.
            statistics: per-layer statistics from an earlier run on the same model and calibration data
                (``last_statistics``); skips the calibration forward, e.g. to try several ratios.
            keep_statistics: keep the statistics in ``self.last_statistics`` for reuse.
            stats_cache: a directory caching statistics on disk, keyed by model and calibration tokens: a
                later run with the same model and data (any ratio or dims) skips the calibration forward.
                Needs non-sequential calibration (``method="paper"`` or ``sequential=False``).

        To compress a checkpoint larger than memory, use :meth:`compress_checkpoint`.
        """
        run = functools.partial(self._compress, model, tokenizer, calibration_ids, progress, statistics,
                                keep_statistics, stats_cache)
        try:
            return run()
        except StaleCacheEntry:  # deleted, with a warning: start again, computing the statistics
            return run(reuse_cache=False)

    def compress_checkpoint(self, model_path: str | Path, save_dir: str | Path, tokenizer=None, *,
                            overwrite: bool = False, progress: bool = True,
                            calibration_ids: torch.Tensor | None = None, stats_cache: str | Path | None = None,
                            dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                            trust_remote_code: bool = False) -> str:
        """Compress a safetensors checkpoint (directory or Hub id) into ``save_dir`` one layer at a time.

        Only one decoder layer of the original model is in memory at once (read from its shards), and
        each compressed layer is written out as soon as it is solved, so peak memory is about one layer
        of weights and its float64 statistics, the calibration activations of one layer and one output
        shard (``max_shard_size``) — not the model. The checkpoint is the same, tensor for tensor, as
        ``save(compress(model))`` on the loaded model. It is written atomically like :meth:`save`.
        On Linux/glibc it sets malloc's mmap threshold to 1 MiB for the process, so that freed
        activations leave memory (see :func:`optimum_a3.streaming.return_large_frees_to_the_os`).

        Args:
            model_path: a local directory with ``model.safetensors`` (or an index of shards) or a Hub id.
            save_dir: output directory; must be empty unless ``overwrite``.
            tokenizer: defaults to the checkpoint's tokenizer (saved with the result).
            dtype: compute/storage dtype; defaults to the checkpoint's (``config.dtype``), else float32.
            other arguments: as :meth:`compress` and :meth:`save`.
        Returns the path of the saved checkpoint.
        """
        from .loading import load_tokenizer, remote_code_refused

        save_dir = str(save_dir)
        check_output_dir(save_dir, overwrite, inputs=[model_path])  # before any download or expensive work
        directory = resolve_checkpoint_dir(str(model_path))
        return_large_frees_to_the_os()  # else freed activations stay resident (see its docstring)
        weights = CheckpointWeights(directory)
        # Refuses unwanted remote code, and a config.json that does not describe the weights.
        model = empty_model(directory, dtype or torch.float32, trust_remote_code)
        if tokenizer is None:
            with remote_code_refused(directory):
                tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        if dtype is None and isinstance(getattr(model.config, "dtype", None), torch.dtype):
            model = empty_model(directory, model.config.dtype, trust_remote_code)
        dtype = model.dtype
        adapter_for(model)  # refuse unsupported architectures before reading any weight
        device = torch.device(self.config.device or "cpu")
        move_buffers(model, device)
        names = {module: name for name, module in model.named_modules()}
        embeddings = model.get_input_embeddings()
        materialize(embeddings, names[embeddings] + ".", weights, dtype, device)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # lm_head shares the materialised embedding again (counted once)
        layers = adapter_for(model).layers(model)
        lazy = LazyLayers(layers, names[layers] + ".", weights, dtype, device)

        def write(tmp: str) -> None:
            run = functools.partial(self._compress, model, tokenizer, calibration_ids, progress, None, False,
                                    stats_cache, lazy=lazy, weights=weights)
            writer = ShardWriter(tmp, max_shard_size)
            try:
                compressed = run(writer=writer)
            except StaleCacheEntry:  # deleted, with a warning: start again, computing the statistics
                self._discard_partial_output(writer, lazy)
                writer = ShardWriter(tmp, max_shard_size)
                compressed = run(writer=writer, reuse_cache=False)
            writer.finish(total_parameters=total_params(compressed))
            self._write_files(compressed, tmp, tokenizer)

        return write_atomically(save_dir, write, overwrite=overwrite, inputs=[model_path, directory])

    def _compress(self, model, tokenizer, calibration_ids, progress, statistics, keep_statistics, stats_cache,
                  lazy: LazyLayers | None = None, writer: ShardWriter | None = None,
                  weights: CheckpointWeights | None = None, reuse_cache: bool = True) -> nn.Module:
        """The one pipeline. In memory (``lazy``/``writer`` None) the compressed model is built whole;
        streaming, original layers are materialised by ``lazy`` and compressed ones handed to ``writer``.
        With ``stats_cache``, a cached entry is read only if ``reuse_cache``; one found not to match this
        model or damaged mid-way raises :class:`StaleCacheEntry` (the callers start again without it)."""
        adapter = adapter_for(model)
        check_weights_read(model)  # what is in memory now; ``lazy`` checks each layer as it reads it
        cfg = self._restricted_to(adapter, self.config)
        geometry = adapter.geometry(model)
        dims = cfg.layer_dims(geometry.num_layers, geometry.head_dim, geometry.intermediate_size, rope=geometry.rope)
        torch.manual_seed(cfg.seed)
        if statistics is None:
            calibration_ids, source = self._calibration_ids(tokenizer, calibration_ids,
                                                            getattr(model.config, "max_position_embeddings", None))
            calibration = {"dataset": source, "nsamples": int(calibration_ids.shape[0]),
                           "seqlen": int(calibration_ids.shape[1]), "tokens": int(calibration_ids.numel())}
        else:
            if len(statistics) != geometry.num_layers:
                raise ValueError(f"statistics cover {len(statistics)} layers, the model has {geometry.num_layers}")
            calibration = dict(self.last_calibration or {"dataset": "reused statistics"})
        calibration["seed"] = cfg.seed
        tokens = statistics[0].num_tokens if statistics else calibration["tokens"]
        cfg = self._without_ill_posed_refit(cfg, tokens, geometry)
        want_head = geometry.is_mha and "ov" in cfg.components
        if statistics is not None or stats_cache is not None:
            if cfg.sequential:
                raise A3ConfigError("sequential calibration cannot reuse statistics (they depend on the compressed "
                                    "layers): use method='paper' or sequential=False")
        if statistics is not None and cfg.mlp_refit and statistics[0].down_input_autocorr is None:
            raise ValueError("mlp_refit needs statistics collected with mlp_refit=True (the down_proj autocorrelation)")

        cache, cache_writer, cache_hit = None, None, False
        weight_chain = LayerDigestChain()  # the cache entry's check of the decoder layers, fed as they are read
        if statistics is None and stats_cache is not None:
            key = statistics_key(model.config.to_dict(), self._embedding_digest(model), calibration_ids)
            cache = StatisticsCache(str(stats_cache), key)
            cache_hit = reuse_cache and cache.covers(geometry.num_layers, want_head, cfg.mlp_refit)
        propagate = {} if cfg.sequential else None
        if statistics is not None:
            layer_stats = enumerate(statistics)
        elif cache_hit:
            layer_stats = ((idx, cache.load(idx)) for idx in range(geometry.num_layers))
        else:
            layer_stats = stream_layer_statistics(
                model, adapter, calibration_ids, batch_size=cfg.batch_size, want_head_autocorr=want_head,
                want_down_autocorr=cfg.mlp_refit, device=cfg.device, progress=progress, propagate=propagate,
                layer_loader=lazy, hold_mlp_intermediate=cfg.hold_mlp_intermediate,
            )
            if cache is not None:
                cache_writer = cache.writer(geometry.num_layers, calibration)

        if cfg.allocation == "mixed":
            # Every layer's statistics are needed before any dim can be chosen.
            layer_stats = list(layer_stats)
            dims = self._mixed_dims(adapter, model, geometry, layer_stats, dims, cfg.components, lazy)
        compressed = self._empty_compressed_model(adapter, model, dims, self._record(model, dims, calibration, cfg),
                                                  materialize=writer is None)
        kept: list[LayerStatistics] = []
        start = time.perf_counter()
        solve_time = 0.0
        originals, targets = adapter.layers(model), adapter.layers(compressed)
        targets_prefix = self._module_name(compressed, targets) + "."
        written: list[int] = []
        attention_entries: dict[int, dict[str, torch.Tensor]] = {}  # sequential: solved before the MLP
        try:
            for idx, stats in layer_stats:
                t0 = time.perf_counter()
                if lazy is not None:
                    lazy.load(idx)
                    for done in written:  # their outputs have fed this layer's statistics by now
                        targets[done].to("meta")
                    written.clear()
                solver_device = cfg.device or stats.attn_input_autocorr.device
                if not stats.complete:
                    # Sequential calibration: the MLP statistics are taken on this attention's output.
                    attention_entries[idx] = self._solve_attention_first(
                        adapter, originals[idx], targets[idx], stats.to(solver_device), geometry, dims[idx], cfg)
                    propagate[idx] = targets[idx]
                    solve_time += time.perf_counter() - t0
                    continue
                if cache_hit:
                    cache.check_weights(idx, weight_chain.add(originals[idx]))
                elif cache_writer is not None:
                    cache_writer.add(idx, stats, weight_chain.add(originals[idx]))
                kept_mlp_channels = None
                if idx in attention_entries:
                    new_entries = attention_entries.pop(idx)
                    stats_here = stats.to(solver_device)
                    kept_mlp_channels = mlp_kept_channels(adapter, originals[idx], stats_here, dims[idx])
                    new_entries.update(solve_mlp(adapter, originals[idx], stats_here, dims[idx], cfg,
                                                 kept=kept_mlp_channels))
                else:
                    new_entries = solve_layer(adapter, originals[idx], stats.to(solver_device), geometry, dims[idx], cfg)
                self._fill(targets[idx], self._layer_state(originals[idx], new_entries), strict=True)
                if writer is not None:
                    writer.add({f"{targets_prefix}{idx}.{k}": v for k, v in targets[idx].state_dict().items()})
                    written.append(idx)
                if lazy is not None:
                    lazy.release(idx)
                if propagate is not None:
                    propagate[idx] = (targets[idx], kept_mlp_channels)
                if keep_statistics:
                    kept.append(stats)
                solve_time += time.perf_counter() - t0
            if cache_writer is not None:
                cache_writer.commit()
        except BaseException:
            if cache_writer is not None:
                cache_writer.abort()
            raise
        for done in written:
            targets[done].to("meta")
        if writer is None:
            self._copy_outside_layers(model, compressed)
        else:
            writer.add(self._outside_layer_tensors(compressed, weights, model.dtype))
        # Counted on both models; the base figures cannot be derived from the checkpoint later.
        update_compression_record(compressed.config, sizes={
            name: [count(model), count(compressed)] for name, count in (
                ("decoder_linear_params", decoder_linear_params), ("total_params", total_params),
                ("kv_cache_bytes_per_token", kv_cache_bytes_per_token))})
        total = time.perf_counter() - start
        self.last_timings = {"total_s": total, "solve_s": solve_time, "calibration_forward_s": total - solve_time,
                             "stats_cache_hit": cache_hit}
        if keep_statistics:
            self.last_statistics = kept
        self.last_calibration = calibration
        self.last_effective_config = cfg
        return compressed.eval()

    @staticmethod
    def _layer_state(original: nn.Module, new_entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compressed layer's state: the solved entries, everything else (norms, some biases) as is."""
        state = dict(original.state_dict())
        state.update(new_entries)
        return state

    @classmethod
    def _solve_attention_first(cls, adapter, original: nn.Module, target: nn.Module, stats: LayerStatistics,
                               geometry, dims: LayerDims, cfg: A3Config) -> dict[str, torch.Tensor]:
        """Solve a layer's attention and put it into ``target`` (whose MLP stays unset), so that sequential
        calibration can run the compressed attention; returns the solved entries."""
        entries = solve_attention(adapter, original, stats, geometry, dims, cfg)
        mlp = tuple(f"{adapter.linear_paths[name]}." for name in ("gate", "up", "down"))
        state = {k: v for k, v in cls._layer_state(original, entries).items() if not k.startswith(mlp)}
        cls._fill(target, state, strict=False)
        return entries

    @staticmethod
    def _fill(target: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
        """Load ``state`` into a compressed layer, allocating it first if it is still on the meta device
        (streaming); ``strict=False`` for the attention-only state of sequential calibration."""
        if any(p.is_meta for p in target.parameters()):
            target.to_empty(device=next(iter(state.values())).device)
        _, unexpected = target.load_state_dict(state, strict=strict)
        if unexpected:
            raise RuntimeError(f"unexpected compressed-layer entries: {unexpected}")

    @staticmethod
    def _module_name(root: nn.Module, module: nn.Module) -> str:
        return next(name for name, m in root.named_modules() if m is module)

    @staticmethod
    def _embedding_digest(model) -> str:
        """Digest of the input embeddings, which the statistics depend on besides the decoder layers (those
        are checked per cache entry as they are read). Materialised in both modes, so no extra read."""
        return tensor_digest(model.get_input_embeddings().state_dict())

    @staticmethod
    def _discard_partial_output(writer: ShardWriter, lazy: LazyLayers) -> None:
        """Undo a streamed attempt that stopped mid-way: delete its flushed shards, release its layers."""
        for path, _ in writer.shards:
            os.remove(path)
        for idx in list(lazy.loaded):
            lazy.release(idx)

    @staticmethod
    def _outside_layer_tensors(compressed: nn.Module, weights: CheckpointWeights, dtype) -> dict[str, torch.Tensor]:
        """Embeddings, final norm and (untied) lm_head, read from the original checkpoint."""
        layers_prefix = A3Compressor._module_name(compressed, decoder_layers(compressed)) + "."
        names = [k for k in compressed.state_dict() if not k.startswith(layers_prefix)]
        if compressed.config.tie_word_embeddings:
            names = [k for k in names if k != "lm_head.weight"]
        return weights.load(names, dtype)

    @staticmethod
    def _write_files(compressed: nn.Module, directory: str, tokenizer) -> None:
        """What ``save_pretrained`` writes besides the weights: config (with ``auto_map``), remote code,
        generation config; plus the tokenizer and the model card."""
        from transformers.dynamic_module_utils import custom_object_save

        compressed.config.dtype = str(compressed.dtype).split(".")[1]
        compressed.config.architectures = [type(compressed).__name__]
        custom_object_save(compressed, directory, config=compressed.config)
        compressed.config.save_pretrained(directory)
        if compressed.can_generate():
            compressed.generation_config.save_pretrained(directory)
        if tokenizer is not None:
            save_tokenizer(tokenizer, directory)
        write_model_card(compressed, directory)

    @staticmethod
    def _restricted_to(adapter, cfg: A3Config) -> A3Config:
        """Drop the components this architecture cannot compress (Qwen3's normalised q/k), loudly; an
        explicit dim for such a component is an error."""
        unsupported = [c for c in cfg.components if c not in adapter.compressible_components]
        if not unsupported:
            return cfg
        explicit = [c for c in unsupported if getattr(cfg, _DIM_FIELDS[c]) is not None]
        if explicit:
            raise A3ConfigError(f"{type(adapter).__name__}: {', '.join(explicit)} cannot be compressed in this "
                                f"architecture ({adapter.__doc__.strip().splitlines()[0]})")
        kept = tuple(c for c in cfg.components if c in adapter.compressible_components)
        warnings.warn(f"{', '.join(unsupported)} left uncompressed for this architecture (see "
                      f"{type(adapter).__name__}); the ratio applies to {', '.join(kept)} only", stacklevel=3)
        return dataclasses.replace(cfg, components=kept)

    @staticmethod
    def _without_ill_posed_refit(cfg: A3Config, tokens: int | None, geometry) -> A3Config:
        """The refit solves an intermediate-sized least-squares problem: with fewer than two calibration
        tokens per MLP channel it overfits (measured: worse than no refit), so it is skipped, loudly."""
        if cfg.mlp_refit and tokens is not None and tokens < MIN_TOKENS_PER_CHANNEL_FOR_REFIT * geometry.intermediate_size:
            warnings.warn(
                f"mlp_refit skipped: {tokens} calibration tokens < {MIN_TOKENS_PER_CHANNEL_FOR_REFIT} x intermediate_size "
                f"({geometry.intermediate_size}); use more calibration data to enable it", stacklevel=3)
            return dataclasses.replace(cfg, mlp_refit=False)
        return cfg

    def _mixed_dims(self, adapter, model, geometry, layer_stats, uniform: list[LayerDims], components,
                    lazy: LazyLayers | None = None) -> list[LayerDims]:
        tracks = []
        for idx, stats in layer_stats:
            if lazy is not None:
                lazy.load(idx)
            layer = adapter.layers(model)[idx]
            weights = {name: lin.weight.detach().to(torch.float64).T for name, lin in adapter.linears(layer).items()}
            tracks += layer_tracks(idx, weights, stats, geometry, components)
            if lazy is not None:
                lazy.release(idx)
        return mixed_dims(tracks, uniform)

    def _calibration_ids(self, tokenizer, calibration_ids, max_positions: int | None) -> tuple[torch.Tensor, str]:
        cfg = self.config
        seqlen = cfg.seqlen if calibration_ids is None else torch.as_tensor(calibration_ids).shape[-1]
        if max_positions and seqlen > max_positions:
            # Positions the model was never trained on would skew every statistic.
            raise A3ConfigError(f"calibration windows of {seqlen} tokens exceed the model's max_position_embeddings "
                                f"({max_positions}): use seqlen <= {max_positions}")
        if calibration_ids is None:
            ids = calibration_windows(tokenizer, cfg.dataset, cfg.nsamples, cfg.seqlen, cfg.seed)
            return ids, describe_source(cfg.dataset)
        ids = torch.as_tensor(calibration_ids, dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError("calibration_ids must have shape (num_windows, seqlen)")
        return ids, "user-provided token ids"

    def _record(self, model, dims: list[LayerDims], calibration: dict, cfg: A3Config) -> dict[str, Any]:
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

    @staticmethod
    def _empty_compressed_model(adapter, model, dims, record, materialize: bool = True) -> nn.Module:
        """The compressed model's skeleton on the meta device; allocated (uninitialised) if ``materialize``."""
        config = adapter.compressed_config(model, dims, record)
        config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
        with torch.device("meta"):
            compressed = adapter.compressed_model_class(config)
        compressed = compressed.to(model.dtype)
        if materialize:
            compressed = compressed.to_empty(device=model.get_input_embeddings().weight.device)
        # Eval mode, as from_pretrained gives: sequential calibration runs these layers (no dropout there).
        return compressed.eval()

    @staticmethod
    def _copy_outside_layers(model: nn.Module, compressed: nn.Module) -> None:
        """Embeddings, final norm and lm_head are not touched by A3: copy them (and re-tie)."""
        original_layers = A3Compressor._module_name(model, decoder_layers(model)) + "."
        compressed_layers = A3Compressor._module_name(compressed, decoder_layers(compressed)) + "."
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(original_layers)}
        missing, unexpected = compressed.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(compressed_layers)]
        if compressed.config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
            compressed.tie_weights()
        if missing or unexpected:
            raise RuntimeError(f"weights outside the decoder layers do not match: missing={missing} unexpected={unexpected}")

    # ---------------------------------------------------------------------------------- save
    def save(self, model: nn.Module, save_dir: str | Path, tokenizer=None, overwrite: bool = False,
             max_shard_size: str | int = "5GB") -> str:
        """Save ``model`` as safetensors + config (with ``auto_map``) + remote code (+ tokenizer).

        The checkpoint is written to a temporary sibling directory and moved into place in one rename,
        so a failure leaves ``save_dir`` untouched. A non-empty ``save_dir`` is refused unless
        ``overwrite=True``. Reload anywhere with
        ``AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)``.
        """
        if not isinstance(model, A3LlamaForCausalLM):
            raise TypeError(f"expected a model returned by A3Compressor.compress, got {type(model).__name__}")
        check_tensors_written(model.state_dict())  # before anything is created

        def writer(tmp: str) -> None:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            write_model_card(model, tmp)

        return write_atomically(str(save_dir), writer, overwrite=overwrite, inputs=model_sources(model))

    def push_to_hub(self, model: nn.Module, repo_id: str, *, tokenizer=None, **kwargs):
        """Upload ``model`` (weights, config with ``auto_map``, modeling files, tokenizer, model card) to
        ``repo_id`` in one commit; keyword arguments as :func:`optimum_a3.hub.push_to_hub` (``commit_message``,
        ``private``, ``token``, ``revision``, ``create_pr``, ``max_shard_size``, ``license``, ...).
        Returns the ``CommitInfo``."""
        from .hub import push_to_hub

        return push_to_hub(model, repo_id, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        """The compressor's configuration as a JSON-serialisable dict."""
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict) -> A3Compressor:
        """Rebuild a compressor from :meth:`to_dict` output."""
        return cls(A3Config.from_dict(config_dict))

    # --------------------------------------------------------- OptimumQuantizer interface
    @classmethod
    def from_pretrained(cls, model_or_path: str | Path, file_name: str | None = None, config: A3Config | None = None,
                        **kwargs) -> A3Compressor:
        """Load a model (hub id, directory or GGUF file) to compress later with :meth:`quantize`."""
        from .loading import load_model_and_tokenizer

        compressor = cls(config, **kwargs)
        spec = str(model_or_path) if file_name is None else str(Path(model_or_path) / file_name)
        compressor._model, compressor._tokenizer = load_model_and_tokenizer(spec)
        return compressor

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, overwrite: bool = False, **kwargs) -> str:
        """``OptimumQuantizer`` entry point: compress the model given to :meth:`from_pretrained` and save it."""
        if self._model is None:
            raise RuntimeError("call A3Compressor.from_pretrained(model) first, or use compress() + save()")
        check_output_dir(str(save_dir), overwrite, inputs=model_sources(self._model))
        compressed = self.compress(self._model, self._tokenizer, **kwargs)
        return self.save(compressed, save_dir, tokenizer=self._tokenizer, overwrite=overwrite)
