"""How far a candidate's outputs agree with the reference's, beyond the cosine: the measures the
accuracy gate (gate.py) applies per output. Score maps are judged by the Dice overlap of their
sure decisions, class distributions and `logits` by top-1 agreement over every row, and the pooled
cosine by its 95 % lower bound over the samples (jackknife)."""

from __future__ import annotations

import numpy as np

DECISION_MARGIN = 0.15  # score-map elements the reference is unsure of (0.35 < p < 0.65) are not judged


def is_score_map(values: list[np.ndarray]) -> bool:
    """Probabilities, mostly decided: every value in [0, 1], at most half of them in (0.1, 0.9),
    and both sides of 0.5 present (a box-coordinate output spreads over [0, 1] and is no score)."""
    if not values or values[0].dtype.kind != "f" or values[0].ndim < 1:
        return False
    flat = np.concatenate([v.ravel() for v in values]).astype(np.float64)
    if flat.size < 2 or not np.all(np.isfinite(flat)) or flat.min() < 0 or flat.max() > 1:
        return False
    undecided = np.mean((flat > 0.1) & (flat < 0.9))
    return bool(undecided <= 0.5 and np.any(flat > 0.5) and np.any(flat <= 0.5))


def cosine_lower_bound(reference: list[np.ndarray], candidate: list[np.ndarray], cosine: float,
                       z: float = 1.645) -> float:
    """One-sided 95 % lower bound of the pooled cosine: cosine - z * its jackknife standard error
    over the samples (leave one sample out, recompute; deterministic). A cosine on few samples
    that sits just above the bar is not trusted as if it held for every input like them."""
    sums = []
    for r, c in zip(reference, candidate):
        a, b = np.asarray(r, np.float64).ravel(), np.asarray(c, np.float64).ravel()
        if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return cosine  # compare_arrays' verdict stands (shapes, NaN)
        sums.append((float(a @ b), float(a @ a), float(b @ b)))
    ab, aa, bb = (np.array(col) for col in zip(*sums))
    n = len(ab)
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = (ab.sum() - ab) / np.sqrt((aa.sum() - aa) * (bb.sum() - bb))
    if n < 2 or not np.all(np.isfinite(loo)):
        return cosine
    se = float(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))
    return float(cosine - z * se)


def is_class_distribution(values: list[np.ndarray]) -> bool:
    """Rows of class probabilities: a float last axis of 2 or more values in [0, 1] summing to 1."""
    if not values or values[0].dtype.kind != "f" or values[0].ndim < 1 or values[0].shape[-1] < 2:
        return False
    for v in values:
        if v.size == 0 or not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 1:
            return False
        if not np.allclose(v.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3):
            return False
    return True


def is_logits(name: str, values: list[np.ndarray]) -> bool:
    """Class scores before a softmax, by the exporters' name for them (`logits`: Hugging Face and
    Optimum exports, a decoder's next-token scores): a float last axis of 2 or more."""
    return (name.lower().rsplit("/", 1)[-1].endswith("logits") and bool(values) and values[0].dtype.kind == "f"
            and values[0].ndim >= 2 and values[0].shape[-1] >= 2)


def top1_agreement(reference: list[np.ndarray], candidate: list[np.ndarray], name: str = "") -> float | None:
    """Share of rows (samples x positions) whose top-1 class is the same; None when the output is
    neither a class distribution nor named logits (a decoder's next token at every position)."""
    if not (is_class_distribution(reference) or is_logits(name, reference)) or \
            any(c.shape != r.shape for r, c in zip(reference, candidate)):
        return None
    same = total = 0
    for r, c in zip(reference, candidate):
        same += int(np.count_nonzero(r.argmax(axis=-1) == c.argmax(axis=-1)))
        total += r.size // r.shape[-1]
    return same / total if total else 1.0


def score_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float | None:
    """Dice overlap of the confident decisions on a score map (None when the output is no score map).

    Per channel (axis 1 of a 4-d map, else a last axis of at most 16) the reference's rarer
    decision is the one judged (p > 0.5 where that is the minority, else p <= 0.5). Only elements
    the reference is sure of (|p - 0.5| >= DECISION_MARGIN) count: there the reference's decision
    is compared with the candidate's (same side of 0.5), so an anchor at 0.47 that int8 moves to
    0.52 is no disagreement, while a speech chunk at 0.80 that drops to 0.39 is. The overlaps of
    all channels and samples are pooled."""
    if not is_score_map(reference) or any(c.shape != r.shape for r, c in zip(reference, candidate)):
        return None
    overlap = total = 0
    shape = reference[0].shape
    axis = 1 if len(shape) == 4 else (len(shape) - 1 if len(shape) >= 2 and shape[-1] <= 16 else None)
    for channel in range(shape[axis] if axis is not None else 1):
        ref = np.concatenate([(np.take(r, channel, axis) if axis is not None else r).ravel() for r in reference])
        cand = np.concatenate([(np.take(c, channel, axis) if axis is not None else c).ravel() for c in candidate])
        sure = np.abs(ref - 0.5) >= DECISION_MARGIN
        ref, cand = ref[sure], cand[sure]
        if np.mean(ref > 0.5) > 0.5:  # judge the rarer decision: background is easy to agree on
            ref, cand = 1 - ref, 1 - cand
        a, b = ref > 0.5, cand > 0.5
        overlap += 2 * int(np.count_nonzero(a & b))
        total += int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return overlap / total if total else 1.0
