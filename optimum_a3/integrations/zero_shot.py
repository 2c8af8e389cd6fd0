"""Zero-shot (and few-shot) accuracy with lm-evaluation-harness: a thin layer over its own API.

The papers A3 is compared with (SVD-LLM, SliceGPT, LLM-Pruner) report lm-eval accuracy on ARC-e/c,
HellaSwag, PIQA, WinoGrande, BoolQ... next to perplexity. :func:`evaluate_zero_shot` runs lm-eval's
``simple_evaluate`` on a checkpoint (and optionally on its base model, for the comparison row) through
lm-eval's Hugging Face model class ``HFLM``, given the model already loaded by this library's safe loader
(:func:`~optimum_a3.checkpoint.loading.load_model_and_tokenizer`: A3 checkpoints need no remote code, other
checkpoints' code runs only on ``trust_remote_code=True``). :func:`to_markdown` renders the result as a
table, one row per model. lm-eval is the optional extra ``optimum-a3[eval]``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..checkpoint.loading import ModelLoadError, load_model_and_tokenizer
from ..errors import A3Error, one_line

EXTRA_HINT = "pip install 'optimum-a3[eval]' (lm-eval)"
# Metrics shown in the Markdown table for a task that has them (the papers' columns); a task without
# them (e.g. a loglikelihood_rolling one: perplexities) shows all of its metrics.
ACCURACY_METRICS = ("acc", "acc_norm")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class ZeroShotError(A3Error, ValueError):
    """A zero-shot evaluation that cannot run: lm-eval missing, an unknown task, task data that cannot be
    loaded (offline), or a model that is not a causal LM."""


@dataclass
class TaskSelection:
    """Task names checked against lm-eval's task index, their data loadable, and the ``TaskManager``
    that knows them (``simple_evaluate`` reloads the tasks from it for each model)."""

    names: list[str]
    manager: object
    include_path: list[str] | None


# ------------------------------------------------------------------ lm-eval and its tasks
def _lm_eval():
    """The ``lm_eval`` module, or a one-line :class:`ZeroShotError` naming the extra to install."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - HFLM
        import lm_eval.tasks  # noqa: F401 - TaskManager
    except ImportError as exc:
        raise ZeroShotError(f"zero-shot evaluation needs lm-evaluation-harness ({one_line(exc)}): "
                            f"{EXTRA_HINT}") from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"arc_easy, hellaswag"`` or a list of names -> ``["arc_easy", "hellaswag"]`` (order kept, no duplicates)."""
    items = tasks.split(",") if isinstance(tasks, str) else [part for item in tasks for part in str(item).split(",")]
    names = list(dict.fromkeys(name.strip() for name in items if name.strip()))
    if not names:
        raise ZeroShotError("no task given: name lm-eval tasks, e.g. arc_easy,hellaswag")
    return names


def _include_paths(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str] | None:
    if include_path is None:
        return None
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for path in paths:
        if not os.path.exists(path):
            raise ZeroShotError(f"include path {os.fspath(path)}: no such file or directory (a folder of lm-eval "
                                "task YAML files)")
    return [os.path.abspath(path) for path in paths] or None


@lru_cache(maxsize=1)
def _builtin_task_manager():
    """lm-eval's own task index (thousands of YAML files: ~10 s to scan), built once per process."""
    return _lm_eval().tasks.TaskManager()


def _task_manager(include_path: list[str] | None, builtin: bool):
    if not include_path:
        return _builtin_task_manager()
    return _lm_eval().tasks.TaskManager(include_path=include_path, include_defaults=builtin)


def _is_glob(name: str) -> bool:
    return any(char in name for char in "*?[")


def _known(manager, name: str) -> bool:
    """Whether ``manager`` resolves ``name``: a task, group or tag, a glob matching some, or a YAML file."""
    if _is_glob(name):
        return bool(manager.match_tasks([name]))
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and os.path.isfile(name))


def _unknown_task_error(name: str, builtin, local, include_path: list[str] | None) -> ZeroShotError:
    known = builtin.all_tasks + (local.all_tasks if local is not None else [])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = f" nor in {', '.join(include_path)}" if include_path else ""
    return ZeroShotError(f"unknown task {name!r}{hint}: not an lm-eval task, group or tag{where}; `lm-eval ls tasks` "
                         "lists them, --include-path adds a folder of task YAML files")


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_VARIABLES)


