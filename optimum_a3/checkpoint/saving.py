"""Atomic checkpoint writing: a save either completes or leaves ``save_dir`` as it was."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator

from ..errors import A3Error
from .records import RecordError, compression_record


class OutputDirError(A3Error, FileExistsError):
    """The output directory is not empty and overwriting was not asked for."""


def check_output_dir(save_dir: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                     overwrite_option: str = "overwrite=True") -> None:
    """Fail early (before any expensive work) when writing ``save_dir`` would destroy something.

    Refused whatever ``overwrite`` says: an empty path (it would resolve to the working directory), the
    working directory itself or any directory above it, a file, and a directory that is one of
    ``inputs`` (checkpoint paths being read), contains one or lies inside one. A non-empty directory is
    replaced only with ``overwrite`` (named ``overwrite_option`` in the error: the CLI's flag there).
    """
    if save_dir is None or not str(save_dir).strip():
        raise OutputDirError("the output path is empty: name the directory to write")
    save_dir = str(save_dir)
    target = os.path.realpath(save_dir)
    cwd = os.path.realpath(os.getcwd())
    if _is_within(cwd, target):
        raise OutputDirError(f"{save_dir} is the current working directory or contains it: write to a new "
                             "sub-directory instead")
    for source in inputs:
        if source is None or not str(source).strip() or not os.path.exists(source):
            continue  # a Hub id: nothing local to protect
        source_path = os.path.realpath(source)
        relation = ("is" if source_path == target else "contains" if _is_within(source_path, target)
                    else "lies inside" if _is_within(target, source_path) else None)
        if relation:
            raise OutputDirError(f"{save_dir} {relation} the input {source}: write the result to another "
                                 "directory, outside the input")
    if os.path.isfile(save_dir):
        raise OutputDirError(f"{save_dir} is a file, not a directory")
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise OutputDirError(f"{save_dir} is not empty: choose another directory or pass {overwrite_option}")
    _check_parent_writable(target, save_dir)


def _check_parent_writable(target: str, save_dir: str) -> None:
    """The nearest existing ancestor of ``target`` must be a directory we may create entries in (the
    result is written to a sibling of ``target`` and renamed), checked before any expensive work."""
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputDirError(f"cannot write {save_dir}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write {save_dir}: no permission to create files in {ancestor}")


def model_sources(model) -> list[str]:
    """Local paths a model was read from (its ``_name_or_path``, the base model of an A3 record): a save
    of that model must not replace them."""
    config = getattr(model, "config", None)
    try:
        record = compression_record(config) if config is not None else None
    except RecordError:  # a malformed record names no source; the save itself refuses it later
        record = None
    candidates = [getattr(config, "_name_or_path", None), record.base_model if record else None]
    return [str(c) for c in candidates if isinstance(c, (str, os.PathLike)) and str(c).strip()]


def _is_within(path: str, directory: str) -> bool:
    """Whether real path ``path`` is ``directory`` or lies below it."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def partial_dir(parent: str, name: str) -> str:
    """Create the hidden work directory ``.NAME.partial-HOST-PID-*`` in ``parent``.

    Host and process id are in the name so that a later run can tell leftovers of a killed process
    (SIGKILL, power loss) from the work of a live one; see :func:`remove_stale_partials`.
    """
    remove_stale_partials(parent, name)
    return tempfile.mkdtemp(prefix=f".{name}.partial-{_host()}-{os.getpid()}-", dir=parent)


def remove_stale_partials(parent: str, name: str) -> list[str]:
    """Delete ``.NAME.partial-HOST-PID-*`` directories of this host whose process no longer exists.

    Work of live processes and of other hosts (a shared file system) is left alone; so is anything
    else, such as a ``.NAME.old-*`` directory, which may hold the only copy of a previous checkpoint.
    """
    prefix = f".{name}.partial-{_host()}-"
    removed = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


@contextlib.contextmanager
def atomic_directory(save_dir: str, overwrite: bool = False, inputs: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``save_dir`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary directory is deleted and ``save_dir``
    is untouched; one left by a killed process is deleted by the next save to the same place. With
    ``overwrite`` an existing directory is moved aside first and removed only after the new one is in place.
    """
    inputs = tuple(inputs)
    check_output_dir(save_dir, overwrite, inputs)
    save_dir = os.path.abspath(save_dir)
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = partial_dir(parent, os.path.basename(save_dir))
    try:
        yield tmp
        _apply_umask(tmp)
        _replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(directory: str) -> None:
    """Give ``directory`` and everything in it the modes a plain ``mkdir``/``open`` would (0777/0666 less
    the umask): ``mkdtemp`` makes the work directory 0700, and some writers make their files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_tokenizer(tokenizer, directory: str) -> None:
    """``tokenizer.save_pretrained(directory)`` without the load-time facts transformers records in
    ``tokenizer_config.json`` (``local_files_only`` under ``HF_HUB_OFFLINE``, ``is_local``), which would make
    the same checkpoint differ byte for byte between an offline and an online run."""
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if any(key in config for key in _LOAD_TIME_TOKENIZER_KEYS):
        for key in _LOAD_TIME_TOKENIZER_KEYS:
            config.pop(key, None)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


_LOAD_TIME_TOKENIZER_KEYS = ("local_files_only", "is_local")


def _replace(new: str, target: str) -> None:
    old = None
    if os.path.isdir(target):
        if os.listdir(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
            os.rmdir(old)
            os.rename(target, old)
        else:
            os.rmdir(target)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomically(save_dir: str, writer: Callable[[str], None], overwrite: bool = False,
                     inputs: Iterable[str] = ()) -> str:
    """Run ``writer(tmp_dir)`` and move the result to ``save_dir`` atomically; returns ``save_dir``.

    ``save_dir`` is checked by :func:`check_output_dir` (with ``inputs``) first.
    """
    with atomic_directory(save_dir, overwrite, inputs) as tmp:
        writer(tmp)
    return save_dir
