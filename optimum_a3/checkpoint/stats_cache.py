"""On-disk cache of calibration statistics, so that compressing again (another ratio, other dims) skips
the calibration forward.

An entry is a directory ``a3-stats-<key>`` under the cache directory, one safetensors file per decoder
layer plus ``meta.json``.

What an entry must match. The statistics of layer ``l`` depend on the model config, the calibration
token ids, the input embeddings and the weights of decoder layers ``0..l`` (not on the final norm or
lm_head). The key hashes the config, the token ids, the embeddings (with their dtype), the library
version and the entry format. The decoder layers cannot be in the key without a pass over the whole
model before calibration, so ``meta.json`` records per layer a chained digest instead,
``digest_l = sha256(digest_{l-1} || layer l's tensors)`` (:class:`LayerDigestChain`): the compressor
feeds each layer as it reads it for solving, and on a cache hit :meth:`StatisticsCache.check_weights`
compares; the first mismatch means the entry belongs to another model.

How an entry is verified. ``meta.json`` must parse and hold every field; each layer file must match the
sha256 recorded in ``meta.json`` and hold finite statistics (the check fresh statistics pass). Any
failure warns (:class:`StatisticsCacheWarning`, naming the entry and the file), deletes the entry and
raises :class:`StaleCacheEntry`, on which the compressor starts again and recomputes the statistics.

Writing. An entry is written under a temporary name and renamed when complete, so an interrupted run
never leaves a half entry behind; if another writer has published an entry with every statistic of ours
meanwhile, theirs is kept and ours dropped. Statistics collected for refit (the large ``down_proj``
autocorrelation) also serve runs without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import A3Error
from .saving import partial_dir
from ..pipeline.statistics import LayerStatistics, NonFiniteStatisticsError
from ..version import __version__

_TENSOR_FIELDS = ("attn_input_autocorr", "down_input_sq_mean", "head_output_autocorr", "down_input_autocorr",
                  "attn_input_mean")
_ALWAYS_STORED = ("attn_input_autocorr", "down_input_sq_mean", "attn_input_mean")
_OPTIONAL_FIELDS = ("head_output_autocorr", "down_input_autocorr")  # meta.json says whether an entry has them
META_FILE = "meta.json"
ENTRY_FORMAT = "a3-stats-v2"  # in the key: entries of an older layout are never read


class StatisticsCacheWarning(UserWarning):
    """A cache entry could not be used (damaged, or another model's): it is deleted, statistics recomputed."""


class StaleCacheEntry(Exception):
    """A cache entry turned out unusable while being read; it has been warned about and deleted, and the
    compression must start again without it."""


class StaleStatisticsCache(A3Error, RuntimeError):
    """Under torchrun: a cache entry turned out unusable mid-way (deleted, with a warning); the run stops
    instead of starting again, which the other ranks could not follow."""


def statistics_key(config: dict, weight_digest: str, calibration_ids: torch.Tensor) -> str:
    """Hex key of the statistics of a model on some calibration token ids: its config, ``weight_digest``
    (of the embeddings; the decoder layers are checked per entry, see the module docstring), the ids,
    the library version and the entry format."""
    h = hashlib.sha256()
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(weight_digest.encode())
    ids = torch.as_tensor(calibration_ids, dtype=torch.int64).contiguous()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    h.update(__version__.encode())
    h.update(ENTRY_FORMAT.encode())
    return h.hexdigest()[:24]


def tensor_digest(tensors: dict[str, torch.Tensor], previous: str = "") -> str:
    """sha256 of ``previous`` followed by ``tensors`` (name, dtype, shape and bytes of each, by name)."""
    h = hashlib.sha256(previous.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bfloat16 too)
    return h.hexdigest()


class LayerDigestChain:
    """Chained digests of the decoder layers, fed in order as each is read for solving:
    ``digest_l = sha256(digest_{l-1} || layer l's tensors)``, so ``digest_l`` names layers ``0..l``."""

    def __init__(self):
        self.digest = ""

    def add(self, layer: nn.Module) -> str:
        """Feed the next layer; returns its chained digest."""
        self.digest = tensor_digest(layer.state_dict(), previous=self.digest)
        return self.digest


def _layer_file(idx: int) -> str:
    return f"layer-{idx:05d}.safetensors"


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):  # in blocks: a layer's file may be gigabytes
            h.update(block)
    return h.hexdigest()


