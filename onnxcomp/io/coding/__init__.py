"""Entropy coders used by the packed (.onnxc) container.

    kind, itemsize = layout(onnx_data_type, storage_dtype)
    shared = fit_shared([(values, kind, itemsize, shape), ...], coder)   # model-wide tables
    stream, choice = encode_tensor(values, kind, itemsize, shape, coder, shared)
    data = decode_tensor(stream, kind, itemsize, count, shared, where)

Coders: raw; zstd (level 19, the baseline); huffman (constriction's Huffman trees over byte
planes); rans (the table-driven rANS of fastrans over byte planes, one table per plane or per-row
ids into the model's shared tables); auto (the smallest per tensor and per plane of all of these
plus brotli 11 and xz on tensors up to 64 KB; xz only where it is 3 % smaller, since it decodes
~15x slower). Modules: io (bounds-checked bytes), models (tables, constriction's rANS and
Huffman), fastrans (the compiled rANS), tables (shared tables by clustering channels), planes
(float/int byte planes, rows, sparsity), tensor (stream format).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from onnxcomp.io.coding import planes as _planes
from onnxcomp.io.coding import tables as _tables
from onnxcomp.io.coding import tensor as _tensor
from onnxcomp.io.coding.io import CorruptStream
from onnxcomp.io.coding.tensor import CODERS
from onnxcomp.io.coding.tensor import decode as decode_tensor
from onnxcomp.io.coding.tensor import encode as encode_tensor

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE, onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
FIT_ROWS = 8000
UNIFORM_BITS = 7.5


@functools.lru_cache(maxsize=1024)  # asked once per tensor: a model of many small ones asks often
def layout(data_type: int, storage: np.dtype) -> tuple[str, int]:
    """How values stored as `storage` are coded: ('f' float | 'i' int | 'b' bytes, bytes per item)."""
    storage = np.dtype(storage)
    if storage.itemsize == 1:
        return "b", 1
    if data_type in FLOAT_TYPES and storage.kind in "fcu":
        size = storage.itemsize // (2 if storage.kind == "c" else 1)
        return "f", size
    return "i", storage.itemsize


def fit_shared(items, coder: str) -> np.ndarray:
    """Shared tables for the rANS coders, fitted on the rows of every plane of every tensor."""
    if coder not in ("auto", "rans"):
        return np.zeros((0, 256), np.int64)
    hists = []
    for values, kind, itemsize, shape in items:
        if values.nbytes > _tensor.SAMPLE_MIN:  # rows of a sample: the fit keeps FIT_ROWS rows anyway
            values, shape = _tensor.sample(values, shape, itemsize)
        for v in _planes.variants(values, kind, itemsize, shape):
            if len(v.lengths) < 2:
                continue
            for plane in v.planes:
                h = _planes.row_hists(plane, v.lengths)
                total = np.bincount(plane, minlength=256)
                if _tables.entropy_bits(total) < UNIFORM_BITS * plane.size and np.count_nonzero(total) > 1:
                    hists.append(h)
    if not hists:
        return np.zeros((0, 256), np.int64)
    h = np.concatenate(hists)
    if len(h) > FIT_ROWS:
        h = h[np.linspace(0, len(h) - 1, FIT_ROWS).astype(np.int64)]
    return _tables.fit(h)


__all__ = ["CODERS", "CorruptStream", "layout", "fit_shared", "encode_tensor", "decode_tensor"]
