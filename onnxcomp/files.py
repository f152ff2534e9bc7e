"""Atomic file writes: a temporary file in the target folder, renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from onnxcomp.errors import OutputError


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: Path, write) -> Path:
    """Call write(open binary file) on a temporary file beside `path`, renamed onto it once complete."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the folder {folder} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(cannot_write(path, exc)) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextmanager
def staging_folder(path: Path):
    """A temporary folder beside `path` for files that are renamed into place once complete
    (data files before the model that points at them), removed afterwards whatever happens; an
    OSError inside becomes one OutputError line naming `path`."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the folder {folder} does not exist")
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
        yield staging
    except OSError as exc:
        raise OutputError(cannot_write(path, exc)) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def cannot_write(path: Path, exc: OSError) -> str:
    """The one line for an OSError while writing `path`: the path and the reason, e.g.
    "out/model.onnx: cannot write (Read-only file system)"."""
    return f"{path}: cannot write ({exc.strerror or exc})"


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output whose folder is missing or cannot take a new file
    (read-only file system, no permission): a temporary file is made there and removed.
    Raises OutputError naming the path and the reason."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the folder {folder} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(cannot_write(path, exc)) from exc
    os.close(fd)
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
