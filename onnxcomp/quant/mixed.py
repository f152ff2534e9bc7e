"""Per-layer bit widths chosen from measured costs: a multiple-choice knapsack.

Each layer offers a few choices, each with its measured packed bytes and its measured output error
(the whole model's, with that layer alone changed; errors of different layers are taken to add
up). Starting from every layer's largest choice, steps to cheaper choices are taken in order of
error added per byte saved, along each layer's lower convex hull (a step off the hull is never
the cheapest way to save those bytes), until the byte budget is met — or, with an error bound,
while the summed error stays within it. That greedy is the optimum of the convex relaxation and
within one step of the integer optimum.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    bits: float  # (an int but for the entropy grid's half widths)
    nbytes: int
    error: float
    sparsity: float = 0.0


def _hull(choices: list[Choice]) -> list[Choice]:
    """The lower convex hull of (bytes saved, error), from the largest choice to the smallest.

    A choice with no fewer bytes and no less error than another is dropped first (measured
    errors of near-lossless choices are noise-level and need not fall with more bytes)."""
    kept: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.nbytes, c.error)):  # smallest first
        if not kept or c.error < kept[-1].error:
            kept.append(c)
    kept.reverse()  # largest first, error rising as bytes fall
    top = kept[0].nbytes
    hull: list[Choice] = []
    for c in kept:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            ax, bx, cx = top - a.nbytes, top - b.nbytes, top - c.nbytes
            if (bx - ax) * (c.error - a.error) - (b.error - a.error) * (cx - ax) <= 0:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def choose(table: dict[str, list[Choice]], budget: int | None = None, max_error: float | None = None
           ) -> dict[str, Choice]:
    """The choice per layer: within `budget` bytes at the least error, or the fewest bytes with
    summed error <= `max_error` (both: the budget, never past the error bound)."""
    hulls = {name: _hull(choices) for name, choices in table.items()}
    chosen = {name: hull[0] for name, hull in hulls.items()}
    steps = []
    for order, (name, hull) in enumerate(hulls.items()):
        for i in range(1, len(hull)):
            saved = hull[i - 1].nbytes - hull[i].nbytes
            added = hull[i].error - hull[i - 1].error
            steps.append((added / max(saved, 1), order, i, name))
    steps.sort()
    total = sum(c.nbytes for c in chosen.values())
    spent = sum(c.error for c in chosen.values())
    for _, _, i, name in steps:
        if budget is not None and total <= budget:
            break
        step = hulls[name][i]
        if hulls[name][i - 1] is not chosen[name]:
            continue  # (the hull is convex, so a layer's steps come in order; this guards ties)
        added = step.error - chosen[name].error
        if max_error is not None and spent + added > max_error:
            if budget is None:
                break
            continue
        total += step.nbytes - chosen[name].nbytes
        spent += added
        chosen[name] = step
    return chosen