def _is_network_error(exc: BaseException) -> bool:
    """datasets raises ConnectionError ("Couldn't reach ... (OfflineModeIsEnabled)"); HTTP clients their own."""
    text = one_line(exc).lower()
    return isinstance(exc, ConnectionError) or any(word in text for word in ("offline", "couldn't reach", "connect"))


def _data_error(name: str | None, exc: BaseException) -> ZeroShotError:
    what = f"task {name!r}" if name else "the tasks"
    if _is_network_error(exc) and _offline():
        return ZeroShotError(f"{what}: its data cannot be fetched offline ({one_line(exc)}); HF_HUB_OFFLINE / "
                             "HF_DATASETS_OFFLINE is set: run once with network access to fill the datasets cache, "
                             "or point a local task YAML at local files with --include-path")
    if _is_network_error(exc):
        return ZeroShotError(f"{what}: its data cannot be fetched ({one_line(exc)}); lm-eval downloads task data "
                             "from the Hugging Face Hub: check the network and HF_ENDPOINT")
    return ZeroShotError(f"{what}: its data could not be loaded ({one_line(exc)}); check the task YAML's "
                         "dataset_path and dataset_kwargs")


def select_tasks(tasks: str | Sequence[str], include_path=None) -> TaskSelection:
    """Check task names against lm-eval's index (plus the YAML files under ``include_path``) and load
    their data once, so that an unknown name or unreachable data fails before any model is loaded.

    Raises:
        ZeroShotError: lm-eval is not installed, a name is unknown (with close matches), or a task's data
            cannot be loaded (offline: says so).
    """
    names = parse_tasks(tasks)
    paths = _include_paths(include_path)
    local = _task_manager(paths, builtin=False) if paths else None
    elsewhere = [name for name in names if local is None or not _known(local, name)]
    manager = local
    if elsewhere:  # lm-eval's own tasks (scanning them takes seconds: once per process)
        builtin = _builtin_task_manager()
        for name in elsewhere:
            if not _known(builtin, name):
                raise _unknown_task_error(name, builtin, local, paths)
        # Both kinds: one index of both folders (the local YAML files take precedence, as in lm-eval).
        manager = builtin if len(elsewhere) == len(names) else _task_manager(paths, builtin=True)
    try:
        with _lm_eval_logs_quiet():  # its warnings about the task configs come again when the tasks run
            manager.load(names)  # downloads (or reads from the cache) every task's data
    except Exception as exc:  # noqa: BLE001 - datasets/network/YAML errors of any type: one line, per task
        raise _data_error(_failing_task(manager, names), exc) from exc
    return TaskSelection(names, manager, paths)


@contextlib.contextmanager
def _lm_eval_logs_quiet() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _failing_task(manager, names: list[str]) -> str | None:
    """Which of ``names`` fails to load (a single-task reload: only on the error path)."""
    if len(names) == 1:
        return names[0]
    for name in names:
        try:
            with _lm_eval_logs_quiet():
                manager.load([name])
        except Exception:  # noqa: BLE001
            return name
    return None


# ------------------------------------------------------------------ models
def _check_causal_lm(model, name: str) -> None:
    """Refuse a model lm-eval would score wrongly: an encoder-decoder, or one whose logits at a position
    depend on later tokens (e.g. a BERT loaded through AutoModelForCausalLM without is_decoder)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ZeroShotError(f"{name} is not a causal LM ({type(model).__name__}): lm-eval's hf model scores text "
                            "with decoder-only models (AutoModelForCausalLM)")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 8:
        return
    device = next(model.parameters()).device
    ids = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = 3 + (int(ids[0, -1]) - 3 + 1) % (vocab - 3)  # another token at the last position only
    with torch.no_grad():
        first, second = (model(input_ids=x.to(device)).logits[0].float() for x in (ids, changed))
    # A causal model's earlier logits do not move (exactly, with the same shapes); a bidirectional model's
    # move by a sizeable fraction of the last position's change. The margin absorbs kernel noise.
    earlier = (first[:-1] - second[:-1]).abs().max().item()
    last = (first[-1] - second[-1]).abs().max().item()
    if earlier > 1e-2 * last + 1e-6 * (1.0 + first.abs().max().item()):
        raise ZeroShotError(f"{name} is not a causal LM ({type(model).__name__}): its logits at a position depend "
                            "on later tokens, so lm-eval's log-likelihoods would be meaningless")


def load_causal_lm(spec: str, trust_remote_code: bool = False):
    """``(model, tokenizer)`` through the library's loader; a configuration AutoModelForCausalLM has no
    class for (T5, ...) is a :class:`ZeroShotError` (:func:`score_model` checks the model itself)."""
    try:
        model, tokenizer = load_model_and_tokenizer(spec, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except ValueError as exc:
        if "AutoModelForCausalLM" in str(exc):  # transformers: "Unrecognized configuration class ..."
            raise ZeroShotError(f"{spec} is not a causal LM: AutoModelForCausalLM has no class for its "
                                "configuration; lm-eval's hf model scores decoder-only models") from None
        raise
    return model, tokenizer


def _is_a3(model) -> bool:
    return str(getattr(model.config, "model_type", "")).startswith("a3_")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _DropMessages(logging.Filter):
    """Drops lm-eval's warnings about a model passed as an object: this is the intended use here."""

    PREFIXES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def _quiet_hflm() -> Iterator[None]:
    logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropMessages()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ------------------------------------------------------------------ running
