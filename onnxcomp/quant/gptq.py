"""GPTQ: low-bit uniform weights whose rounding error is compensated by the weights not yet rounded.

For a layer y = W x with calibration Hessian H = 2·X·Xᵀ/n (onnxcomp.hessian), GPTQ (Frantar et al.,
2023, the OBQ family) rounds W column by column; after each column the error e = (w - q) / [U]_ii
is spread over the columns still to come through the upper Cholesky factor U of H⁻¹, so the
layer's output error, not the weight error, is what the rounding minimises. Columns are visited in
lazy blocks (one matrix product per block for the rest), optionally in act-order (largest diag(H)
first), with groups of `group` consecutive input columns sharing one scale and zero point.

With no Hessian (embedding tables, which feed no product) the same grid is used with plain
round-to-nearest. Every grid's range is searched (shrunk towards zero, as GPTQ's `mse` option does)
for the least error, weighted by diag(H) where there is one: at 2-3 bits clipping the rare large
weights costs less than the resolution they take from all the others.

Hand-written (no library does GPTQ on numpy arrays); the column loop is numpy row operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcomp.hessian import inverse_cholesky

SHRINK_STEPS = np.linspace(1.0, 0.5, 11)  # range fractions tried by the grid search
SCALE_MANTISSA_BITS = 10  # scales keep float16's precision (in float32's range): cheaper to code, same accuracy
ERROR_NORM = 2.4  # GPTQ's grid-search norm: between squared error and the max


@dataclass
class Quantized:
    """One weight in rows layout [rows, cols]: w ≈ scale[:, g] · (codes - zero[:, g])."""

    codes: np.ndarray  # uint8 [rows, cols], values in [0, 2**bits - 1]
    scale: np.ndarray  # float32 [rows, groups]
    zero: np.ndarray  # uint8 [rows, groups]
    bits: float  # an int but for the entropy grid's half widths
    group: int  # columns per group (the last one may be short)

    def group_of_columns(self) -> np.ndarray:
        return np.arange(self.codes.shape[1]) // self.group

    def dequantized(self) -> np.ndarray:
        g = self.group_of_columns()
        return (self.scale[:, g] * (self.codes.astype(np.float32) - self.zero[:, g])).astype(np.float32)


def short_mantissa(x: np.ndarray, bits: int = SCALE_MANTISSA_BITS) -> np.ndarray:
    """float32 values rounded to `bits` mantissa bits (to nearest): the coder then stores only those."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    u = ((u + (1 << (drop - 1))) >> drop) << drop
    return u.astype(np.uint32).view(np.float32)