def _meta_is_well_formed(meta) -> bool:
    """Whether a parsed meta.json has every field this module reads, of the right type and length."""
    try:
        n = meta["num_layers"]
        return (isinstance(n, int) and isinstance(meta["num_tokens"], int) and meta["num_tokens"] > 0
                and all(isinstance(meta[flag], bool) for flag in _OPTIONAL_FIELDS)
                and len(meta["residual_sq_mean"]) == n == len(meta["layers"])
                and all(isinstance(x, (int, float)) for x in meta["residual_sq_mean"])
                and all(isinstance(layer["sha256"], str) and isinstance(layer["weights"], str)
                        for layer in meta["layers"]))
    except (KeyError, TypeError, IndexError):
        return False


class StatisticsCache:
    """One cache entry (may not exist yet). What is read from it is checked (module docstring); an entry
    that fails a check is deleted with a :class:`StatisticsCacheWarning`."""

    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.path = os.path.join(directory, f"a3-stats-{key}")
        self._meta: dict | None = None  # of the entry being read, set by covers()

    def meta(self) -> dict | None:
        """The entry's ``meta.json``, None when there is no entry; raises :class:`StaleCacheEntry` (after
        warning and deleting the entry) when it is missing from an entry, unreadable or malformed."""
        if not os.path.isdir(self.path):
            return None
        try:
            with open(os.path.join(self.path, META_FILE)) as f:
                meta = json.load(f)
        except FileNotFoundError:
            self._reject(META_FILE, "is missing")
        except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
            self._reject(META_FILE, f"is unreadable ({e})")
        if not _meta_is_well_formed(meta):
            self._reject(META_FILE, "lacks fields or has malformed ones")
        return meta

    def covers(self, num_layers: int, want_head_autocorr: bool, want_down_autocorr: bool) -> bool:
        """True when a complete entry holds every statistic this run needs (a damaged one is deleted and
        does not); the layers are then read with :meth:`load` and :meth:`check_weights`."""
        try:
            meta = self.meta()
        except StaleCacheEntry:
            return False
        if not meta or meta["num_layers"] != num_layers or (want_head_autocorr and not meta["head_output_autocorr"]) \
                or (want_down_autocorr and not meta["down_input_autocorr"]):
            return False
        self._meta = meta
        return True

    def load(self, idx: int) -> LayerStatistics:
        """Layer ``idx``'s statistics, once their file matches its sha256 and their values are finite;
        else raises :class:`StaleCacheEntry` (after warning and deleting the entry)."""
        meta, name = self._meta, _layer_file(idx)
        path = os.path.join(self.path, name)
        try:
            if _file_sha256(path) != meta["layers"][idx]["sha256"]:
                self._reject(name, "does not match its sha256 in meta.json (corrupted or edited)")
            tensors = load_file(path)
        except FileNotFoundError:
            self._reject(name, "is missing")
        except (OSError, SafetensorError) as e:
            self._reject(name, f"is unreadable ({e})")
        wanted = _ALWAYS_STORED + tuple(field for field in _OPTIONAL_FIELDS if meta[field])
        missing = [field for field in wanted if field not in tensors]
        if missing:
            self._reject(name, f"lacks {', '.join(missing)}")
        stats = LayerStatistics(num_tokens=meta["num_tokens"], residual_sq_mean=meta["residual_sq_mean"][idx],
                                **{field: tensors.get(field) for field in _TENSOR_FIELDS})
        try:
            stats.check_finite(idx)
        except NonFiniteStatisticsError as e:
            self._reject(name, f"holds non-finite values ({e})")
        return stats

    def check_weights(self, idx: int, weights_digest: str) -> None:
        """Raise :class:`StaleCacheEntry` (after warning and deleting the entry) unless the entry was
        computed from these decoder layers ``0..idx`` (``weights_digest`` from a :class:`LayerDigestChain`)."""
        if weights_digest != self._meta["layers"][idx]["weights"]:
            self._reject(None, f"was computed for another model (decoder layer {idx}'s weights differ)")

    def delete(self) -> None:
        """Remove the entry, moved out of sight first in one rename so that no half-deleted entry is visible
        (a kill during the removal leaves a partial directory that the next writer cleans up)."""
        if not os.path.isdir(self.path):
            return
        trash = partial_dir(self.directory, "a3-stats")
        try:
            os.rename(self.path, os.path.join(trash, "entry"))
        except FileNotFoundError:
            pass  # another process removed it meanwhile
        shutil.rmtree(trash, ignore_errors=True)

    def _reject(self, file: str | None, problem: str) -> NoReturn:
        what = problem if file is None else f"{file} {problem}"
        message = f"statistics cache entry {self.path}: {what}; deleting the entry and recomputing the statistics"
        warnings.warn(message, StatisticsCacheWarning, stacklevel=2)
        self.delete()
        raise StaleCacheEntry(message)

    def writer(self, num_layers: int, calibration: dict) -> StatisticsCacheWriter:
        return StatisticsCacheWriter(self, num_layers, calibration)