def score_model(model, tokenizer, selection: TaskSelection, *, batch_size: int | str = 1, limit: float | None = None,
                num_fewshot: int | None = None, device: str | None = None, trust_remote_code: bool = False,
                bootstrap_iters: int = 100000, name: str | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an already-loaded causal LM; returns ``{"name", "seconds",
    "tasks": {task: {metric: value, metric_stderr: value, "samples": n, "num_fewshot": k}}}``.

    The model is moved to ``device`` (default: cuda when available, else cpu). lm-eval shows its own
    progress bars. ``trust_remote_code`` is passed on to lm-eval (A3 models need none: this library
    registers their classes).
    """
    lm_eval = _lm_eval()
    name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    model.to(device or default_device())
    _check_causal_lm(model, name)
    with _quiet_hflm():
        lm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, backend="causal",
                                             batch_size=batch_size,
                                             trust_remote_code=trust_remote_code or _is_a3(model))
    started = time.perf_counter()
    with torch.no_grad():
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(selection.names), task_manager=selection.manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=False,
                                      bootstrap_iters=bootstrap_iters)
    return {"name": name, "seconds": round(time.perf_counter() - started, 3), "tasks": task_metrics(raw)}


def task_metrics(raw: dict) -> dict:
    """Flatten lm-eval's ``results`` (and ``groups``) into ``{task: {metric: value, ...}}``: ``"acc,none"`` ->
    ``"acc"``, other filters kept as ``"metric,filter"``, "N/A" stderr -> None; plus the samples scored and
    the number of few-shot examples."""
    table = {**raw.get("results", {}), **raw.get("groups", {})}
    out = {}
    for task, values in table.items():
        metrics = {}
        for key, value in values.items():
            if "," not in key:
                continue  # name, alias, sample_len
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else key] = value if isinstance(value, (int, float)) else None
        samples = raw.get("n-samples", {}).get(task, {})
        metrics["samples"] = samples.get("effective") if isinstance(samples, dict) else None
        metrics["num_fewshot"] = raw.get("n-shot", {}).get(task)
        out[task] = metrics
    return out


def evaluate_zero_shot(model: str, tasks: str | Sequence[str], *, base: str | None = None, batch_size: int | str = 1,
                       limit: float | None = None, num_fewshot: int | None = None, device: str | None = None,
                       include_path=None, trust_remote_code: bool = False, bootstrap_iters: int = 100000,
                       log=None) -> dict:
    """lm-eval accuracy of checkpoint ``model`` (and of ``base``, for the comparison row) on ``tasks``.

    Args:
        model: an A3 checkpoint (directory or Hub id), or any causal LM spec the library loads (.gguf,
            'smollm2-offline').
        tasks: lm-eval task, group or tag names (a list, or one comma-separated string); globs and YAML
            file paths work as with ``lm_eval --tasks``.
        base: the uncompressed model to evaluate the same way (optional).
        batch_size: requests per forward pass, or "auto" (lm-eval's search).
        limit: at most this many documents per task (a float below 1: that fraction); quick runs only.
        num_fewshot: few-shot examples per prompt (default: the task's own, 0 for most).
        device: "cuda", "cpu", "cuda:1"... (default: cuda when available).
        include_path: folder(s) of extra task YAML files (lm-eval's ``TaskManager(include_path=...)``).
        trust_remote_code: run code shipped with a non-A3 checkpoint (A3 checkpoints never need it).
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of non-mean metrics (0: none).
        log: ``callable(str)`` for progress lines (default: none).

    Returns:
        ``{"tasks", "lm_eval_version", "settings", "model": {...}, "base": {...} or None}``; each model
        entry is :func:`score_model`'s. :func:`to_markdown` renders it.

    Raises:
        ZeroShotError: lm-eval missing, unknown task, task data not loadable (offline), not a causal LM.
        ModelLoadError: a model that cannot be loaded.
    """
    log = log or (lambda message: None)
    lm_eval = _lm_eval()
    _check_settings(limit, num_fewshot)
    selection = select_tasks(tasks, include_path)  # before loading any model: bad names fail fast
    settings = {"batch_size": batch_size, "limit": limit, "num_fewshot": num_fewshot,
                "device": device or default_device(), "include_path": selection.include_path,
                "bootstrap_iters": bootstrap_iters}
    result = {"tasks": selection.names, "lm_eval_version": getattr(lm_eval, "__version__", None),
              "settings": settings, "model": None, "base": None}
    for role, spec in (("model", model), ("base", base)):
        if spec is None:
            continue
        log(f"[{role}] loading {spec}")
        loaded, tokenizer = load_causal_lm(spec, trust_remote_code=trust_remote_code)
        log(f"[{role}] lm-eval on {', '.join(selection.names)}")
        result[role] = score_model(loaded, tokenizer, selection, batch_size=batch_size, limit=limit,
                                   num_fewshot=num_fewshot, device=settings["device"],
                                   trust_remote_code=trust_remote_code, bootstrap_iters=bootstrap_iters, name=spec)
        del loaded  # one model in memory at a time
    return result


def _check_settings(limit, num_fewshot) -> None:
    if limit is not None and not limit > 0:
        raise ZeroShotError(f"limit must be positive (documents per task, or a fraction below 1), not {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ZeroShotError(f"num_fewshot must be 0 or more, not {num_fewshot}")


# ------------------------------------------------------------------ report
def metric_columns(tables: list[dict]) -> list[tuple[str, str]]:
    """``(task, metric)`` table columns for several models' ``{task: {metric: value}}``: the accuracies
    where a task has them, else all of its metrics (stderrs left out)."""
    columns: list[tuple[str, str]] = []
    for task in dict.fromkeys(task for table in tables for task in table):
        metrics = dict.fromkeys(m for table in tables for m in table.get(task, {})
                                if m not in ("samples", "num_fewshot") and "_stderr" not in m)
        shown = [m for m in ACCURACY_METRICS if m in metrics] or list(metrics)
        columns += [(task, metric) for metric in shown]
    return columns


def format_metric(value) -> str:
    """4 decimals (large perplexities in 4 significant digits); None as an empty cell."""
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def mean_accuracy(tasks: dict) -> float | None:
    """Mean ``acc`` over the tasks of ``{task: {metric: value}}`` that report one (the papers' "Avg."
    column), or None."""
    values = [metrics["acc"] for metrics in tasks.values() if metrics.get("acc") is not None]
    return sum(values) / len(values) if values else None


def to_markdown(result: dict) -> str:
    """A Markdown table of :func:`evaluate_zero_shot`'s result: one row per model, one column per task
    metric (acc and acc_norm where the task has them), and the mean acc when two or more tasks have one."""
    entries = [(role, result[role]) for role in ("model", "base") if result.get(role)]
    columns = metric_columns([entry["tasks"] for _, entry in entries])
    with_mean = sum(metric == "acc" for _, metric in columns) >= 2
    settings = result.get("settings", {})
    shots, limit = settings.get("num_fewshot"), settings.get("limit")
    header = (f"lm-eval {result.get('lm_eval_version')}, "
              + ("each task's default number of few-shot examples (0 for most)" if shots is None else f"{shots}-shot")
              + (", all documents" if limit is None else f", at most {limit} documents per task" if limit >= 1
                 else f", the first {limit:.0%} of each task's documents")
              + f", batch size {settings.get('batch_size')}, {settings.get('device')}")
    samples = {task: metrics.get("samples") for _, entry in entries for task, metrics in entry["tasks"].items()}
    lines = [header + "; documents per task: " + ", ".join(f"{t} {n}" for t, n in samples.items()), "",
             "| role | model | " + " | ".join(f"{task} {metric}" for task, metric in columns)
             + (" | mean acc" if with_mean else "") + " |",
             "|---|---|" + "---|" * (len(columns) + with_mean)]
    for role, entry in entries:
        cells = [format_metric(entry["tasks"].get(task, {}).get(metric)) for task, metric in columns]
        if with_mean:
            cells.append(format_metric(mean_accuracy(entry["tasks"])))
        lines.append(f"| {role} | `{entry['name']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
