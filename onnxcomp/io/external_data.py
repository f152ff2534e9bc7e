"""Reading tensors held in external data files, safely: every location is checked to stay in the
model's own folder before anything is opened, every length against the file and the tensor's
shape; main-graph weights can stay in their file, memory-mapped on demand (ExternalValues), so a
model of several GB is never all in memory at once. (Moved out of model.py, which re-exports it.)"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcomp.errors import InputError

if TYPE_CHECKING:
    from onnxcomp.model import Model

COPY_CHUNK = 16 * 2**20


def refuse_external_references(proto: onnx.ModelProto, where: str) -> None:
    """A packed file or bytes in memory holds all its data: a tensor that still points at an
    external file would be read relative to wherever the process runs. Refused before any open."""
    for tensor in _external_tensors(proto):
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        raise InputError(f"{where}: tensor {tensor.name!r} points at an external file {location!r}; "
                         "only an .onnx file's own folder may hold external data")


def external_fields(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor, each checked: offset and length
    are whole numbers >= 0 written in decimal (onnx's own reader raises a bare ValueError)."""
    fields = {entry.key: entry.value for entry in tensor.external_data}
    numbers = {}
    for key in ("offset", "length"):
        text = fields.get(key)
        if text is None:
            numbers[key] = None
            continue
        if not text.strip().isdigit() or not text.strip().isascii():
            raise InputError(f"tensor {tensor.name!r}: external data {key} {text!r} is not a whole number >= 0")
        numbers[key] = int(text)
    return fields.get("location", ""), numbers["offset"] or 0, numbers["length"]


def _external_tensors(proto: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(proto):  # covers subgraphs and attributes
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def load_external_data_safely(proto: onnx.ModelProto, base_dir: Path, defer: dict | None = None) -> None:
    """Load external tensor data, refusing any location outside the model's folder.

    Written here instead of calling onnx.load's loader because that loader had path-traversal
    holes (CVE-2024-27318, CVE-2024-5187): every location is resolved and checked *before* any
    file is opened, and lengths are checked against the file size. With `defer`, main-graph
    initializers that ExternalValues can map are checked the same way but left unread.
    """
    base = base_dir.resolve()
    deferrable = {t.name for t in proto.graph.initializer if t.data_type in MAPPABLE} if defer is not None else set()
    for tensor in _external_tensors(proto):
        location, offset, length = external_fields(tensor)
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(f"tensor {tensor.name!r}: external data location {location!r} escapes the model's folder")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"tensor {tensor.name!r}: external data location {location!r} escapes the model's folder")
        if not target.is_file():
            raise InputError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        size = target.stat().st_size
        expected = _declared_nbytes(tensor)
        if length is None:
            length = expected if expected is not None else max(size - offset, 0)
        if offset + length > size:
            raise InputError(
                f"tensor {tensor.name!r}: external data {location!r} is shorter than declared "
                f"(needs {offset + length} bytes, has {size})"
            )
        if expected is not None and length != expected:
            raise InputError(
                f"tensor {tensor.name!r}: external data length {length} does not match its shape ({expected} bytes)"
            )
        if tensor.name in deferrable and tensor.name not in defer:  # the main graph's come first
            defer[tensor.name] = (target, offset, length)
            continue
        with open(target, "rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


# Element types whose raw little-endian bytes numpy maps as they are.
MAPPABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL,
            onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


class ExternalValues(LazyValues):
    """An initializer's values left in its (already checked) external data file.

    A pass that reads `const.values` gets a copy-on-write memory map (pages are read on demand
    and the kernel may drop them again; writing to the array never touches the file); saving
    copies the bytes file to file. So a model of several GB is never all in memory at once.
    """

    def __init__(self, meta: onnx.TensorProto, path: Path, offset: int, length: int):
        # (LazyValues.__init__ is not called: it would keep the whole TensorProto.)
        self._meta = onnx.TensorProto(name=meta.name, data_type=meta.data_type, dims=meta.dims)
        self.path, self.offset, self.length = Path(path), int(offset), int(length)
        self.shape = tuple(int(d) for d in meta.dims)
        self.dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(meta.data_type)).newbyteorder("<")
        self.nbytes = self.length

    @property
    def tensor(self) -> onnx.TensorProto:
        """The tensor with its data (graphsurgeon's exporter embeds this)."""
        full = onnx.TensorProto()
        full.CopyFrom(self._meta)
        full.raw_data = self.read_bytes()
        return full

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.length)
        if len(data) != self.length:
            raise InputError(f"tensor {self._meta.name!r}: external data {self.path.name!r} became shorter "
                             f"than declared while the model was open")
        return data

    def copy_to(self, out) -> None:
        """Append the bytes to the open file `out`, a chunk at a time."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            left = self.length
            while left:
                chunk = fh.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise InputError(f"tensor {self._meta.name!r}: external data {self.path.name!r} became "
                                     f"shorter than declared while the model was open")
                out.write(chunk)
                left -= len(chunk)

    def load(self) -> np.ndarray:
        if self.length == 0 or not self.shape:
            return np.frombuffer(self.read_bytes(), self.dtype).reshape(self.shape).copy()
        mapped = np.memmap(self.path, dtype=self.dtype, mode="c", offset=self.offset, shape=self.shape)
        return mapped.view(np.ndarray)  # a plain array (the map stays open through .base)

    def __str__(self):
        return f"ExternalValues(shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


def _walk_constants(graph: gs.Graph, seen: set[int]):
    """Every Constant read or produced in `graph` and its subgraphs, once each."""
    for tensor in [*graph.inputs, *graph.outputs, *(t for n in graph.nodes for t in (*n.inputs, *n.outputs))]:
        if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor
    from onnxcomp.graph_utils import subgraphs

    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from _walk_constants(sub, seen)


def _attach_external_values(model: Model, proto: onnx.ModelProto, deferred: dict) -> None:
    """Point the Constants of deferred initializers at their file (see ExternalValues); any
    deferred tensor graphsurgeon did not make a Constant of is read now, as before."""
    attached = set()
    for const in _walk_constants(model.graph, set()):
        values = const._values
        if const.name in deferred and isinstance(values, LazyValues) and not isinstance(values, ExternalValues):
            const._values = ExternalValues(values.tensor, *deferred[const.name])
            const.data_location = None  # exported like any in-memory tensor unless save() streams it
            attached.add(const.name)
    for tensor in proto.graph.initializer:
        if tensor.name in deferred and tensor.name not in attached:
            target, offset, length = deferred[tensor.name]
            with open(target, "rb") as fh:
                fh.seek(offset)
                tensor.raw_data = fh.read(length)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


@functools.cache
def _itemsize(data_type: int) -> int | None:
    """Bytes per element of an ONNX data type; None for strings and unknown types."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return None if data_type == onnx.TensorProto.STRING or itemsize == 0 else itemsize


def _declared_nbytes(tensor: onnx.TensorProto) -> int | None:
    itemsize = _itemsize(tensor.data_type)
    if itemsize is None:
        return None
    count = math.prod(tensor.dims)  # Python ints: hostile dims cannot overflow into a small size
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count * 4 + 7) // 8
    return count * itemsize
