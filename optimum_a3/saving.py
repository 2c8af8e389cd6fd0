"""Atomic checkpoint writing: a save either completes or leaves ``save_dir`` as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator


class OutputDirError(FileExistsError):
    """The output directory is not empty and overwriting was not asked for."""


def check_output_dir(save_dir: str, overwrite: bool) -> None:
    """Fail early (before any expensive work) when ``save_dir`` would be clobbered."""
    if os.path.isfile(save_dir):
        raise OutputDirError(f"{save_dir} is a file, not a directory")
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise OutputDirError(f"{save_dir} is not empty: choose another directory or pass overwrite=True")


@contextlib.contextmanager
def atomic_directory(save_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``save_dir`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary directory is deleted and ``save_dir``
    is untouched. With ``overwrite`` an existing directory is moved aside first and removed only after
    the new one is in place.
    """
    check_output_dir(save_dir, overwrite)
    save_dir = os.path.abspath(save_dir)
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.partial-", dir=parent)
    try:
        yield tmp
        _replace(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_atomically(save_dir: str, writer: Callable[[str], None], overwrite: bool = False) -> str:
    """Run ``writer(tmp_dir)`` and move the result to ``save_dir`` atomically; returns ``save_dir``."""
    with atomic_directory(save_dir, overwrite) as tmp:
        writer(tmp)
    return save_dir
