"""The records optimum-a3 writes into a checkpoint's ``config.json``, and the one place that reads and writes them.

* ``a3_compression`` (:class:`CompressionRecord`): how an A3 model was compressed (base model, ratio, dims,
  calibration, the A3 settings), with what the library counted or measured afterwards (``sizes``, ``recovery``,
  ``evaluation``). Written by :class:`~optimum_a3.A3Compressor`, extended by the CLI and
  :func:`~optimum_a3.integrations.recovery.recover`, read by the model card, the Hub push and recovery.
* ``a3_quantization`` (:class:`QuantizationRecord`): how a checkpoint was quantized, written by
  :func:`~optimum_a3.integrations.quantization.quantize_model` (and the CLI's evaluation), read back by
  :func:`~optimum_a3.integrations.quantization.load_quantized`, the loaders, the model card and the Hub push.

On a model's config a record stays a plain JSON dict (the remote-code ``A3LlamaConfig`` declares
``a3_compression: dict`` and must not import this package); the dataclasses are its typed, validated view:
:func:`compression_record` / :func:`quantization_record` read it from a config object or a ``config.json``
dict, :func:`set_compression_record` / :func:`set_quantization_record` write it back, and
``update_*_record(config, field=value)`` does both. ``to_dict()`` gives exactly the JSON the library has
always written (same keys, same order); ``from_dict()`` raises :class:`RecordError` naming the bad field of a
malformed record, and keeps keys it does not know (from a newer version) in ``extra``, written back last.

The nested parts (``dims``, ``calibration``, ``sizes``, ``evaluation``, ``recovery``, ``a3_config``) stay dicts:
their known keys are type-checked, other keys are kept as they are.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import A3Error
from ..version import __version__

COMPRESSION_KEY = "a3_compression"  # config.json key of the CompressionRecord
QUANTIZATION_KEY = "a3_quantization"  # config.json key of the QuantizationRecord
PAPER = "arXiv:2505.12942"
LIBRARY = "optimum-a3"


class RecordError(A3Error, ValueError):
    """A config's ``a3_compression`` / ``a3_quantization`` record is malformed (the message names the field)."""


# ---------------------------------------------------------------------------------------- type checks
_STR, _INT, _NUMBER, _BOOL, _MAPPING = "a string", "an integer", "a number", "true or false", "a JSON object"
_INT_LIST = "a list of integers"
_STR_LIST = "a list of strings"


def _is(value: Any, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _MAPPING:
        return isinstance(value, Mapping)
    if kind == _INT_LIST:
        return isinstance(value, (list, tuple)) and all(_is(v, _INT) for v in value)
    if kind == _STR_LIST:
        return isinstance(value, (list, tuple)) and all(_is(v, _STR) for v in value)
    raise AssertionError(kind)


def _check(key: str, name: str, value: Any, *kinds: str, nullable: bool = True) -> None:
    """Raise :class:`RecordError` unless ``value`` is one of ``kinds`` (or ``None`` if ``nullable``)."""
    if (value is None and nullable) or any(_is(value, kind) for kind in kinds):
        return
    expected = " or ".join(kinds) + (" or null" if nullable else "")
    raise RecordError(f"malformed {key} record: field {name!r} must be {expected}, got {value!r}")


def _check_parts(key: str, name: str, part: Mapping | None, schema: dict[str, tuple[str, ...]]) -> None:
    """Type-check the known keys of a nested dict (``name``); unknown keys are left alone."""
    if part is None:
        return
    for sub, kinds in schema.items():
        if sub in part:
            _check(key, f"{name}.{sub}", part[sub], *kinds)


def _pair(key: str, name: str, value: Any) -> None:
    """``[base, compressed]`` counts (either may be null)."""
    if value is None:
        return
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(v is None or _is(v, _INT) for v in value)):
        raise RecordError(f"malformed {key} record: field {name!r} must be a pair [base, compressed] of integers, "
                          f"got {value!r}")


