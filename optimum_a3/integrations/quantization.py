"""Weight-only quantization of A3 (or dense) causal LMs with maintained libraries, saved and reloaded.

Two backends, both running on CPU (measured with transformers 5.24, torch 2.13 CPU):

* ``"hqq"`` (default): Half-Quadratic Quantization from the ``hqq`` package (``AutoHQQHFModel``), no
  calibration data, 1/2/3/4/8 bits with any group size dividing the weight (default 4-bit, group 64 as
  in the A3 paper, grouped along ``axis=0`` so that A3's odd widths pack). Saved in hqq's format
  (``qmodel.pt``, loaded with ``torch.load(weights_only=True)``).
* ``"quanto"``: ``optimum-quanto`` (``QuantizedModelForCausalLM``), int2/int4/int8 weights, saved as
  safetensors plus ``quanto_qmap.json``. quanto picks the group size itself (128, else 96/64 when it
  divides the layer's input width, else one scale per output channel) and does not let it be set.
  Its 4-bit layers fail under ``torch.inference_mode`` on CPU (optimum-quanto issue #304): run them
  under ``torch.no_grad``, or wrap library code that uses inference mode in :func:`inference_mode_as_no_grad`.

Both replace every ``nn.Linear`` of the decoder (A3's reduced q/k/v/o and MLP projections included) and
keep ``lm_head`` in 16/32-bit by default. Quantization happens in place, in the model's dtype; the
checkpoint keeps that dtype (neither library can change it afterwards), so quantize a bf16/fp16 model
to ship 16-bit scales and embeddings.

Why not transformers' own integrations (5.24): ``from_pretrained(..., quantization_config=HqqConfig())``
raises ``NotImplementedError: QuantizationMethod.HQQ is not available yet`` on any device, and loading an
HQQ checkpoint with ``from_pretrained`` silently re-initialises the quantized weights;
``QuantoConfig`` quantizes on load but ``save_pretrained`` refuses ("not serializable").
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import A3Error
from ..checkpoint.model_card import write_model_card
from ..checkpoint.records import (QUANTIZATION_KEY, QuantizationRecord, RecordError, compression_record, quantization_record,
                      set_quantization_record)
from ..checkpoint.saving import model_sources, save_tokenizer, write_atomically

BACKENDS = ("hqq", "quanto")
BITS = {"hqq": (1, 2, 3, 4, 8), "quanto": (2, 4, 8)}
DEFAULT_GROUP_SIZE = 64  # the A3 paper's 4-bit setting
_HQQ_EXTRA_KEY = "__optimum_a3_extra__"  # in hqq's qmodel.pt: the tensors hqq itself does not save


class QuantizationError(A3Error, ValueError):
    """Bad quantization settings, a model the backend cannot quantize, or a directory that is not a
    checkpoint written by :func:`save_quantized`."""


def quantize_model(model: nn.Module, backend: str = "hqq", bits: int = 4, group_size: int | None = None,
                   skip: Sequence[str] = ("lm_head",), dtype: torch.dtype | None = None,
                   axis: int | None = None) -> nn.Module:
    """Quantize the weights of every ``nn.Linear`` of ``model`` in place and return it.

    Args:
        model: a Hugging Face causal LM (an A3 model or a dense one) with plain ``nn.Linear`` layers.
        backend: ``"hqq"`` or ``"quanto"`` (see the module docstring).
        bits: weight bits: hqq 1/2/3/4/8, quanto 2/4/8.
        group_size: hqq: weights per scale/zero group (default 64; must divide every quantized weight's
            size and be a multiple of 8). quanto chooses its own group size: leave ``None``.
        skip: linear layers kept unquantized, as module-name suffixes (``"lm_head"``, ``"mlp.down_proj"``).
        dtype: cast the model to this dtype first (e.g. ``torch.bfloat16``); the quantized model computes
            and is saved in it. Default: the model's dtype.
        axis: hqq only: ``0`` (default) groups ``group_size`` weights strided over the flattened weight,
            which packs for any A3 width; ``1`` groups consecutive weights (needed by hqq's torchao/bitblas
            GPU kernels) and packs 4-bit only when the number of groups is even, which A3's odd widths
            often break (SmolLM2 at 20%: v_proj 153 x 576 has 1377 groups of 64).

    Raises:
        QuantizationError: unknown backend, unsupported bits/group size, an already quantized model, or
            a decoder linear layer the backend left unquantized.
    """
    if backend not in BACKENDS:
        raise QuantizationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if bits not in BITS[backend]:
        raise QuantizationError(f"{backend} supports bits in {BITS[backend]}, got {bits}")
    if quantized_backend(model) is not None:
        raise QuantizationError("the model is already quantized")
    skip = tuple(skip)
    targets = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not _skipped(name, skip)}
    if not targets:
        raise QuantizationError("the model has no nn.Linear layer to quantize")
    if backend == "hqq":
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        axis = 0 if axis is None else axis
        _check_hqq(model, targets, bits, group_size, axis)
    elif group_size is not None or axis is not None:
        raise QuantizationError("optimum-quanto picks the group size itself (128, 96 or 64 when it divides the "
                                "input width, else per channel): use backend='hqq' to set group_size or axis")
    _require(backend)
    # Everything is checked: from here on the model is changed.
    with _keeping_non_persistent_buffers(model):
        if dtype is not None:
            model.to(dtype)
        if backend == "hqq":
            _quantize_hqq(model, targets, bits, group_size, axis)
        else:
            _quantize_quanto(model, bits, skip)
    left = [name for name, m in model.named_modules() if type(m) is nn.Linear and name in targets]
    if left:
        raise QuantizationError(f"{backend} left {len(left)} linear layers unquantized, e.g. {left[:3]}")
    compute_dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    # In config.json: how the checkpoint was quantized, read back by load_quantized.
    set_quantization_record(model.config, QuantizationRecord(
        backend=backend, bits=bits, requested_group_size=group_size, axis=axis, skip=list(skip),
        group_sizes=group_size_counts(model), dtype=compute_dtype, library_version=_library_version(backend)))
    return model.eval()


@contextlib.contextmanager
def inference_mode_as_no_grad(model: nn.Module):
    """For a quanto model, make ``torch.inference_mode`` act as ``torch.no_grad`` while the block runs.

    optimum-quanto's 4-bit layers fail under ``torch.inference_mode`` on CPU ("Cannot set version_counter
    for inference tensor", optimum-quanto issue #304), which ``optimum_a3.integrations.evaluation.perplexity`` uses;
    ``no_grad`` computes the same numbers. Other models are left alone.
    """
    if quantized_backend(model) != "quanto":
        yield
        return
    from unittest import mock

    with mock.patch.object(torch, "inference_mode", torch.no_grad):
        yield


def quantized_backend(model: nn.Module) -> str | None:
    """``"hqq"`` or ``"quanto"`` if ``model`` holds layers quantized by that library, else ``None``."""
    for module in model.modules():
        kind = type(module).__module__
        if kind.startswith("hqq."):
            return "hqq"
        if kind.startswith("optimum.quanto."):
            return "quanto"
    return None


def group_size_counts(model: nn.Module) -> dict[str, int]:
    """How many quantized layers use each group size (``"per-channel"``: one scale per output row)."""
    counts: Counter = Counter()
    for module in model.modules():
        if hasattr(module, "W_q") and getattr(module, "meta", None):  # HQQLinear
            counts[str(module.meta.get("group_size"))] += 1
        elif getattr(module, "weight_qtype", None) is not None:  # quanto QModuleMixin
            counts[str(module.weight_group_size or "per-channel")] += 1
    return dict(sorted(counts.items()))


def save_quantized(model: nn.Module, save_dir: str | Path, tokenizer=None, overwrite: bool = False) -> str:
    """Save a model returned by :func:`quantize_model` (config with the quantization record, weights in
    the backend's format, A3 remote code for quanto, tokenizer and, for an A3 model, a model card that
    says how to load it). Written atomically, like ``A3Compressor.save``: a failure leaves ``save_dir``
    untouched. Reload with :func:`load_quantized`."""
    backend = quantized_backend(model)
    if backend is None or quantization_record(model.config) is None:
        raise QuantizationError("save_quantized expects a model returned by quantize_model or load_quantized")

    def writer(tmp: str) -> None:
        _require(backend)
        if backend == "hqq":
            _hqq_model_class().save_quantized(model, tmp)
        else:
            from optimum.quanto import QuantizedModelForCausalLM

            QuantizedModelForCausalLM(model).save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if compression_record(model.config) is not None:  # cards describe A3 checkpoints only
            write_model_card(None, tmp)

    return write_atomically(str(save_dir), writer, overwrite=overwrite, inputs=model_sources(model))


def load_quantized(save_dir: str | Path, device: str = "cpu", *, revision: str | None = None,
                   token: str | None = None) -> nn.Module:
    """Reload a checkpoint written by :func:`save_quantized`; its logits equal the saved model's.

    ``save_dir`` is a local directory or a Hub repo id (downloaded with ``huggingface_hub.snapshot_download``,
    at ``revision``, with ``token``). The model computes in the dtype it was quantized in. Plain
    ``AutoModelForCausalLM.from_pretrained`` cannot load these checkpoints (see the module docstring).
    """
    save_dir = _local_checkpoint(str(save_dir), revision, token)
    config_path = os.path.join(save_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{save_dir}: no readable config.json ({exc})") from exc
    try:
        record = quantization_record(config)
    except RecordError as exc:
        raise QuantizationError(f"{save_dir}: {exc}") from exc
    if record is None or record.backend not in BACKENDS:
        raise QuantizationError(f"{save_dir} is not a checkpoint written by save_quantized (no {QUANTIZATION_KEY} "
                                "record)")
    _require(record.backend)
    for name in _REQUIRED_FILES[record.backend]:
        if not os.path.isfile(os.path.join(save_dir, name)):
            raise QuantizationError(f"{save_dir}: cannot load the {record.backend} checkpoint: {name} is missing")
    try:
        if record.backend == "hqq":
            dtype = getattr(torch, record.dtype or "float32")  # config.json's dtype is hqq-stale
            model = _hqq_model_class().from_quantized(os.path.abspath(save_dir), compute_dtype=dtype, device=device)
        else:
            from optimum.quanto import QuantizedModelForCausalLM

            model = QuantizedModelForCausalLM.from_pretrained(save_dir)._wrapped.to(device)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:  # missing, truncated or corrupted files
        detail = f"{exc.filename} is missing or unreadable" if getattr(exc, "filename", None) else _first_line(exc)
        raise QuantizationError(f"{save_dir}: cannot load the {record.backend} checkpoint: {detail}") from exc
    return model.eval()


# The weight files each backend's loader reads (hqq would raise a bare Exception without its file).
_REQUIRED_FILES = {"hqq": ("qmodel.pt",), "quanto": ("quanto_qmap.json",)}


def _first_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _local_checkpoint(path_or_repo: str, revision: str | None, token: str | None) -> str:
    """A local directory as is; anything else that looks like a repo id is downloaded from the Hub."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path_or_repo)
    except HFValidationError as exc:
        raise QuantizationError(f"no such directory: {path_or_repo} (nor is it a Hub repo id)") from exc
    try:
        return snapshot_download(path_or_repo, revision=revision, token=token)
    except Exception as exc:  # noqa: BLE001 - not found, offline, no access: one message naming both readings
        raise QuantizationError(f"no such directory: {path_or_repo}, and it could not be downloaded as a Hub "
                                f"repo ({_first_line(exc)})") from exc


