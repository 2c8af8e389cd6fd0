"""``A3Config``: what to compress, by how much, and with which calibration data."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

from .math.budget import DIM_FIELDS, LayerDims, uniform_dims
from .errors import A3Error
from .math.linalg import DEFAULT_EIG_FLOOR

COMPONENTS = ("qk", "ov", "mlp")
DimSpec = int | list[int] | None


class A3ConfigError(A3Error, ValueError):
    """An invalid A3 configuration or a configuration that does not fit the model."""


@dataclass
class A3Config:
    """Configuration of an A3 compression run (serialisable with ``to_dict`` / ``from_dict``).

    Args:
        ratio: uniform compression ratio ρ in [0, 1): fraction of every decoder projection removed
            (method page §7). Ignored for a component whose dim is given explicitly.
        head_dim_qk / head_dim_vo / intermediate_size: explicit target dims, an int for every layer or
            one per layer (a list).
        components: which components to compress, a subset of ``("qk", "ov", "mlp")``.
        dataset: calibration text: a list of strings, ``"wikipedia-offline"`` (the offline default), a local
            ``.txt/.jsonl/.json/.parquet`` path, ``"hub:NAME[:CONFIG[:SPLIT]]"`` or a dict for ``datasets``.
        nsamples / seqlen: number and length (tokens) of calibration windows.
        seed: seed of the window sampling (and of anything random in the run).
        batch_size: calibration windows per forward pass.
        eig_floor: relative eigenvalue floor for PSD roots (``floor · max eigenvalue``).
        device: device for the per-layer calibration forward and the solvers (default: the model's).
        method: ``"default"`` (sequential calibration, the mixed allocation priced cheaply: 64 probe tokens,
            a first pass on one window, and ``mlp_refit`` on every 4th token; the lowest perplexity measured
            within 1.5x the calibration forward's time, see README, Results) or ``"paper"`` (uniform dims, no
            refit, statistics of the original model: reproduces the paper) or ``"quality"`` (sequential
            calibration, ``teacher_refit`` and the mixed allocation priced on 1024 probe tokens after a first
            pass on every window: the lowest perplexity measured, for several times its time). Options left at
            ``None`` take the method's value. The methods' mixed allocation becomes uniform where explicit dims
            are given, and ``method="default"``'s where the model is layer-streamed (``compress_checkpoint``),
            with a warning.
        allocation: ``"uniform"`` (§7: same dims in every layer) or ``"mixed"`` (per-layer, per-component
            dims under the same parameter budget: a first pass takes the original model's statistics, each
            layer's components are priced by their analytical error curves scaled by their measured effect on
            the output, see ``sensitivity_tokens``, and a greedy spends the budget where it costs least).
            With sequential calibration the layers are then compressed in a second, sequential pass.
        sensitivity_tokens: ``allocation="mixed"`` only. Calibration tokens (a prefix of the first window, or
            the first windows when one does not hold them) on which the KL divergence of the next-token
            distribution is measured with each layer's each component compressed alone to its uniform dim
            (one probe per layer and component, each running the rest of the model from that layer on).
            ``0``: the analytical errors alone, each component normalized by its own total (cheaper, and
            measured worse than uniform on SmolLM2). Needs the whole model in memory (``compress``, not
            ``compress_checkpoint``). The method's value: 64 in ``"default"``, 1024 in ``"quality"``. On
            SmolLM2 64 to 2048 tokens gave about the same perplexity (README, Beyond the paper); the
            probes' time grows with the tokens.
        cap_kv_dims: ``allocation="mixed"`` only. Keep every layer's q/k and v/o head dims at most the
            uniform ones, so the KV cache is at most the uniform model's (the parameters still move between
            layers and into the MLPs). Off by default: on SmolLM2 at 20% the uncapped mixed allocation grows
            attention (KV cache 0.97x dense); capping it cost 4.7% perplexity (README, Beyond the paper).
        max_dim_factor: ``allocation="mixed"`` only. Keep every dim within this factor of its uniform dim
            (``uniform / f`` to ``uniform * f``): a trust region around the uniform allocation, whose probes
            price the dims near uniform only. ``None``: no bound. On SmolLM2 the default 1.5 made the mixed
            allocation better than uniform at 30% with sequential calibration (unbounded it was worse on
            WikiText-2), for a smaller gain at 20% (README, Beyond the paper).
        allocation_windows: ``allocation="mixed"`` with sequential calibration only. The first pass, whose
            statistics only price the dims (the sequential pass then calibrates every layer again), takes the
            first this many calibration windows (at least one per process under ``torchrun``); ``0``: all of
            them. The method's value: 1 in ``"default"``, 0 in ``"quality"``. On SmolLM2 one window priced the
            dims as well as all of them (README, Beyond the paper), for a 16th of that pass's time.
        mlp_refit: least-squares refit of down_proj after channel selection (method page §6), so that the
            kept channels give the original MLP's output. On in ``method="default"`` (off where ``teacher_refit``
            is asked for: that refits down_proj instead). Its statistic R_d is intermediate-sized: float32
            products summed in float64, on every ``refit_stride``-th token with sequential calibration, it costs
            about 0.1x the calibration forward in the default on SmolLM2 (0.5x in float64 on every token).
        refit_damping: relative damping of that refit.
        refit_stride: ``mlp_refit`` with sequential calibration only. R_d, the refit's intermediate-sized
            statistic, takes every this many-th calibration token (its cost falls by this factor; the channel
            selection's statistic takes every token). The method's value: 4 in ``"default"`` (on SmolLM2 at
            20%, 1 -> 4 cost 2% perplexity and saved about 0.15x the calibration forward; README, Results),
            lowered at run time until R_d samples 8 tokens per MLP channel (fewer made the refit hurt), 1
            otherwise (and wherever the statistics are the original model's, which a cache may keep). A
            value you give is kept; with fewer than 4 sampled tokens per channel the refit is skipped.
        sequential: take layer l's statistics from the model being compressed (method page §6) instead
            of the original model (the paper): its attention statistics on the output of the compressed
            layers < l, its MLP statistics on the output of its compressed attention.
        hold_mlp_intermediate: sequential calibration only. ``True`` holds each layer's original gate/up
            output (tokens x intermediate_size values in the model's dtype) so that the compressed MLP runs
            only its down_proj: 0.2-0.4 calibration forwards faster (README). ``False`` runs the whole compressed
            MLP instead and holds nothing, for models whose intermediate would not fit (a 70B Llama at
            128 x 2048 tokens holds about 15 GB). Both give the same model.

        teacher_refit: sequential calibration only. Also carry the ORIGINAL model's residual stream (one more
            original layer forward per layer) and refit o_proj and down_proj by least squares so that each
            compressed layer, fed the compressed model's own inputs, gives the original model's outputs for
            the same tokens: it corrects the error built up upstream. On in ``method="quality"``.
        teacher_damping: ridge of that refit towards the closed-form weights, relative to the mean diagonal
            of its Gram matrix (ratio 0 stays exact at any value). 1.0 measured best of 1e-4..1.0 on
            WikiText-2 (README); small values fit the calibration text's distribution too closely.

    Types are checked when the config is built, so that a wrong one fails at once with
    :class:`A3ConfigError`, not after a calibration run, and the record saved in ``config.json`` holds
    plain JSON numbers. Numbers of any Python or NumPy type are accepted and stored as ``float`` / ``int``:
    a NumPy float as the decimal it prints as (``np.float32(0.2)`` -> ``0.2``, not ``0.20000000298...``);
    an integer field (``nsamples``, ``seqlen``, ``batch_size``, ``seed``, the dims) also takes a float
    with an integral value (``4.0`` -> ``4``). Refused: strings (``"0.2"``, ``"4"``: a number that
    arrives as text usually means a parsing step was skipped, and ``"0,2"`` or ``"20%"`` would be
    guesses), bools, non-integral counts (``nsamples=2.5``) and non-finite values.
    """

    ratio: float | None = None
    head_dim_qk: DimSpec = None
    head_dim_vo: DimSpec = None
    intermediate_size: DimSpec = None
    components: tuple[str, ...] = COMPONENTS
    dataset: Any = "wikipedia-offline"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    eig_floor: float = DEFAULT_EIG_FLOOR
    device: str | None = None
    method: str = "default"
    allocation: str | None = None
    mlp_refit: bool | None = None
    refit_damping: float = 1e-6
    sequential: bool | None = None
    hold_mlp_intermediate: bool = True
    teacher_refit: bool | None = None
    teacher_damping: float = 1.0
    sensitivity_tokens: int | None = None
    cap_kv_dims: bool = False
    max_dim_factor: float | None = 1.5
    allocation_windows: int | None = None
    refit_stride: int | None = None

    def __post_init__(self):
        self._coerce_types()
        if self.method not in METHODS:
            raise A3ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        # Which options the method filled in (not a field: ``replace`` and records treat them as given).
        self._from_method = frozenset(name for name in METHODS[self.method] if getattr(self, name) is None)
        for name, value in METHODS[self.method].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif self.method == "paper" and name in _PAPER_FIXED and getattr(self, name) != value:
                raise A3ConfigError(f"method='paper' means {name}={value!r}; use method='default' to change it")
        if self.allocation not in ("uniform", "mixed"):
            raise A3ConfigError(f"allocation must be 'uniform' or 'mixed', got {self.allocation!r}")
        self.components = tuple(self.components)
        unknown = set(self.components) - set(COMPONENTS)
        if unknown or not self.components:
            raise A3ConfigError(f"components must be a non-empty subset of {COMPONENTS}, got {self.components}")
        if "allocation" in self._from_method and self.allocation == "mixed" and not self._ratio_to_distribute():
            self.allocation = "uniform"  # explicit dims are the caller's allocation
        if "mlp_refit" in self._from_method and self.teacher_refit:
            self.mlp_refit = False  # an asked-for teacher refit replaces the method's refit of down_proj
        if "refit_stride" in self._from_method and not self.sequential:
            self.refit_stride = 1  # the original model's statistics (which a cache may keep) take every token
        if self.ratio is not None and not (0.0 <= float(self.ratio) < 1.0):
            raise A3ConfigError(f"ratio must be in [0, 1), got {self.ratio}")
        explicit = {c: getattr(self, n) for c, n in DIM_FIELDS.items()}
        for component in self.components:
            if self.ratio is None and explicit[component] is None:
                raise A3ConfigError(f"give a ratio or an explicit {DIM_FIELDS[component]} for component {component!r}")
        for name in DIM_FIELDS.values():
            for v in _as_list(getattr(self, name)):
                if v < 1:
                    raise A3ConfigError(f"{name} values must be integers >= 1, got {v!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise A3ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("hold_mlp_intermediate", "cap_kv_dims"):
            if not isinstance(getattr(self, name), bool):
                raise A3ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_dim_factor is not None and self.max_dim_factor < 1.0:
            raise A3ConfigError(f"max_dim_factor must be >= 1 (1 keeps the uniform dims), got {self.max_dim_factor}")
        if self.allocation_windows < 0:
            raise A3ConfigError(f"allocation_windows must be >= 0 (0: all windows), got {self.allocation_windows}")
        if self.refit_stride < 1:
            raise A3ConfigError(f"refit_stride must be >= 1 (1: every token), got {self.refit_stride}")
        if self.refit_stride > 1 and not self.sequential:
            raise A3ConfigError("refit_stride > 1 needs sequential calibration (the original model's statistics, "
                                "which a statistics cache may keep, take every token)")
        if self.sensitivity_tokens < 0:
            raise A3ConfigError(f"sensitivity_tokens must be >= 0, got {self.sensitivity_tokens}")
        if self.allocation == "mixed" and not self._ratio_to_distribute():
            raise A3ConfigError("allocation='mixed' distributes a ratio's budget: give a ratio and no explicit dims")
        if not (0.0 <= self.eig_floor < 1.0):
            raise A3ConfigError(f"eig_floor must be in [0, 1), got {self.eig_floor}")
        if self.refit_damping < 0.0:
            raise A3ConfigError(f"refit_damping must be >= 0, got {self.refit_damping}")
        if self.teacher_damping < 0.0:
            raise A3ConfigError(f"teacher_damping must be >= 0, got {self.teacher_damping}")
        if self.teacher_refit and not self.sequential:
            raise A3ConfigError("teacher_refit needs sequential calibration (its inputs are the compressed model's)")
        if self.teacher_refit and self.mlp_refit:
            raise A3ConfigError("teacher_refit and mlp_refit both refit down_proj: choose one")

    def _coerce_types(self) -> None:
        """Numbers to plain ``float``/``int``/``bool`` (see the class docstring); anything else is refused."""
        for name in _FLOAT_FIELDS:
            if getattr(self, name) is not None or name not in _OPTIONAL_FLOATS:
                setattr(self, name, _as_float(name, getattr(self, name)))
        for name in _INT_FIELDS:
            if getattr(self, name) is not None or name not in _OPTIONAL_INTS:
                setattr(self, name, _as_int(name, getattr(self, name)))
        for name in DIM_FIELDS.values():
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, [_as_int(name, v) for v in value])
            elif value is not None:
                setattr(self, name, _as_int(name, value))
        for name in _BOOL_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, _as_bool(name, getattr(self, name)))

    def _ratio_to_distribute(self) -> bool:
        """Whether a mixed allocation has something to distribute: a ratio, and no explicit dims."""
        return self.ratio is not None and all(getattr(self, DIM_FIELDS[c]) is None for c in self.components)

    @property
    def probes_whole_model(self) -> bool:
        """Whether the run measures sensitivity probes, which run the whole model (not layer-streamed)."""
        return self.allocation == "mixed" and self.sensitivity_tokens != 0

    @property
    def probes_by_default(self) -> bool:
        """Whether those probes come from ``method="default"`` rather than being asked for: a layer-streamed
        run (:meth:`for_layer_streaming`) uses uniform dims instead."""
        return self.probes_whole_model and self.method == "default" and "allocation" in self._from_method

    @property
    def refit_stride_adapts(self) -> bool:
        """Whether ``refit_stride`` is the method's, which a run lowers on a small calibration set (one you
        give is kept)."""
        return "refit_stride" in self._from_method

    def for_layer_streaming(self) -> A3Config:
        """The config a layer-streamed run uses: with :attr:`probes_by_default`, uniform dims (with a warning);
        else this config (an asked-for mixed allocation is refused by such a run)."""
        if not self.probes_by_default:
            return self
        warnings.warn("layer-streamed compression holds one decoder layer at a time, so method='default' uses "
                      "uniform dims instead of its mixed allocation, which probes the whole model (load the model "
                      "and call compress(), or pass allocation='uniform' to silence this)", stacklevel=4)
        return self.replaced(allocation="uniform")

    def replaced(self, **changes) -> A3Config:
        """A copy with ``changes`` in which the options the method filled in (and not changed) are still the
        method's, so they resolve and adapt as in this config (``dataclasses.replace`` would make them given)."""
        return dataclasses.replace(self, **{**{name: None for name in self._from_method}, **changes})

    # --------------------------------------------------------------------------------- dims
    def layer_dims(self, num_layers: int, head_dim: int, intermediate_size: int | list[int], rope: bool = True) -> list[LayerDims]:
        """Target dims of every layer; raises ``A3ConfigError`` when a dim does not fit the model."""
        originals = {
            "qk": [head_dim] * num_layers,
            "ov": [head_dim] * num_layers,
            "mlp": _expand(intermediate_size, num_layers, "intermediate_size"),
        }
        resolved = {}
        for component, name in DIM_FIELDS.items():
            explicit = getattr(self, name)
            if component not in self.components:
                resolved[component] = originals[component]
            elif explicit is not None:
                resolved[component] = _expand(explicit, num_layers, name)
            else:
                resolved[component] = [
                    getattr(uniform_dims(self.ratio, head_dim, orig, rope), name) for orig in originals[component]
                ]
            for layer, (value, orig) in enumerate(zip(resolved[component], originals[component])):
                if not 1 <= value <= orig:
                    raise A3ConfigError(f"{name}={value} at layer {layer} must be in [1, {orig}] (the original size)")
                if component == "qk" and rope and value % 2:
                    raise A3ConfigError(f"head_dim_qk={value} at layer {layer} must be even: RoPE keeps whole rotary pairs")
        return [LayerDims(*dims) for dims in zip(resolved["qk"], resolved["ov"], resolved["mlp"])]

    # --------------------------------------------------------------------------- serialise
    def to_dict(self) -> dict:
        """A JSON-serialisable dict (``from_dict`` inverts it)."""
        d = asdict(self)
        d["components"] = list(self.components)
        if isinstance(d["dataset"], tuple):
            d["dataset"] = list(d["dataset"])
        return d

    @classmethod
    def from_dict(cls, config_dict: dict) -> A3Config:
        """Build a config from ``to_dict`` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        if config_dict.get("extra", None) == {}:  # an unused field that records of version 0.1.0 hold
            config_dict = {k: v for k, v in config_dict.items() if k != "extra"}
        # Records made before these existed: unbounded allocations, first pass on all windows, 1024 probe tokens,
        # the refit's statistic on every token.
        for name, then in (("max_dim_factor", None), ("allocation_windows", 0), ("sensitivity_tokens", 1024),
                           ("refit_stride", 1)):
            if name not in config_dict:
                config_dict = {**config_dict, name: then}
        unknown = set(config_dict) - names
        if unknown:
            raise A3ConfigError(f"unknown A3Config keys: {sorted(unknown)}")
        return cls(**config_dict)


_FLOAT_FIELDS = ("ratio", "eig_floor", "refit_damping", "teacher_damping", "max_dim_factor")
_OPTIONAL_FLOATS = ("ratio", "max_dim_factor")  # None is a value of these
_INT_FIELDS = ("nsamples", "seqlen", "batch_size", "seed", "sensitivity_tokens", "allocation_windows",
               "refit_stride")
_OPTIONAL_INTS = ("sensitivity_tokens", "allocation_windows", "refit_stride")  # None: the method's value, left as is
# None (the method's value) is left as is.
_BOOL_FIELDS = ("mlp_refit", "sequential", "hold_mlp_intermediate", "teacher_refit", "cap_kv_dims")

# Presets: "paper" reproduces arXiv 2505.12942; "default" is the best measured within the time budget.
METHODS = {
    "paper": {"allocation": "uniform", "mlp_refit": False, "sequential": False, "teacher_refit": False,
              "sensitivity_tokens": 1024, "allocation_windows": 0, "refit_stride": 1},
    # Sequential calibration, the measured mixed allocation priced cheaply (64 probe tokens, a first pass on one
    # window) and the down_proj refit, its statistic R_d on every 4th token (float32 products): on SmolLM2 at 20%
    # the refit took the perplexity increase from 0.51x the paper's to 0.38x (40 WikiText-2 windows) for about
    # 0.15x more calibration forward (README, Results).
    "default": {"allocation": "mixed", "mlp_refit": True, "sequential": True, "teacher_refit": False,
                "sensitivity_tokens": 64, "allocation_windows": 1, "refit_stride": 4},
    # The lowest perplexity measured within ~5x the calibration forward: the teacher refit and the mixed
    # allocation priced by 1024-token probes after a first pass on every window (README, Results).
    "quality": {"allocation": "mixed", "mlp_refit": False, "sequential": True, "teacher_refit": True,
                "sensitivity_tokens": 1024, "allocation_windows": 0, "refit_stride": 1},
}
# What method="paper" fixes (the rest of its options only matter for allocations it does not make).
_PAPER_FIXED = ("allocation", "mlp_refit", "sequential", "teacher_refit")


def _as_list(value: DimSpec) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _expand(value: int | list[int], num_layers: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise A3ConfigError(f"{name} has {len(value)} entries but the model has {num_layers} layers")
        return list(value)
    return [value] * num_layers


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} ({type(value).__name__})"


def _is_bool(value: Any) -> bool:
    """A Python or NumPy bool (NumPy's is no ``bool`` subclass; importing NumPy is not needed to tell)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _as_float(name: str, value: Any) -> float:
    """A plain finite ``float`` from a Python or NumPy number; NumPy floats keep the decimal they print as."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise A3ConfigError(f"{name} must be a number, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        number = float(int(value))
    elif type(value).__module__ == "numpy":
        number = float(str(value))  # np.float32(0.2) prints as 0.2, its float() is 0.20000000298023224
    else:
        number = float(value)
    if not math.isfinite(number):
        raise A3ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def _as_int(name: str, value: Any) -> int:
    """A plain ``int`` from a Python or NumPy integer, or from a float with an integral value."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise A3ConfigError(f"{name} must be an integer, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(float(value)) or float(value) != int(float(value)):
        raise A3ConfigError(f"{name} must be an integer, got {value!r}")
    return int(float(value))


def _as_bool(name: str, value: Any) -> bool:
    if not _is_bool(value):
        raise A3ConfigError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)
