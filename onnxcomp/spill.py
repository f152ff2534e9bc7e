"""Spill files: new weights of a model read from external data stay on disk, not in memory (issue 19).

A model whose weights live in an external data file is read one tensor at a time (memory maps,
model.ExternalValues), so passes that only read weights (fold, cleanup, quantization to fewer
bytes) run in a fraction of the model's size. A pass that rewrites weights at full size (prune)
would still hold every new tensor until the model is saved: the whole model again. Instead, each
new tensor is appended to a temporary spill file and the Constant reads it back from there on
demand, like any external weight; saving copies it file to file.

The spill file is removed once no weight reads from it any longer (every SpilledValues holds it),
or at interpreter exit; a process killed outright leaves it in the temp folder (named
onnxcomp-spill-*).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.model import EXTERNAL_DATA_ALIGN, ExternalValues

SPILL_MIN = 1 << 20  # new values of at least this many bytes go to the spill file


class SpillFile:
    """One temporary file that new tensors are appended to."""

    def __init__(self, folder: str | None = None):
        fd, path = tempfile.mkstemp(prefix="onnxcomp-spill-", suffix=".bin", dir=folder)
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb")
        weakref.finalize(self, _remove, self._file, self.path)

    def append(self, array: np.ndarray) -> tuple[int, int]:
        """Write the array's bytes (little-endian, C order) at the next aligned offset; returns (offset, length)."""
        out = self._file
        out.write(b"\0" * (-out.tell() % EXTERNAL_DATA_ALIGN))
        offset = out.tell()
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        out.write(data.reshape(-1).view(np.uint8).data)
        out.flush()  # readers map the file: the bytes must be in it, not in our buffer
        return offset, out.tell() - offset


def _remove(file, path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)


class SpilledValues(ExternalValues):
    """An initializer's values in a spill file; keeps the file alive while it is read from."""

    def __init__(self, meta: onnx.TensorProto, spill: SpillFile, offset: int, length: int):
        super().__init__(meta, spill.path, offset, length)
        self.spill = spill


_current: weakref.ref | None = None


def _spill_file() -> SpillFile:
    """The process's current spill file (a new one once the last is gone)."""
    global _current
    spill = _current() if _current is not None else None
    if spill is None:
        spill = SpillFile()
        _current = weakref.ref(spill)
    return spill


def _read_from_file(values) -> bool:
    """Values an external data file holds: not yet read, or read as a memory map of it."""
    if isinstance(values, ExternalValues):
        return True
    while isinstance(values, np.ndarray):
        if isinstance(values, np.memmap):
            return True
        values = values.base
    return False


def replace_values(const: gs.Constant, new: np.ndarray) -> None:
    """Give `const` new values. If its old ones came from an external data file (a model that
    may not fit in memory) and the new ones are large, they go to the spill file and are read
    back from there when needed; otherwise they are simply set."""
    if not (_read_from_file(const._values) and new.nbytes >= SPILL_MIN):
        const.values = new
        return
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    spill = _spill_file()
    offset, length = spill.append(new)
    meta = onnx.TensorProto(name=const.name, data_type=dtype_to_onnx(new.dtype), dims=[int(d) for d in new.shape])
    const._values = SpilledValues(meta, spill, offset, length)