# ----------------------------------------------------------------------------------- backends
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _library_version(backend: str) -> str:
    from importlib.metadata import version

    return version("hqq" if backend == "hqq" else "optimum-quanto")


@contextlib.contextmanager
def _keeping_non_persistent_buffers(model: nn.Module):
    """Keep the values and dtype of non-persistent buffers (Llama's rotary ``inv_freq``) through casts.

    ``model.to(bfloat16)`` (and hqq, which casts every other module) would round them, while
    ``from_pretrained(dtype=...)`` keeps them float32: the reloaded model would compute other logits.
    """
    kept = [(m, k, b) for m in model.modules() for k, b in m._buffers.items()
            if b is not None and k in m._non_persistent_buffers_set]
    yield
    for module, key, buf in kept:
        module._buffers[key] = buf.to(module._buffers[key].device)


def _check_hqq(model, targets: dict[str, nn.Module], bits: int, group_size: int, axis: int) -> None:
    if axis not in (0, 1):
        raise QuantizationError(f"hqq's axis must be 0 or 1, got {axis!r}")
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise QuantizationError(f"hqq needs a group_size that is a positive multiple of 8, got {group_size!r}")
    bad = [f"{n} {tuple(m.weight.shape)}" for n, m in targets.items() if m.weight.numel() % group_size]
    if bad:
        raise QuantizationError(f"group_size={group_size} does not divide the weights of {bad[:3]}")
    # hqq packs 8 // bits values per byte along the first dim of the grouped weight: group_size rows
    # with axis=0, numel / group_size rows with axis=1 (3-bit pads, 8-bit does not pack).
    per_byte = {4: 2, 2: 4, 1: 8}.get(bits, 1)
    rows = {n: group_size if axis == 0 else m.weight.numel() // group_size for n, m in targets.items()}
    bad = [f"{n} ({r} groups)" for n, r in rows.items() if r % per_byte]
    if bad:
        raise QuantizationError(f"hqq cannot pack {bits}-bit groups with axis={axis} for {bad[:3]}: use axis=0")
    # hqq keys its per-layer configs by linear tag, the same in every decoder layer.
    tags = {_hqq_tag(name) for name in targets}
    mixed = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in targets and _hqq_tag(n) in tags]
    if mixed:
        raise QuantizationError(f"hqq skips a layer kind in every decoder layer: skip {_hqq_tag(mixed[0])!r}, "
                                f"not single layers such as {mixed[0]!r}")


