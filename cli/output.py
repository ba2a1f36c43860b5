"""Output files and folders of every entry point: checked before any work, written atomically, and never
replaced without overwrite=true.

`check_output` runs first, so a read-only folder, a path under an existing file or an existing
output fails in one line before minutes or hours of scoring. `write_file` writes next to the target
and renames: a reader never sees half a file. Without overwrite the rename is exclusive (a hard
link), so of two writers racing for the same path one wins and the other stops with an error;
with overwrite the last whole file wins. `output_folder` does the same for a folder of files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from cli.config import UserError


class OutputError(UserError, OSError):
    """An output path that cannot or may not be written; the message names it."""


def check_output(path: str | Path, overwrite: bool, folder: bool = False) -> Path:
    """`path` when it can be written now: its folder exists or is created, accepts a new file, and
    `path` is not taken (unless overwrite=true replaces a file, or a folder of the same kind)."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists() or path.is_symlink():
        if path.is_dir() != folder:
            raise OutputError(f"{path}: exists as a {'folder' if path.is_dir() else 'file'}; out= must name a {kind}")
        taken = not folder or any(path.iterdir())
        if taken and not overwrite:
            raise OutputError(f"{path}: exists; pass overwrite=true to replace it")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"{path}: {blocker} is a file, so no {kind} can be written under it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as err:
        raise OutputError(f"{path}: cannot write into {path.parent} ({err.strerror or err})") from None
    return path


def as_if_created(path: Path) -> Path:
    """Give a temporary file or folder the permissions a plainly created one would have (mkstemp and
    mkdtemp make them owner-only, which would carry over to outputs and shared caches)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    return path


def write_file(path: str | Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it into place atomically."""
    path = check_output(path, overwrite)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = as_if_created(Path(name))
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another writer got there first: nothing is replaced
            except FileExistsError:
                raise OutputError(f"{path}: written by another process meanwhile; pass overwrite=true to replace it") from None
            except OSError:  # a filesystem without hard links: the same rule, with a race window of one check
                if path.exists():
                    raise OutputError(f"{path}: written by another process meanwhile; pass overwrite=true to replace it") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; moved to `path` only when the block ends without error."""
    path = check_output(path, overwrite, folder=True)
    tmp = as_if_created(Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
