"""Writing outputs whole or not at all: a pod can be SIGKILLed, or its node lose power, at any instant.

Every file goes to a temporary name in its own folder, is flushed to disk (fsync) and renamed over
the final name, which POSIX makes atomic: a reader sees the old file or the new one, never half of
one. A folder (a checkpoint) is filled under a temporary name, synced, and renamed the same way.
Temporary names start with a dot, so the jobs' globs for their outputs never see them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def _file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temporary:
        temporary.write_bytes(data)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to (for libraries that write to a path themselves);
    on leaving the block it is synced and renamed over `path`, or removed if the block failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.fchmod(descriptor, FILE_MODE)  # mkstemp's 0600 would hide outputs from readers under other UIDs
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def publish_folder(partial: Path, final: Path) -> None:
    """Sync every file of `partial`, then rename it to `final` (replacing an older `final`)."""
    for file in partial.rglob("*"):
        if file.is_file():
            _fsync(file)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _fsync(final.parent)


@contextmanager
def staged_into(folder: Path, last: str) -> Iterator[Path]:
    """A staging folder for outputs that then move into `folder` one by one, `last` last; a kill while
    they move leaves each output whole, the previous version or this one (the rerun stages them again)."""
    staging, replaced = folder / ".final.partial", folder / ".final.replaced"
    for leftover in (staging, replaced):  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    for file in staging.rglob("*"):
        if file.is_file():
            _fsync(file)
    replaced.mkdir()
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == last):
        if (folder / entry.name).exists():
            (folder / entry.name).rename(replaced / entry.name)
        entry.rename(folder / entry.name)
    shutil.rmtree(replaced)
    staging.rmdir()
    _fsync(folder)


def remove_leftovers(folder: Path, names: set[str]) -> None:
    """Delete the temporaries that a killed write of one of `names` left in `folder`."""
    for temporary in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        if temporary.name[1:].rsplit(".", 2)[0] in names:
            temporary.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
