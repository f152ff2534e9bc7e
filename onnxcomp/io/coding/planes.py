"""Lossless transforms of a tensor into byte planes, with rows (channels) and an optional
sparsity split.

- Floats (16/32/64 bit): each value's bits are rotated left by one, so the sign moves to the
  lowest bit and the top byte holds the exponent; then one plane per byte, most significant
  first. The exponent plane is highly skewed, the low mantissa planes are nearly uniform.
- Integers wider than a byte: one plane per byte, most significant first (sign-extension bytes
  of small values are nearly constant). Bytes (int8, uint8, bool, packed int4/float8): one plane.
- Rows: the values are viewed as R rows (output channels): rows along axis 0 in natural order,
  or along the last axis (a MatMul weight's output channels) by coding the transpose. Rows
  shorter than 64 values are grouped so each row has enough symbols to model.
- Sparse (floats): a bitmap of non-zero values plus the non-zero values only (rows keep their
  own non-zero counts), for pruned tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ROW = 64
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def to_planes(values: np.ndarray, kind: str, itemsize: int) -> list[np.ndarray]:
    """values: 1-D array of unsigned ints of `itemsize` bytes -> itemsize uint8 planes (MSB first)."""
    if itemsize == 1:
        return [values.view(np.uint8)]
    u = values.view(UINT[itemsize])
    if kind == "f":
        bits = 8 * itemsize
        u = (u << UINT[itemsize](1)) | (u >> UINT[itemsize](bits - 1))
    b = u.astype(u.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1, itemsize)
    return [np.ascontiguousarray(b[:, itemsize - 1 - j]) for j in range(itemsize)]


def from_planes(planes: np.ndarray | list[np.ndarray], kind: str, itemsize: int, compiled: bool = False) -> np.ndarray:
    """Inverse of to_planes (planes: a list, or a (itemsize, n) array): unsigned ints of
    `itemsize` bytes (little-endian), 1-D. `compiled`: by the numba kernel, about 5x faster, for
    when numba is loaded anyway (importing it adds ~0.3 s to a cold start)."""
    if itemsize == 1:
        return planes[0]
    planes = np.ascontiguousarray(planes, np.uint8)
    if compiled:
        from onnxcomp.io.coding.fastrans import merge_planes_kernel

        out = np.empty(planes.shape[1], UINT[itemsize])
        merge_planes_kernel(planes, kind == "f", out)
        return out
    b = np.empty((planes.shape[1], itemsize), dtype=np.uint8)  # little-endian bytes of each value
    for j in range(itemsize):
        b[:, itemsize - 1 - j] = planes[j]
    u = b.view(np.dtype(UINT[itemsize]).newbyteorder("<")).reshape(-1).astype(UINT[itemsize], copy=False)
    if kind == "f":  # in place: u is this function's own array
        sign = u & UINT[itemsize](1)
        sign <<= UINT[itemsize](8 * itemsize - 1)
        u >>= UINT[itemsize](1)
        u |= sign
    return u


def group_factor(rows: int, n: int, min_row: int = MIN_ROW) -> int:
    """How many consecutive rows are merged so each group has >= min_row values."""
    per = max(1, n // max(1, rows))
    return max(1, -(-min_row // per))


def grouped(per_row: np.ndarray, g: int) -> np.ndarray:
    per_row = np.asarray(per_row, dtype=np.int64)
    return np.add.reduceat(per_row, np.arange(0, len(per_row), g)) if len(per_row) else per_row


def dense_lengths(rows: int, n: int) -> np.ndarray:
    """Symbols per grouped row of n values in `rows` equal rows: grouped() of them, in closed
    form (every decoded plane needs it, and a small model pays per call)."""
    g = group_factor(rows, n)
    full, rest = divmod(rows, g)
    per = n // rows
    lengths = np.full(full + bool(rest), g * per, np.int64)
    if rest:
        lengths[-1] = rest * per
    return lengths


def row_index(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths)), lengths)


def row_hists(plane: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(R, 256) symbol counts of each row."""
    r = len(lengths)
    if plane.size >= COMPILED_MIN:
        from onnxcomp.io.coding import kernels  # numba: the encoder only

        out = np.zeros((r, 256), np.int64)
        kernels.row_hists(np.ascontiguousarray(plane), np.asarray(lengths, np.int64), out)
        return out
    keys = row_index(lengths) * 256 + plane.astype(np.int64)
    return np.bincount(keys, minlength=r * 256).reshape(r, 256)


@dataclass
class Variant:
    """One way of laying a tensor out for coding."""

    axis: int                 # 0: rows along axis 0; 1: rows along the last axis (transposed)
    rows: int                 # base rows before grouping
    sparse: bool
    planes: list[np.ndarray]  # value planes (the non-zeros only when sparse)
    lengths: np.ndarray       # symbols per (grouped) row of every value plane
    mask: np.ndarray | None = None  # packed bitmap of non-zeros (sparse only)
    nnz: int = 0


COMPILED_MIN = 1 << 16  # values from which the encoder's compiled layout helpers pay for themselves


def order(values: np.ndarray, axis: int, rows: int) -> np.ndarray:
    """Values in coding order: natural, or the transpose of (n/rows, rows)."""
    if axis == 0:
        return values
    if values.size >= COMPILED_MIN:
        from onnxcomp.io.coding import kernels  # numba: the encoder only

        return kernels.transposed(values, rows)
    return values.reshape(-1, rows).T.ravel()


def unorder(values: np.ndarray, axis: int, rows: int) -> np.ndarray:
    return values if axis == 0 else values.reshape(rows, -1).T.ravel()


def variants(values: np.ndarray, kind: str, itemsize: int, shape: tuple[int, ...],
             try_sparse: bool = True, only: tuple[int, bool] | None = None) -> list[Variant]:
    """Candidate layouts: rows on axis 0 and on the last axis; dense and (floats) sparse.
    `only=(axis, sparse)`: build just that one (when a sample has chosen it)."""
    n = values.size
    axes = [(0, shape[0] if shape and shape[0] > 0 else 1)]
    if len(shape) >= 2 and shape[-1] > 1:
        axes.append((1, shape[-1]))
    out = []
    for axis, rows in axes:
        if n % rows or (only is not None and only[0] != axis):
            continue
        v = order(values, axis, rows)
        g = group_factor(rows, n)
        lengths = dense_lengths(rows, n)
        if only is None or not only[1]:
            out.append(Variant(axis, rows, False, to_planes(v, kind, itemsize), lengths))
        if try_sparse and kind == "f" and n >= 256 and (only is None or only[1]):
            nzmask = v.view(UINT[itemsize]) != 0
            nnz = int(nzmask.sum())
            if nnz <= 0.9 * n:
                per_row = nzmask.reshape(rows, -1).sum(axis=1)
                lengths_nz = grouped(per_row, g)
                out.append(Variant(axis, rows, True, to_planes(v[nzmask], kind, itemsize), lengths_nz,
                                   np.packbits(nzmask), nnz))
    return out


def sparse_row_lengths(mask_bits: np.ndarray, n: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The decoded bitmap as booleans, and the non-zeros per grouped row."""
    nzmask = np.unpackbits(mask_bits, count=n).astype(bool)
    per_row = nzmask.reshape(rows, -1).sum(axis=1)
    return nzmask, grouped(per_row, group_factor(rows, n))