class StatisticsCacheWriter:
    """Writes a new entry layer by layer; ``commit`` makes it visible, ``abort`` discards it."""

    def __init__(self, cache: StatisticsCache, num_layers: int, calibration: dict):
        os.makedirs(cache.directory, exist_ok=True)
        self.cache, self.num_layers, self.calibration = cache, num_layers, calibration
        self.tmp = partial_dir(cache.directory, "a3-stats")
        self.residual_sq_mean: list[float] = []
        self.layers: list[dict[str, str]] = []  # per layer: sha256 of its file, chained digest of the weights
        self.num_tokens = None
        self.flags = {}

    def add(self, idx: int, stats: LayerStatistics, weights_digest: str) -> None:
        """Write layer ``idx``'s statistics (layers come in order); ``weights_digest`` is the
        :class:`LayerDigestChain` digest of the weights they were computed from."""
        tensors = {name: getattr(stats, name).contiguous() for name in _TENSOR_FIELDS if getattr(stats, name) is not None}
        path = os.path.join(self.tmp, _layer_file(idx))
        save_file(tensors, path)
        self.layers.append({"sha256": _file_sha256(path), "weights": weights_digest})
        self.residual_sq_mean.append(stats.residual_sq_mean)
        self.num_tokens = stats.num_tokens
        self.flags = {name: getattr(stats, name) is not None for name in _OPTIONAL_FIELDS}

    def commit(self) -> None:
        """Write ``meta.json`` and publish the entry (see :meth:`_publish`)."""
        if len(self.residual_sq_mean) != self.num_layers:
            raise RuntimeError(f"statistics cache: {len(self.residual_sq_mean)} of {self.num_layers} layers written")
        meta = {"num_layers": self.num_layers, "num_tokens": self.num_tokens, "residual_sq_mean": self.residual_sq_mean,
                "layers": self.layers, "calibration": self.calibration, "library_version": __version__, **self.flags}
        with open(os.path.join(self.tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        self._publish()

    def _publish(self) -> None:
        """Rename the entry into place. An entry published meanwhile by another writer with every statistic
        of ours wins and ours is dropped; one with fewer statistics (or a damaged one) is replaced."""
        cache = self.cache
        if cache.covers(self.num_layers, self.flags["head_output_autocorr"], self.flags["down_input_autocorr"]):
            self.abort()
            return
        cache.delete()
        try:
            os.rename(self.tmp, cache.path)
        except OSError:
            if not os.path.isdir(cache.path):
                raise
            self.abort()  # another writer published between the delete and our rename: keep theirs

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