def _quantize_hqq(model, targets: dict[str, nn.Module], bits: int, group_size: int, axis: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)
    param = next(model.parameters())
    _hqq_model_class().quantize_model(model, quant_config={_hqq_tag(n): config for n in targets},
                                      compute_dtype=param.dtype, device=str(param.device))


def _hqq_tag(name: str) -> str:
    """hqq's "linear tag": the module name without ``model``, ``layers`` and layer indices."""
    return ".".join(n for n in name.split(".") if n not in ("model", "layers") and not n.isnumeric())


def _quantize_quanto(model, bits: int, skip: tuple[str, ...]) -> None:
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {2: qint2, 4: qint4, 8: qint8}[bits]
    quantize(model, weights=qtype, exclude=[p for s in skip for p in (s, f"*.{s}")])
    freeze(model)  # replace the float weights by the packed ones (what save_pretrained stores)


def _require(backend: str):
    """Import an optional backend, or say how to install it."""
    try:
        if backend == "hqq":
            import hqq.models.hf.base  # noqa: F401
        else:
            import optimum.quanto  # noqa: F401
    except ImportError as exc:
        raise QuantizationError(f"backend {backend!r} needs: pip install 'optimum-a3[quant]'") from exc


@functools.cache
def _hqq_model_class():
    _require("hqq")
    from hqq.models.hf.base import AutoHQQHFModel

    class A3HQQModel(AutoHQQHFModel):
        """hqq's HF model wrapper, also saving the tensors hqq's own format leaves out.

        hqq serialises the state of leaf modules only, so A3's ``self_attn.rope_pairs`` buffers (the kept
        rotary frequencies, on the attention module) would be lost, and non-persistent buffers (Llama's
        rotary ``inv_freq``) come back cast to the compute dtype: the reloaded model would compute other
        logits. ``post_module_load`` is hqq's hook for tensors outside the leaf modules.
        """

        @classmethod
        def serialize_weights(cls, model, verbose: bool = False) -> dict:
            weights = super().serialize_weights(model, verbose=verbose)
            extra = {"buffers": {}, "parameters": {}}
            for name, module in model.named_modules():
                prefix = f"{name}." if name else ""
                for key, buf in module._buffers.items():
                    if buf is not None and (module._modules or key in module._non_persistent_buffers_set):
                        extra["buffers"][prefix + key] = buf
                if module._modules:
                    extra["parameters"].update({prefix + k: p for k, p in module._parameters.items() if p is not None})
            weights[_HQQ_EXTRA_KEY] = extra
            return weights

        @classmethod
        def post_module_load(cls, model, weights: dict) -> None:
            extra = weights.get(_HQQ_EXTRA_KEY, {})
            for kind, tensors in extra.items():
                for full_name, value in tensors.items():
                    module_name, _, key = full_name.rpartition(".")
                    module = model.get_submodule(module_name)
                    if kind == "buffers":
                        module._buffers[key] = value
                    else:
                        module._parameters[key] = nn.Parameter(value, requires_grad=False)
            if getattr(model.config, "tie_word_embeddings", False) and type(model.lm_head) is nn.Linear:
                model.tie_weights()  # lm_head was loaded as its own copy of the embeddings

    return A3HQQModel
