"""Atomic checkpoint writing: a save either completes or leaves ``save_dir`` as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
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
def atomic_directory(save_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``save_dir`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary directory is deleted and ``save_dir``
    is untouched; one left by a killed process is deleted by the next save to the same place. With
    ``overwrite`` an existing directory is moved aside first and removed only after the new one is in place.
    """
    check_output_dir(save_dir, overwrite)
    save_dir = os.path.abspath(save_dir)
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = partial_dir(parent, os.path.basename(save_dir))
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
