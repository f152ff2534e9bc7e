"""Shared symbol tables: rows (channels) of every coded plane clustered into K histograms.

One histogram per output channel (the per-channel model) pays for a table per channel; most
channels differ mainly in width, so K shared tables for the whole model, fitted by Lloyd
iterations on code length (cross-entropy), get most of the per-channel gain for a one-byte
table id per row. K is chosen by the total cost: coded bits + table bytes + id bits.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.io.coding.io import Reader, Writer
from onnxcomp.io.coding.models import entropy_bits, quantize_counts, read_table, table_bytes, write_table

MAX_TABLES = 64
SMOOTH = 1e-3
UNCODABLE = 1e9


def _log_probs(tables: np.ndarray) -> np.ndarray:
    """-log2 p of each symbol under each table, as the coder sees it (absent symbols cost ~24 bits)."""
    t = tables.astype(np.float64)
    p = t / t.sum(axis=1, keepdims=True)
    cost = -np.log2(np.maximum(p, 2.0 ** -24))
    present = t > 0
    lo = np.argmax(present, axis=1)
    hi = t.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
    sym = np.arange(t.shape[1])
    cost[(sym[None, :] < lo[:, None]) | (sym[None, :] > hi[:, None])] = UNCODABLE  # outside the support
    return cost


def row_costs(hists: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Bits of coding each row (R, 256) with each table (K, 256) -> (R, K)."""
    return hists.astype(np.float64) @ _log_probs(tables).T


def _cluster_sums(hists: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """(k, 256) sum of the rows assigned to each cluster: a sparse one-hot matrix product (np.add.at
    over tens of thousands of rows is slow, and a dense one-hot product took most of a pack)."""
    from scipy import sparse

    onehot = sparse.csr_matrix((np.ones(len(assign)), (assign, np.arange(len(assign)))), shape=(k, len(assign)))
    return np.asarray(onehot @ hists)


def _lloyd(hists: np.ndarray, k: int, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    n = len(hists)
    probs = hists / np.maximum(hists.sum(axis=1, keepdims=True), 1)
    ent = -(np.where(probs > 0, probs * np.log2(np.maximum(probs, 1e-30)), 0)).sum(axis=1)
    order = np.argsort(ent, kind="stable")
    assign = np.empty(n, dtype=np.int64)
    assign[order] = np.minimum(np.arange(n) * k // max(n, 1), k - 1)
    for _ in range(iters):
        sums = _cluster_sums(hists, assign, k)
        keep = sums.sum(axis=1) > 0
        sums = sums[keep]
        p = (sums + SMOOTH) / (sums + SMOOTH).sum(axis=1, keepdims=True)
        new = np.argmin(hists @ (-np.log2(p)).T, axis=1)
        if np.array_equal(new, assign) and keep.all():
            break
        assign = new
        k = len(sums)
    sums = _cluster_sums(hists, assign, int(assign.max()) + 1)
    used = sums.sum(axis=1) > 0
    return sums[used], assign


def fit(hists: np.ndarray, max_tables: int = MAX_TABLES) -> np.ndarray:
    """Quantized shared tables (K, 256) for these row histograms, K chosen by total cost."""
    hists = np.asarray(hists, dtype=np.float64)
    hists = hists[hists.sum(axis=1) > 0]
    if len(hists) == 0:
        return np.zeros((0, 256), np.int64)
    best, best_cost = None, np.inf
    k = 1
    while k <= min(max_tables, len(hists)):
        sums, _ = _lloyd(hists, k)
        tables = np.stack([quantize_counts(s) for s in sums])
        costs = row_costs(hists, tables)
        bits = costs.min(axis=1).sum() + 8 * sum(table_bytes(t) for t in tables)
        bits += len(hists) * np.log2(len(tables)) if len(tables) > 1 else 0
        if bits < best_cost:
            best, best_cost = tables, bits
        elif k > 4:
            break
        k *= 2
    return best


def write(tables: np.ndarray) -> bytes:
    w = Writer()
    w.varint(len(tables))
    for t in tables:
        write_table(w, t)
    return w.getvalue()


def read(data: bytes | memoryview) -> np.ndarray:
    r = Reader(data, "shared tables")
    k = r.varint(255)
    out = np.zeros((k, 256), np.int64)
    for row in out:
        read_table(r, row)
    r.done()
    if not out.any(axis=1).all():
        raise r.fail("a symbol table has no symbols")
    return out


__all__ = ["fit", "row_costs", "write", "read", "entropy_bits"]
