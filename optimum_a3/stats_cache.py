"""On-disk cache of calibration statistics, so that compressing again (another ratio, other dims) skips
the calibration forward.

An entry is a directory ``a3-stats-<key>`` under the cache directory, one safetensors file per layer
plus ``meta.json``. The key hashes what the statistics depend on: the model config, a digest of some
of its weights, the calibration token ids and the library version. An entry is written under a
temporary name and renamed when complete, so an interrupted run never leaves a half entry behind.
Statistics collected for refit (the large ``down_proj`` autocorrelation) also serve runs without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from .saving import partial_dir
from .statistics import LayerStatistics
from .version import __version__

_TENSOR_FIELDS = ("attn_input_autocorr", "down_input_sq_mean", "head_output_autocorr", "down_input_autocorr",
                  "attn_input_mean")
META_FILE = "meta.json"


def statistics_key(config: dict, weight_digest: str, calibration_ids: torch.Tensor) -> str:
    """Hex key of the statistics of a model (config + weight digest) on some calibration token ids."""
    h = hashlib.sha256()
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(weight_digest.encode())
    ids = torch.as_tensor(calibration_ids, dtype=torch.int64).contiguous()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    h.update(__version__.encode())
    return h.hexdigest()[:24]


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 of the bytes of a few weight tensors (enough to tell two checkpoints of one config apart)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StatisticsCache:
    """One cache entry (may not exist yet)."""

    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.path = os.path.join(directory, f"a3-stats-{key}")

    def meta(self) -> dict | None:
        try:
            with open(os.path.join(self.path, META_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def covers(self, num_layers: int, want_head_autocorr: bool, want_down_autocorr: bool) -> bool:
        """True when a complete entry holds every statistic this run needs."""
        meta = self.meta()
        return bool(meta) and meta["num_layers"] == num_layers and (
            meta["head_output_autocorr"] or not want_head_autocorr) and (
            meta["down_input_autocorr"] or not want_down_autocorr)

    def load(self, idx: int) -> LayerStatistics:
        meta = self.meta()
        tensors = load_file(os.path.join(self.path, f"layer-{idx:05d}.safetensors"))
        fields = {name: tensors.get(name) for name in _TENSOR_FIELDS}
        return LayerStatistics(num_tokens=meta["num_tokens"], residual_sq_mean=meta["residual_sq_mean"][idx], **fields)

    def writer(self, num_layers: int, calibration: dict) -> StatisticsCacheWriter:
        return StatisticsCacheWriter(self, num_layers, calibration)


class StatisticsCacheWriter:
    """Writes a new entry layer by layer; ``commit`` makes it visible, ``abort`` discards it."""

    def __init__(self, cache: StatisticsCache, num_layers: int, calibration: dict):
        os.makedirs(cache.directory, exist_ok=True)
        self.cache, self.num_layers, self.calibration = cache, num_layers, calibration
        self.tmp = partial_dir(cache.directory, "a3-stats")
        self.residual_sq_mean: list[float] = []
        self.num_tokens = None
        self.flags = {}

    def add(self, idx: int, stats: LayerStatistics) -> None:
        tensors = {name: getattr(stats, name).contiguous() for name in _TENSOR_FIELDS if getattr(stats, name) is not None}
        save_file(tensors, os.path.join(self.tmp, f"layer-{idx:05d}.safetensors"))
        self.residual_sq_mean.append(stats.residual_sq_mean)
        self.num_tokens = stats.num_tokens
        self.flags = {name: getattr(stats, name) is not None for name in ("head_output_autocorr", "down_input_autocorr")}

    def commit(self) -> None:
        if len(self.residual_sq_mean) != self.num_layers:
            raise RuntimeError(f"statistics cache: {len(self.residual_sq_mean)} of {self.num_layers} layers written")
        meta = {"num_layers": self.num_layers, "num_tokens": self.num_tokens, "residual_sq_mean": self.residual_sq_mean,
                "calibration": self.calibration, "library_version": __version__, **self.flags}
        with open(os.path.join(self.tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(self.cache.path):  # an entry with fewer statistics: replace it
            shutil.rmtree(self.cache.path)
        os.rename(self.tmp, self.cache.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