_CALIBRATION = {"dataset": (_STR,), "nsamples": (_INT,), "seqlen": (_INT,), "tokens": (_INT,), "seed": (_INT,)}
_COMPRESSION_EVALUATION = {"source": (_STR,), "seqlen": (_INT,), "max_windows": (_INT,), "ppl_dense": (_NUMBER,),
                           "ppl_compressed": (_NUMBER,), "ppl_before_recovery": (_NUMBER,)}
_RECOVERY = {"method": (_STR,), "rank": (_INT,), "alpha": (_NUMBER,), "target_modules": (_STR_LIST,),
             "steps": (_INT,), "batch_size": (_INT,), "seqlen": (_INT,), "learning_rate": (_NUMBER,),
             "dataset": (_STR,), "tokens": (_INT,), "seed": (_INT,), "autocast_dtype": (_STR,),
             "loss_first_steps": (_NUMBER,), "loss_last_steps": (_NUMBER,), "peft_version": (_STR,),
             "objective": (_STR,), "teacher": (_STR,), "temperature": (_NUMBER,)}
_SIZE_PAIRS = ("decoder_linear_params", "total_params", "kv_cache_bytes_per_token")
_QUANTIZATION_EVALUATION = {"source": (_STR,), "seqlen": (_INT,), "max_windows": (_INT,), "ppl": (_NUMBER,)}


