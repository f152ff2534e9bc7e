"""sensitivity: how much each layer's pruning alone hurts the model's outputs (analysis only).

For every prunable weight and each sparsity of a small grid, the layer alone is pruned (by
magnitude, or by SparseGPT with its calibration Hessian) and the whole model is run on held
calibration samples; the error is the relative squared error of the outputs,
Σ‖y - y₀‖² / Σ‖y₀‖², averaged over the float outputs. All candidates run in ONE ORT session:
the weights are exposed as overridable graph inputs, so no session is rebuilt per candidate.

`allocate` turns the table into per-layer sparsities: it walks the lower convex hull of every
layer's (weights removed, error) curve and takes the cheapest error-per-weight steps first
until the target sparsity (or the error bound) is reached — the greedy optimum of the convex
multiple-choice knapsack. The `prune(scope=auto)` pass uses both; this pass reports the table
and leaves the result in the context for a later `prune(scope=auto)` with the same settings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from onnxcomp import hessian as hs
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.override import OverrideRunner, output_error  # noqa: F401 (output_error: re-exported)
from onnxcomp.registry import register

DEFAULT_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
EVAL_SAMPLES = 16


def cache_key(saliency: str, samples: int, layers) -> str:
    return f"sensitivity:{saliency}:{samples}:" + "|".join(layer.name for layer in layers)


def prune_copy(layer: hs.WeightLayer, sparsity: float, saliency: str, hessian: np.ndarray | None,
               damp: float = 0.01) -> np.ndarray:
    """The layer's weight pruned to `sparsity` (not written back)."""
    w = np.asarray(layer.weight.values)
    count = round(sparsity * w.size)
    rows = layer.to_rows(w.astype(np.float64))
    if saliency == "hessian" and hessian is not None:
        out = np.empty_like(rows)
        for g in range(len(rows)):
            share = round(count * (g + 1) / len(rows)) - round(count * g / len(rows))
            out[g] = hs.sparsegpt(rows[g], hessian[g], share, percdamp=damp)
    else:
        out = np.where(hs.magnitude_mask(rows, count), 0.0, rows)
    return layer.from_rows(out).astype(w.dtype)


def measure(model, layers: list[hs.WeightLayer], feeds, saliency: str = "magnitude", samples: int = 128,
            hessians: dict[str, np.ndarray] | None = None, damp: float = 0.01,
            sparsities: tuple[float, ...] = DEFAULT_GRID, eval_samples: int = EVAL_SAMPLES
            ) -> dict[str, list[tuple[float, float]]]:
    """{weight name: [(sparsity, output error), ...]} with (0, 0) first."""
    if saliency == "hessian" and not hessians:
        hessians = hs.layer_hessians(model, layers, feeds, samples)
    runner = OverrideRunner(model, [layer.name for layer in layers], feeds, min(samples, eval_samples))
    table: dict[str, list[tuple[float, float]]] = {}
    for layer in layers:
        points = [(0.0, 0.0)]
        for s in sorted(set(sparsities)):
            w = prune_copy(layer, s, saliency, (hessians or {}).get(layer.name), damp)
            points.append((float(s), runner.error({layer.name: w})))
        table[layer.name] = points
    return table


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(table: dict[str, list[tuple[float, float]]], sizes: dict[str, int], target: float,
             max_error: float | None = None, cap: float = 1.0) -> dict[str, float]:
    """Per-layer sparsities reaching `target` overall at the least summed measured error."""
    steps = []
    for order, (name, points) in enumerate(table.items()):
        pts = [(s * sizes[name], e) for s, e in points if s <= cap + 1e-12]
        hull = _lower_hull(pts)
        for (x1, y1), (x2, y2) in itertools.pairwise(hull):
            if x2 > x1:
                steps.append(((y2 - y1) / (x2 - x1), order, name, x1, x2, y1, y2))
    steps.sort(key=lambda s: (s[0], s[1], s[3]))
    need = target * sum(sizes.values())
    removed = {name: 0.0 for name in table}
    spent = 0.0
    for slope, _, name, x1, x2, y1, y2 in steps:
        if need <= 1e-9:
            break
        take = min(1.0, need / (x2 - x1))
        if max_error is not None and y2 > y1:
            take = min(take, max(0.0, (max_error - spent) / (y2 - y1)))
        if take <= 0:
            break
        removed[name] = x1 + take * (x2 - x1)
        need -= take * (x2 - x1)
        spent += take * (y2 - y1)
        if take < 1.0:
            break
    return {name: removed[name] / sizes[name] for name in table}


@register
class Sensitivity(Pass):
    """Measure each layer's output error when pruned alone at a few sparsities (changes nothing)."""

    name = "sensitivity"
    lossless = True
    exact = True
    preserves = ()

    @dataclass(frozen=True)
    class Config:
        sparsities: tuple[float, ...] = param(DEFAULT_GRID, "sparsities tried on every layer")
        saliency: str = param("magnitude", "how each layer is pruned", choices=("magnitude", "hessian"))
        samples: int = param(128, "calibration samples (the first 16 measure the error)", min=1)
        min_params: int = param(0, "skip weight tensors with fewer elements", min=0)
        include: tuple[str, ...] = param((), "only these node/initializer names (fnmatch patterns)")
        exclude: tuple[str, ...] = param((), "never these node/initializer names (fnmatch patterns)")
        ops: tuple[str, ...] = param(hs.WEIGHT_OPS, "op types whose weights are analysed")
        target: float = param(0.0, "also report per-layer sparsities for this overall sparsity", min=0.0, max=1.0)

        def __post_init__(self):
            from onnxcomp.errors import SpecError

            if not self.sparsities or any(not 0.0 < s <= 1.0 for s in self.sparsities):
                raise SpecError("sensitivity: parameter sparsities must be values in (0, 1]")

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        layers = hs.find_weight_layers(model, cfg.ops, cfg.include, cfg.exclude, cfg.min_params)
        if not layers:
            return PassResult(False, {"layers": 0})
        feeds = ctx.require_calibration(self.name)
        table = ctx.analysis_of(model, cache_key(cfg.saliency, cfg.samples, layers),
                             lambda: measure(model, layers, feeds, cfg.saliency, cfg.samples, sparsities=cfg.sparsities))
        stats = {"layers": len(layers), "errors": {k: {f"{s:g}": e for s, e in v[1:]} for k, v in table.items()}}
        worst = max(table, key=lambda k: table[k][-1][1])
        stats["most_sensitive"] = worst
        if cfg.target:
            stats["allocation"] = allocate(table, {x.name: x.size for x in layers}, cfg.target)
        return PassResult(False, stats)
