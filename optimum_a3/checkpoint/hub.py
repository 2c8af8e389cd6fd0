"""Publish A3-compressed checkpoints to the Hugging Face Hub, through ``huggingface_hub.HfApi`` only.

A push is ``create_repo(exist_ok=True)`` followed by ONE ``create_commit`` holding everything a user needs to
run the model with plain ``transformers``: the safetensors weights, ``config.json`` (with ``auto_map``), the
self-contained modeling files, the tokenizer and a model card (``README.md``, see :mod:`optimum_a3.checkpoint.model_card`).
The commit is atomic on the Hub: a push that fails (bad token, network, ...) publishes nothing. A checkpoint
quantized with :mod:`optimum_a3.integrations.quantization` is pushed in its backend's format, with a card that says how to
load it (``load_quantized``, which also takes the repo id).

Entry points:

* :func:`push_to_hub` — an in-memory compressed model (``A3Compressor.push_to_hub`` delegates here);
* :func:`push_folder_to_hub` — a checkpoint directory written by ``A3Compressor.save`` (``optimum-a3 push``);
* :func:`check_hub_access` — fail fast on a missing or rejected token before hours of compression.

The endpoint is ``huggingface_hub``'s (``HF_ENDPOINT``), or ``endpoint=`` for one call.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import A3Error
from .model_card import (CARD_FILE, TOKENIZER_FILES, ModelCardError, is_generated_card, load_config_dict,
                         render_model_card)
from .records import quantization_record
from .writer import save_model

# Remote files a new push replaces as a set: stale shards of an earlier push must not survive next to new ones.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "qmodel.pt",
                   "quanto_qmap.json")
DEFAULT_COMMIT_MESSAGE = "Upload A3-compressed model (optimum-a3)"


class HubPushError(A3Error, RuntimeError):
    """A push to the Hub failed; the message is one line and says why (nothing was published)."""


class CheckpointError(A3Error, ValueError):
    """A directory is not a complete A3 checkpoint."""


# ------------------------------------------------------------------------------------------ checks
def check_checkpoint_dir(directory: str | os.PathLike) -> dict:
    """Return the config of the A3 checkpoint in ``directory``; raise :class:`CheckpointError` if incomplete.

    A checkpoint of ``A3Compressor.save`` needs ``auto_map``, its modeling files and safetensors weights; one of
    ``optimum_a3.integrations.quantization.save_quantized`` needs its backend's weight files (hqq ``qmodel.pt``; quanto
    safetensors + ``quanto_qmap.json``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a saved checkpoint")
    try:
        config = load_config_dict(directory)  # and its a3_compression record, validated
        quantization = quantization_record(config)
    except (ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    has_safetensors = any((directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
    if quantization is not None:
        backend = quantization.backend
        needed = {"hqq": ["qmodel.pt"], "quanto": ["quanto_qmap.json"]}.get(backend)
        if needed is None:
            raise CheckpointError(f"{directory}: unknown quantization backend {backend!r} in config.json")
        missing = [name for name in needed if not (directory / name).is_file()]
        if backend == "quanto" and not has_safetensors:
            missing.append("model.safetensors")
        if missing:
            raise CheckpointError(f"{directory} is a {backend}-quantized checkpoint without {', '.join(missing)}")
        return config
    entry = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if not entry:
        raise CheckpointError(f"{directory}/config.json has no auto_map: save it with A3Compressor.save")
    modules = {entry.split(".")[0], (config.get("auto_map") or {}).get("AutoConfig", entry).split(".")[0]}
    missing = [f"{m}.py" for m in sorted(modules) if not (directory / f"{m}.py").is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks the modeling file(s) {', '.join(missing)} named in auto_map")
    if not has_safetensors:
        raise CheckpointError(f"{directory} has no safetensors weights (model.safetensors[.index.json])")
    return config


def _api(token, endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError derives from the HTTP client's base error (httpx / httpx2, depending on the version), which
    # also covers connection errors and timeouts: catch that base without importing the client by name.
    # ConnectionError covers huggingface_hub's OfflineModeIsEnabled.
    return (HfHubHTTPError, *HfHubHTTPError.__bases__[:1], ConnectionError)


def _reason(exc: BaseException, endpoint: str, repo_id: str) -> str:
    """One line: what the Hub said, and what to do about it."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    server = getattr(exc, "server_message", None) or ""
    server = " ".join(server.split())
    if status is None:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"cannot reach the Hub at {endpoint}: {first}"
    detail = f"HTTP {status}" + (f": {server}" if server else "")
    if status == 401:
        return (f"the Hub at {endpoint} rejected the token ({detail}); pass a valid write token with token=/--token, "
                "HF_TOKEN or `hf auth login`")
    if status == 403:
        return f"the token cannot write to {repo_id} ({detail}); use a write token with access to that namespace"
    if status == 404:
        return f"{repo_id} was not found on {endpoint} ({detail})"
    return f"the Hub at {endpoint} refused the push to {repo_id} ({detail})"


def resolve_token(token: str | None = None) -> str:
    """``token``, else the saved / ``HF_TOKEN`` token; raise :class:`HubPushError` when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubPushError("no Hugging Face token: pass token=/--token, set HF_TOKEN or run `hf auth login`")
    return found


def check_hub_access(repo_id: str, token: str | None = None, endpoint: str | None = None) -> str:
    """Check ``repo_id`` is a valid id and the token is accepted (``whoami``); returns the user name.

    Call before expensive work; raises :class:`HubPushError` with a one-line reason.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubPushError(f"invalid repo id {repo_id!r}: {str(exc).splitlines()[0]}") from exc
    api = _api(resolve_token(token), endpoint)
    try:
        return api.whoami()["name"]
    except _network_errors() as exc:
        raise HubPushError(_reason(exc, api.endpoint, repo_id)) from exc


# --------------------------------------------------------------------------------------------- push
def push_to_hub(model, repo_id: str, *, tokenizer=None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str = "5GB",
                license: str | None = None, endpoint: str | None = None):
    """Upload an A3-compressed model (weights, config with ``auto_map``, modeling files, tokenizer, model card).

    The model is saved to a temporary staging directory, a model card is rendered from its compression record,
    and the folder is pushed in one commit (:func:`push_folder_to_hub`). Keyword arguments follow
    ``transformers``' ``push_to_hub``.

    Args:
        model: a model returned by :meth:`A3Compressor.compress` (or reloaded from an A3 checkpoint), possibly
            quantized by :func:`optimum_a3.integrations.quantization.quantize_model` (pushed in its backend's format).
        repo_id: ``namespace/name`` (or ``name`` for the token's user); created if needed.
        tokenizer: saved next to the model when given (recommended: the card's snippet then loads it too).
        commit_message / commit_description: of the single commit.
        private: visibility of a repository created by this call (ignored if it exists).
        token: a write token (default: ``HF_TOKEN`` or the saved login).
        revision: branch to push to (created from ``main`` if missing).
        create_pr: open a pull request instead of committing to the branch.
        max_shard_size: largest safetensors shard (not for a quantized model: its backend writes its own files).
        license: license of the card (default: the base model's when it can be found).
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` / huggingface.co).

    Returns:
        The :class:`huggingface_hub.CommitInfo` of the commit (a ``str``: the commit URL).
    """
    from ..models.a3_llama import A3LlamaForCausalLM

    if not isinstance(model, A3LlamaForCausalLM) and type(model).__name__ != "A3LlamaForCausalLM":
        raise TypeError(f"expected an A3-compressed model (A3LlamaForCausalLM), got {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="optimum-a3-push-") as tmp:
        staged = os.path.join(tmp, "checkpoint")
        if quantization_record(model.config) is not None:
            from ..integrations.quantization import save_quantized

            save_quantized(model, staged, tokenizer=tokenizer)  # its own format; save_pretrained cannot
        else:  # the card written here is regenerated by push_folder_to_hub, with the license
            os.makedirs(staged)
            save_model(model, staged, tokenizer=tokenizer, max_shard_size=max_shard_size)
        return push_folder_to_hub(staged, repo_id, commit_message=commit_message,
                                  commit_description=commit_description, private=private, token=token,
                                  revision=revision, create_pr=create_pr, license=license, regenerate_card=True,
                                  endpoint=endpoint)


def push_folder_to_hub(directory: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None, token: str | None = None,
                       revision: str | None = None, create_pr: bool = False, license: str | None = None,
                       regenerate_card: bool | None = None, endpoint: str | None = None):
    """Upload a checkpoint directory written by :meth:`A3Compressor.save` in one commit.

    The directory is checked first (config with the compression record and ``auto_map``, modeling files,
    safetensors weights). Its ``README.md`` is used as the model card if the user wrote it; a card generated by
    optimum-a3 (or a missing one) is rendered afresh with the repo id, unless ``regenerate_card=False``. The
    directory itself is never modified. Weight files left on the Hub by an earlier push and absent from this
    one are deleted in the same commit. Hidden files (``.*``) are not uploaded.

    Other arguments: see :func:`push_to_hub`. Raises :class:`CheckpointError` (bad directory, nothing sent) or
    :class:`HubPushError` (the Hub refused or was unreachable; nothing was published).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    directory = Path(directory)
    check_checkpoint_dir(directory)
    files = _checkpoint_files(directory)
    api = _api(token, endpoint)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and not revision.startswith("refs/pr/") and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(directory / rel))
                                 for rel in files if rel != CARD_FILE]
        readme = directory / CARD_FILE
        if regenerate_card is False and readme.is_file():
            card_source: Any = str(readme)
        elif readme.is_file() and not is_generated_card(readme) and not regenerate_card:
            card_source = str(readme)  # the user's own card
        else:
            has_tokenizer = any(name in files for name in TOKENIZER_FILES)
            card_source = render_model_card(directory, repo_id=repo_id, license=license,
                                            license_lookup=lambda base: _base_card_data(api, base),
                                            has_tokenizer=has_tokenizer).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_source))
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [p for p in remote if p not in files and any(fnmatch.fnmatch(p, pat) for pat in WEIGHT_PATTERNS)]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        return api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                 commit_description=commit_description, revision=revision, create_pr=create_pr)
    except _network_errors() as exc:
        raise HubPushError(_reason(exc, api.endpoint, repo_id) + "; nothing was published") from exc
    except RuntimeError as exc:
        # huggingface_hub wraps a failed LFS upload in RuntimeError("Error while uploading ...") from the HTTP error.
        cause = exc.__cause__ or exc.__context__
        if isinstance(exc, HubPushError) or not isinstance(cause, _network_errors()):
            raise
        raise HubPushError(_reason(cause, api.endpoint, repo_id) + "; nothing was published") from exc
    except ModelCardError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    except ValueError as exc:  # e.g. the Hub's metadata validation of README.md
        raise HubPushError(f"the Hub refused the push to {repo_id}: {' '.join(str(exc).split())}") from exc


def _checkpoint_files(directory: Path) -> list[str]:
    """Relative POSIX paths of the files to upload (hidden files and folders skipped)."""
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            if not name.startswith("."):
                out.append(Path(root, name).relative_to(directory).as_posix())
    return out


def _base_card_data(api, base_id: str) -> dict | None:
    """The base model's card metadata from the Hub (for its license); ``None`` when unavailable."""
    info = api.model_info(base_id)
    data = getattr(info, "card_data", None)
    return data.to_dict() if data is not None else None