def usable_scale(scale: np.ndarray) -> np.ndarray:
    """`scale` with zeros (a row of denormal weights whose step underflows float32, PP-OCR's
    recognizer has some) made 1: such a row rounds to its zero point, an error below 1e-38."""
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def fit_grid(w: np.ndarray, bits: int, symmetric: bool = False, weights: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per row of w [rows, n] minimising Σ weights·|w - q|^2.4 over shrunk ranges."""
    maxq = 2**bits - 1
    w = np.asarray(w, np.float32)  # (float32: the search only ranks candidate grids)
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    best_err = np.full(len(w), np.inf)
    best_scale = np.ones(len(w))
    best_zero = np.zeros(len(w))
    col_weights = np.ones(w.shape[1], np.float32) if weights is None else \
        np.maximum(np.asarray(weights, np.float32), 1e-12)
    for p in SHRINK_STEPS:
        a, b = lo * p, hi * p
        scale = usable_scale(short_mantissa(np.where(b > a, (b - a) / maxq, 1.0)))
        zero = np.full(len(w), (maxq + 1) // 2, np.float32) if symmetric else np.clip(np.rint(-a / scale), 0, maxq)
        q = np.clip(np.rint(w / scale[:, None]) + zero[:, None], 0, maxq)
        err = (np.abs(scale[:, None] * (q - zero[:, None]) - w) ** ERROR_NORM) @ col_weights
        better = err < best_err
        best_err[better], best_scale[better], best_zero[better] = err[better], scale[better], zero[better]
    return best_scale.astype(np.float32), best_zero.astype(np.uint8)


ENTROPY_GRID_BITS = 5  # the entropy grid's widest choice: wider ones would clip at uint8's 255 levels
ENTROPY_ZERO = 128


def entropy_step(bits: float) -> float:
    """The entropy grid's step, in units of the row's RMS, at which round-to-nearest codes of
    Gaussian weights carry about `bits` bits of entropy (h(N(0,1)) = 2.05 bits - log2 step)."""
    return float(2.0 ** (2.05 - bits))


def fit_entropy_grid(w: np.ndarray, bits: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per row of w [rows, n] for entropy-coded storage: one uniform step per row,
    `entropy_step(bits)` times the row's RMS, zero in the middle of uint8's range and no clipping
    short of it. The container entropy-codes the codes, so a level that is rarely used costs
    little: unlike a min/max grid of 2**bits levels, no resolution goes to the rare large weights,
    and at the same coded bytes the error is lower (MiniLM's word embeddings, round-to-nearest: a
    3-bit min/max grid per 128 weights, 0.046 relative squared error at a code entropy of 2.57 bits
    plus a scale and zero per 128; this grid at a step of 0.7 RMS, 0.041 at 2.59 bits plus a scale
    per row of 384)."""
    w = np.asarray(w, np.float64)
    rms = np.sqrt(np.mean(w * w, axis=1))
    scale = usable_scale(short_mantissa(np.where(rms > 0, rms * entropy_step(bits), 1.0)))
    return scale.astype(np.float32), np.full(len(w), ENTROPY_ZERO, np.uint8)


def _round(col: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int, pruned: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    q = np.clip(np.rint(col / scale) + zero, 0, maxq)
    if pruned is not None:
        q = np.where(pruned, zero, q)  # the integer zero point is exactly 0.0: pruned weights stay zero
    return q, scale * (q - zero)


def factor(h: np.ndarray, act_order: bool = True, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(visiting order of the columns, upper Cholesky factor of the reordered H⁻¹): what GPTQ needs
    of a Hessian, the same for every bit width (callers trying several widths compute it once)."""
    h = np.asarray(h, np.float64)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    return order, inverse_cholesky(h[np.ix_(order, order)], percdamp)[0]


def factor_many(hs: list[np.ndarray], act_order: bool = True, percdamp: float = 0.01) -> list[tuple]:
    """`factor` of each of many Hessians: same-sized ones (a depthwise conv has one 9 x 9 Hessian
    per channel; PP-OCR rec has 21,000 of them across its attempts) in one batched Cholesky and
    inverse instead of one scipy call each; a stack that needs more damping goes one by one."""
    if len(hs) < 2 or len({np.shape(h) for h in hs}) != 1:
        return [factor(h, act_order, percdamp) for h in hs]
    h = np.asarray(hs, np.float64)  # [groups, n, n]
    n = h.shape[1]
    diag = np.diagonal(h, axis1=1, axis2=2)
    order = np.argsort(-diag, axis=1, kind="stable") if act_order else np.tile(np.arange(n), (len(h), 1))
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    diag = np.diagonal(h, axis1=1, axis2=2).copy()  # dampened(), stacked: dead inputs get 1, then + λ
    diag[diag <= 0] = 1.0
    mean = diag.mean(axis=1)
    diag += percdamp * np.where(mean > 0, mean, 1.0)[:, None]
    h[:, np.arange(n), np.arange(n)] = diag
    try:
        low = np.linalg.cholesky(h[:, ::-1, ::-1])
    except np.linalg.LinAlgError:
        return [factor(x, act_order, percdamp) for x in hs]
    upper = np.triu(np.linalg.inv(low)[:, ::-1, ::-1])  # U = P·L̃⁻¹·P as in inverse_cholesky
    return [(order[g], np.ascontiguousarray(upper[g])) for g in range(len(h))]


def _prune_block(w1: np.ndarray, d: np.ndarray, pruned: np.ndarray, sparsity: float, unseen: np.ndarray) -> None:
    """Mark the block's least salient weights (OBS: w² / [H⁻¹]_qq, SparseGPT's choice) up to `sparsity`
    of its seen columns; never those of `unseen` columns (no calibration evidence either way, see
    quantize), which do not count either: a block of mostly unseen inputs is not emptied of the rest."""
    seen = np.broadcast_to(~unseen[None, :], w1.shape)
    score = np.where(pruned | ~seen, np.inf, w1 ** 2 / (d[None, :] ** 2))
    want = round(sparsity * int(seen.sum())) - int((pruned & seen).sum())
    if want <= 0:
        return
    pruned.flat[np.argpartition(score.ravel(), want - 1)[:want]] = True


def quantize(w: np.ndarray, bits: int, group: int = 0, h: np.ndarray | None = None, symmetric: bool = False,
             act_order: bool = True, blocksize: int = 128, percdamp: float = 0.01, sparsity: float = 0.0,
             factored: tuple[np.ndarray, np.ndarray] | None = None, grid: str = "minmax") -> Quantized:
    """Quantize w [rows, cols] to `bits` with groups of `group` columns (0: one group per row).

    `grid="entropy"`: one uniform grid per row for entropy-coded storage (fit_entropy_grid; `group`
    and `symmetric` do not apply, codes use uint8's whole range).

    With a Hessian h [cols, cols], GPTQ; without, round-to-nearest on the same grid. Weights that
    are exactly zero (pruned before) stay exactly zero; with `sparsity`, that fraction of every
    column block is pruned as it is reached (SparseGPT's joint pruning and quantization), and GPTQ
    moves the error of both to the columns still to come. `factored`: factor(h) computed before.
    """
    w = np.array(w, np.float64)
    pruned = w == 0
    if sparsity and h is None:  # no Hessian: the smallest magnitudes go
        count = round(sparsity * w.size) - int(pruned.sum())
        if count > 0:
            pruned.flat[np.argpartition(np.where(pruned, np.inf, np.abs(w)).ravel(), count - 1)[:count]] = True
        w[pruned] = 0.0
    rows, cols = w.shape
    entropy = grid == "entropy"
    group = group if 0 < group < cols and not entropy else cols
    groups = -(-cols // group)
    maxq = 255 if entropy else 2**bits - 1
    codes = np.zeros((rows, cols), np.uint8)
    scale = np.ones((rows, groups), np.float32)
    zero = np.zeros((rows, groups), np.uint8)
    diag = np.diag(h) if h is not None else None

    def fit(g: int, block: np.ndarray, keep: np.ndarray | None = None) -> None:
        """The grid of group g from `block`, or from its columns `keep` only."""
        cols_of_g = np.arange(g * group, min((g + 1) * group, cols))
        if keep is not None and keep.any() and not keep.all():
            block, cols_of_g = block[:, keep], cols_of_g[keep]
        if entropy:
            scale[:, g], zero[:, g] = fit_entropy_grid(block, bits)
            return
        scale[:, g], zero[:, g] = fit_grid(block, bits, symmetric, None if diag is None else diag[cols_of_g])

    if h is None:
        for g in range(groups):
            fit(g, w[:, g * group:(g + 1) * group])
            s, z = scale[:, g].astype(np.float64), zero[:, g].astype(np.float64)
            cut = slice(g * group, (g + 1) * group)
            q, _ = _round(w[:, cut], s[:, None], z[:, None], maxq, pruned[:, cut])
            codes[:, g * group:(g + 1) * group] = q
        return Quantized(codes, scale, zero, bits, group)

    h = np.array(h, np.float64)
    # An input no calibration sample made non-zero keeps its weights, rounded (no error to spread:
    # its Hessian row is empty), unpruned. The GPTQ reference zeroes them, right for dead neurons
    # but wrong for a byte value or token the calibration data lacked: Magika's one-hot byte
    # embedding lost every byte its 8 calibration files did not hold (Python files not among
    # them fell to cosine 0.91).
    unseen = np.diag(h) <= 0
    order, u = factored if factored is not None else factor(h, act_order, percdamp)
    static = act_order  # groups follow the stored column order, not the visiting order: fix them first
    if static:  # (grids from the seen columns: an unseen one is often a dead unit's untrained weight,
        for g in range(groups):  # which would coarsen the step of every trained one; PP-OCR cls)
            fit(g, w[:, g * group:(g + 1) * group], ~unseen[g * group:(g + 1) * group])
    w, pruned, unseen = w[:, order], pruned[:, order], unseen[order]
    if not static:
        blocksize = max(group, (blocksize // group) * group) if group < cols else blocksize
    group_of = order // group
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if sparsity:
            _prune_block(w1, np.diag(u1), pruned[:, i1:i2], sparsity, unseen[i1:i2])
        for i in range(i2 - i1):
            c = i1 + i
            g = group_of[c]
            if not static and order[c] % group == 0:  # a group starts: its grid from the updated weights
                span = min(group, cols - c)
                fit(g, np.concatenate([w1[:, i:], w[:, i2:]], axis=1)[:, :span])
            s, z = scale[:, g].astype(np.float64), zero[:, g].astype(np.float64)
            q, deq = _round(w1[:, i], s, z, maxq, pruned[:, c])
            codes[:, order[c]] = q
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return Quantized(codes, scale, zero, bits, group)