# -------------------------------------------------------------------------------------------- records
class _Record:
    """Shared ``to_dict`` / ``from_dict`` of the two records (dataclasses with an ``extra`` dict)."""

    KEY: ClassVar[str]
    REQUIRED: ClassVar[tuple[str, ...]]  # from_dict refuses a record without them
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]]  # written only when set (the others are written as null)

    def to_dict(self) -> dict[str, Any]:
        """The record as written to ``config.json``: the fields in order, then the ``extra`` keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in self.OMITTED_WHEN_NONE):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, record: Any):
        """Parse (a deep copy of) a record read from a config; :class:`RecordError` names a bad field."""
        if not isinstance(record, Mapping):
            raise RecordError(f"malformed {cls.KEY} record: it must be a JSON object, got {type(record).__name__}")
        missing = [name for name in cls.REQUIRED if name not in record]
        if missing:
            raise RecordError(f"malformed {cls.KEY} record: field {missing[0]!r} is missing")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in record.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in record.items() if k not in names}
        absent = {name: None for name in names - set(known)}  # None, not the defaults of a new record
        return cls(**absent, **known, extra=extra)

    def _check_extra(self) -> None:
        if not isinstance(self.extra, Mapping):
            raise RecordError(f"{self.KEY} record: extra must be a dict, got {type(self.extra).__name__}")
        clash = set(self.extra) & ({f.name for f in dataclasses.fields(self)} - {"extra"})
        if clash:
            raise RecordError(f"{self.KEY} record: extra repeats the field(s) {sorted(clash)}")


@dataclass(kw_only=True)
class CompressionRecord(_Record):
    """``config.a3_compression``: how an A3 model was made. Fields, in their ``config.json`` order:

    Args:
        method: ``"a3"``.
        paper / library / library_version: ``"arXiv:2505.12942"``, ``"optimum-a3"`` and its version.
        base_model: the base model's ``_name_or_path`` (Hub id or local path), ``None`` if unknown.
        base_model_type: the base model's ``model_type``.
        ratio: the uniform compression ratio (``None`` with explicit dims).
        preset: the ``A3Config.method`` (``"default"`` or ``"paper"``).
        allocation / mlp_refit / sequential: the effective A3 settings (``"uniform"``/``"mixed"``, bools).
        components: the compressed components (``"qk"``, ``"ov"``, ``"mlp"``).
        dims: ``{"head_dim_qk": [...], "head_dim_vo": [...], "intermediate_size": [...]}``, one per layer.
        calibration: ``dataset`` (a description, never the text), ``nsamples``, ``seqlen``, ``tokens``, ``seed``.
        a3_config: ``A3Config.to_dict()`` (its ``dataset`` replaced by the description).
        sizes: ``[base, compressed]`` counts counted on both models: ``decoder_linear_params``, ``total_params``,
            ``kv_cache_bytes_per_token``.
        recovery: the recovery fine-tune's settings and losses (:mod:`optimum_a3.integrations.recovery`).
        evaluation: measured perplexity: ``source``, ``seqlen``, ``max_windows``, ``ppl_dense``,
            ``ppl_compressed`` (``ppl_before_recovery`` after a recovery).
        extra: keys this version does not know (a newer version's, or a user's such as ``license``), kept.

    ``preset``, ``allocation``, ``mlp_refit``, ``sequential`` (absent from the first records), ``sizes``,
    ``recovery`` and ``evaluation`` are written only when set; the other fields always (``null`` if ``None``).
    ``method``, ``components``, ``dims`` and ``calibration`` are required.
    """

    KEY: ClassVar[str] = COMPRESSION_KEY
    REQUIRED: ClassVar[tuple[str, ...]] = ("method", "components", "dims", "calibration")
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("preset", "allocation", "mlp_refit", "sequential", "sizes",
                                                    "recovery", "evaluation")

    method: str = "a3"
    paper: str | None = PAPER
    library: str | None = LIBRARY
    library_version: str | None = __version__
    base_model: str | None = None
    base_model_type: str | None = None
    ratio: float | None = None
    preset: str | None = None
    allocation: str | None = None
    mlp_refit: bool | None = None
    sequential: bool | None = None
    components: list[str]
    dims: dict[str, list[int]]
    calibration: dict[str, Any]
    a3_config: dict[str, Any] | None = None
    sizes: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        key = self.KEY
        _check(key, "method", self.method, _STR, nullable=False)
        for name in ("paper", "library", "library_version", "base_model", "base_model_type", "preset", "allocation"):
            _check(key, name, getattr(self, name), _STR)
        _check(key, "ratio", self.ratio, _NUMBER)
        _check(key, "mlp_refit", self.mlp_refit, _BOOL)
        _check(key, "sequential", self.sequential, _BOOL)
        _check(key, "components", self.components, _STR_LIST, nullable=False)
        for name in ("dims", "calibration"):
            _check(key, name, getattr(self, name), _MAPPING, nullable=False)
        for name in ("a3_config", "sizes", "recovery", "evaluation"):
            _check(key, name, getattr(self, name), _MAPPING)
        for name, value in self.dims.items():
            _check(key, f"dims.{name}", value, _INT, _INT_LIST)
        _check_parts(key, "calibration", self.calibration, _CALIBRATION)
        if self.sizes is not None:
            for name in _SIZE_PAIRS:
                _pair(key, f"sizes.{name}", self.sizes.get(name))
            _check(key, "sizes.base_intermediate_size", self.sizes.get("base_intermediate_size"), _INT, _INT_LIST)
        _check_parts(key, "recovery", self.recovery, _RECOVERY)
        _check_parts(key, "evaluation", self.evaluation, _COMPRESSION_EVALUATION)
        self._check_extra()


@dataclass(kw_only=True)
class QuantizationRecord(_Record):
    """``config.a3_quantization``: how a checkpoint was quantized (:mod:`optimum_a3.integrations.quantization`). Fields:

    Args:
        backend: ``"hqq"`` or ``"quanto"`` (required).
        bits: weight bits.
        requested_group_size: the group size asked for (hqq; ``None`` for quanto, which picks its own).
        axis: hqq's grouping axis (``None`` for quanto).
        skip: linear layers kept unquantized (module-name suffixes).
        group_sizes: how many quantized layers use each group size (``"per-channel"``: one scale per row).
        dtype: the dtype the model computes in (and caches keys/values in).
        library_version: the backend library's version.
        evaluation: measured perplexity after quantization: ``source``, ``seqlen``, ``max_windows``, ``ppl``.
        extra: keys this version does not know, kept.

    Every field but ``evaluation`` is always written (``null`` if ``None``); a record without them (only
    ``backend``) still parses.
    """

    KEY: ClassVar[str] = QUANTIZATION_KEY
    REQUIRED: ClassVar[tuple[str, ...]] = ("backend",)
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("evaluation",)

    backend: str
    bits: int | None = None
    requested_group_size: int | None = None
    axis: int | None = None
    skip: list[str] | None = None
    group_sizes: dict[str, int] | None = None
    dtype: str | None = None
    library_version: str | None = None
    evaluation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        key = self.KEY
        _check(key, "backend", self.backend, _STR, nullable=False)
        for name in ("bits", "requested_group_size", "axis"):
            _check(key, name, getattr(self, name), _INT)
        _check(key, "skip", self.skip, _STR_LIST)
        _check(key, "group_sizes", self.group_sizes, _MAPPING)
        for size, count in (self.group_sizes or {}).items():
            _check(key, f"group_sizes.{size}", count, _INT, nullable=False)
        _check(key, "dtype", self.dtype, _STR)
        _check(key, "library_version", self.library_version, _STR)
        _check(key, "evaluation", self.evaluation, _MAPPING)
        _check_parts(key, "evaluation", self.evaluation, _QUANTIZATION_EVALUATION)
        self._check_extra()


# ------------------------------------------------------------------------------- on a model's config
def _raw(config: Any, key: str) -> Any:
    """The record as stored: ``config[key]`` of a ``config.json`` dict, else the config object's attribute."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _store(config: Any, key: str, record: _Record | None) -> None:
    value = None if record is None else record.to_dict()
    if isinstance(config, dict):
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    else:
        setattr(config, key, value)


