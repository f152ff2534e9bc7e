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
import onnx

from onnxcomp import hessian as hs
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.registry import register

DEFAULT_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
EVAL_SAMPLES = 16


def cache_key(saliency: str, samples: int, layers) -> str:
    return f"sensitivity:{saliency}:{samples}:" + "|".join(layer.name for layer in layers)


def output_error(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                 centered: bool = False) -> float:
    """Relative squared error Σ‖y - y₀‖² / Σ‖y₀‖², averaged over the float outputs.

    `centered`: relative to each output's variance, Σ‖y₀ - mean(y₀)‖², instead of its energy, so
    an output that sits near a constant (a detector's background probability near 1) weighs what
    varies in it, not its offset."""
    errors = []
    for name, ref0 in reference[0].items():
        if not np.issubdtype(ref0.dtype, np.floating):
            continue
        num = sum(float(np.sum((c[name].astype(np.float64) - r[name]) ** 2)) for r, c in zip(reference, candidate))
        offset = float(np.mean([np.mean(r[name], dtype=np.float64) for r in reference])) if centered else 0.0
        den = sum(float(np.sum((r[name].astype(np.float64) - offset) ** 2)) for r in reference)
        errors.append(num / max(den, 1e-30))
    return float(np.mean(errors)) if errors else 0.0


def _override_session(model, names: list[str]):
    """An ORT session in which the named initializers can be replaced by feeding them."""
    from onnxcomp.runtime import make_session

    proto = model.to_proto()
    proto.ir_version = max(proto.ir_version, 4)  # IR >= 4: initializers listed as inputs are overridable defaults
    listed = {i.name for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    for name in names:
        if name not in listed:
            t = inits[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return make_session(proto, "cpu", threads=None)


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


class OverrideRunner:
    """Runs the model on held calibration feeds with some weights replaced, in ONE ORT session
    (the weights are overridable graph inputs), and measures the output error against the
    unchanged model's outputs."""

    def __init__(self, model, names: list[str], feeds, samples: int = EVAL_SAMPLES, centered: bool = False):
        self.centered = centered
        self.session = _override_session(model, names)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        missing = [name for name in names if name not in overridable]
        if missing:
            raise RuntimeError(f"onnxruntime does not let {missing[0]} be overridden")
        self.feedable = self.inputs | overridable  # ORT lists overridable initializers apart from inputs
        self.evaluation = [f for _, f in zip(range(samples), feeds)]
        self.reference = [self.run(f) for f in self.evaluation]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {k: v for k, v in feed.items() if k in self.feedable})
        return dict(zip(self.outputs, values))

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """output_error of the model with these initializers replaced."""
        return output_error(self.reference, [self.run({**f, **replaced}) for f in self.evaluation], self.centered)


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
