"""``A3Compressor``: the user-facing entry point, in the shape of Optimum's ``GPTQQuantizer``."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .calibration.text import describe_source
from .calibration.windows import calibration_windows
from .checkpoint.saving import check_output_dir, model_sources, write_atomically
from .checkpoint.shards import ShardWriter
from .checkpoint.weight_checks import check_tensors_written
from .checkpoint.weights import resolve_checkpoint_dir, return_large_frees_to_the_os, streamed_model
from .checkpoint.writer import save_model, write_checkpoint_files
from .config import A3Config, A3ConfigError
from .models.a3_llama import A3LlamaConfig, A3LlamaForCausalLM
from .models.adapters import adapter_for
from .pipeline.distributed import current_ranks
from .pipeline.loop import ResidentLayers
from .pipeline.run import Calibration, CompressionResult, StatisticsRun, run_compression
from .pipeline.sinks import DiscardSink, ModelSink, ShardSink
from .pipeline.statistics import LayerStatistics

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
        self.last_result: CompressionResult | None = None
        self._model = None
        self._tokenizer = None

    # What the last compress() / compress_checkpoint() reported (see CompressionResult).
    @property
    def last_timings(self) -> dict:
        """``total_s``, ``solve_s``, ``calibration_forward_s`` and ``stats_cache_hit`` of the last run."""
        return self.last_result.timings if self.last_result else {}

    @property
    def last_statistics(self) -> StatisticsRun | None:
        """The per-layer statistics of the last run, if it was asked to keep them (``keep_statistics``)."""
        return self.last_result.statistics if self.last_result else None

    @property
    def last_calibration(self) -> dict | None:
        """The calibration record of the last run (dataset, windows, tokens, seed)."""
        return self.last_result.calibration if self.last_result else None

    @property
    def last_effective_config(self) -> A3Config | None:
        """The config the last run used: the method's values filled in, unsupported components dropped."""
        return self.last_result.config if self.last_result else None

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

        To compress a checkpoint larger than memory, use :meth:`compress_checkpoint`. Under ``torchrun``
        (an initialised process group, or ``WORLD_SIZE`` > 1 in the environment) the processes share the
        calibration windows and all-reduce the statistics; each returns the same compressed model
        (:mod:`optimum_a3.pipeline.distributed`).
        """
        ranks = current_ranks(self.config.device)  # under torchrun: the processes sharing the calibration
        with ranks.guard():
            layers = ResidentLayers(adapter_for(model).layers(model))
            calibration = lambda: self._calibration(model, tokenizer, calibration_ids, statistics)  # noqa: E731
            self.last_result = run_compression(
                self.config, model, calibration, layers, ModelSink, statistics=statistics, stats_cache=stats_cache,
                progress=progress, keep_statistics=keep_statistics, ranks=ranks)
        return self.last_result.model

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
        activations leave memory (see :func:`optimum_a3.checkpoint.weights.return_large_frees_to_the_os`).

        Args:
            model_path: a local directory with ``model.safetensors`` (or an index of shards) or a Hub id.
            save_dir: output directory; must be empty unless ``overwrite``.
            tokenizer: defaults to the checkpoint's tokenizer (saved with the result).
            dtype: compute/storage dtype; defaults to the checkpoint's (``config.dtype``), else float32.
            other arguments: as :meth:`compress` and :meth:`save`.
        Returns the path of the saved checkpoint. Under ``torchrun`` the processes share the calibration
        windows; rank 0 writes the checkpoint once every rank has finished (a failure on any rank leaves
        ``save_dir`` as it was).
        """
        ranks = current_ranks(self.config.device)  # under torchrun: the processes sharing the calibration
        with ranks.guard():
            return self._compress_checkpoint(ranks, model_path, str(save_dir), tokenizer, overwrite, progress,
                                             calibration_ids, stats_cache, dtype, max_shard_size, trust_remote_code)

    def _compress_checkpoint(self, ranks, model_path, save_dir, tokenizer, overwrite, progress, calibration_ids,
                             stats_cache, dtype, max_shard_size, trust_remote_code) -> str:
        from .checkpoint.loading import load_tokenizer, remote_code_refused

        check_output_dir(save_dir, overwrite, inputs=[model_path])  # before any download or expensive work
        directory = resolve_checkpoint_dir(str(model_path))
        return_large_frees_to_the_os()  # else freed activations stay resident (see its docstring)
        # Refuses unwanted remote code, unsupported architectures, and a config.json that does not describe
        # the weights, before reading any weight.
        model, lazy = streamed_model(directory, dtype, torch.device(self.config.device or "cpu"), trust_remote_code)
        if tokenizer is None:
            with remote_code_refused(directory):
                tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
        calibration = lambda: self._calibration(model, tokenizer, calibration_ids, None)  # noqa: E731

        run = functools.partial(run_compression, self.config.for_layer_streaming(), model, calibration, lazy,
                                stats_cache=stats_cache, progress=progress, ranks=ranks)
        if not ranks.is_main:  # rank 0 writes the checkpoint
            self.last_result = run(DiscardSink)
            ranks.check_ok()  # rank 0's last synchronisation: the output is complete
            return save_dir

        def write(tmp: str) -> None:
            shards = ShardWriter(tmp, max_shard_size)
            self.last_result = run(lambda: ShardSink(shards, lazy.weights))
            write_checkpoint_files(self.last_result.model, tmp, tokenizer, shards)
            ranks.check_ok()  # every rank finished: only then does the checkpoint replace save_dir

        return write_atomically(save_dir, write, overwrite=overwrite, inputs=[model_path, directory])

    def _calibration(self, model: nn.Module, tokenizer, calibration_ids, statistics) -> Calibration:
        """The calibration windows and their record: tokenized from ``config.dataset``, given as token ids,
        or those of the reused ``statistics`` (no windows needed)."""
        if statistics is not None:  # windows given too are kept: the mixed allocation's probes run on them
            record = getattr(statistics, "calibration", None) or {"dataset": "reused statistics"}
            ids = None if calibration_ids is None else torch.as_tensor(calibration_ids, dtype=torch.long)
            return Calibration(ids, {**record, "seed": self.config.seed})
        cfg = self.config
        seqlen = cfg.seqlen if calibration_ids is None else torch.as_tensor(calibration_ids).shape[-1]
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and seqlen > max_positions:
            # Positions the model was never trained on would skew every statistic.
            raise A3ConfigError(f"calibration windows of {seqlen} tokens exceed the model's max_position_embeddings "
                                f"({max_positions}): use seqlen <= {max_positions}")
        if calibration_ids is None:
            ids, source = calibration_windows(tokenizer, cfg.dataset, cfg.nsamples, cfg.seqlen, cfg.seed), describe_source(cfg.dataset)
        else:
            ids, source = torch.as_tensor(calibration_ids, dtype=torch.long), "user-provided token ids"
            if ids.dim() != 2:
                raise ValueError("calibration_ids must have shape (num_windows, seqlen)")
        return Calibration(ids, {"dataset": source, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                                 "tokens": int(ids.numel()), "seed": cfg.seed})

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

        return write_atomically(str(save_dir), lambda tmp: save_model(model, tmp, tokenizer, max_shard_size),
                                overwrite=overwrite, inputs=model_sources(model))

    def push_to_hub(self, model: nn.Module, repo_id: str, *, tokenizer=None, **kwargs):
        """Upload ``model`` (weights, config with ``auto_map``, modeling files, tokenizer, model card) to
        ``repo_id`` in one commit; keyword arguments as :func:`optimum_a3.checkpoint.hub.push_to_hub` (``commit_message``,
        ``private``, ``token``, ``revision``, ``create_pr``, ``max_shard_size``, ``license``, ...).
        Returns the ``CommitInfo``."""
        from .checkpoint.hub import push_to_hub

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
        from .checkpoint.loading import load_model_and_tokenizer

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