def compression_record(config: Any) -> CompressionRecord | None:
    """The ``a3_compression`` record of a config (object or ``config.json`` dict); ``None`` if it has none.

    Raises :class:`RecordError` (naming the field) if the record is malformed."""
    raw = _raw(config, COMPRESSION_KEY)
    return None if raw is None else CompressionRecord.from_dict(raw)


def quantization_record(config: Any) -> QuantizationRecord | None:
    """The ``a3_quantization`` record of a config (object or ``config.json`` dict); ``None`` if it has none.

    Raises :class:`RecordError` (naming the field) if the record is malformed."""
    raw = _raw(config, QUANTIZATION_KEY)
    return None if raw is None else QuantizationRecord.from_dict(raw)


def set_compression_record(config: Any, record: CompressionRecord | None) -> None:
    """Write ``record`` (``to_dict()``) as the config's ``a3_compression``; ``None`` removes it (sets it to
    ``None`` on a config object)."""
    _store(config, COMPRESSION_KEY, record)


def set_quantization_record(config: Any, record: QuantizationRecord | None) -> None:
    """Write ``record`` (``to_dict()``) as the config's ``a3_quantization``; ``None`` removes it (sets it to
    ``None`` on a config object)."""
    _store(config, QUANTIZATION_KEY, record)


def update_compression_record(config: Any, **changes) -> CompressionRecord:
    """Replace fields of the config's ``a3_compression`` record (e.g. ``evaluation={...}``), write it back and
    return it. :class:`RecordError` if the config has no record or a change has the wrong type."""
    return _update(config, compression_record(config), COMPRESSION_KEY, changes)


def update_quantization_record(config: Any, **changes) -> QuantizationRecord:
    """Replace fields of the config's ``a3_quantization`` record (e.g. ``evaluation={...}``), write it back and
    return it. :class:`RecordError` if the config has no record or a change has the wrong type."""
    return _update(config, quantization_record(config), QUANTIZATION_KEY, changes)


def _update(config: Any, record, key: str, changes: dict):
    if record is None:
        raise RecordError(f"the config has no {key} record to update")
    record = dataclasses.replace(record, **changes)
    _store(config, key, record)
    return record


__all__ = ["COMPRESSION_KEY", "QUANTIZATION_KEY", "CompressionRecord", "QuantizationRecord", "RecordError",
           "compression_record", "quantization_record", "set_compression_record", "set_quantization_record",
           "update_compression_record", "update_quantization_record"]
