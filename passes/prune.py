"""prune: zero the least important weights of Conv, ConvTranspose, Gemm and MatMul.

    W -> W ⊙ mask                      (saliency=magnitude: the smallest |w| go)
    W -> SparseGPT(W, H = 2·X·Xᵀ)      (saliency=hessian: OBS choice + update of the kept weights)

Only weight initializers are touched (never biases, normalisation parameters, shape constants,
or initializers that also feed anything else); one shared by several nodes is pruned once.
`scope=layer` prunes every tensor to `sparsity`; `scope=global` ranks every weight of the model
together (|w|, or the OBS cost as a fraction of its layer's output energy) under a per-layer cap;
`scope=auto` measures each layer's sensitivity (see the `sensitivity` pass) and picks per-layer
sparsities that reach `sparsity` at the least measured output error (optionally bounded by
`max_error`). `pattern=N:M` keeps at most N non-zeros in every M consecutive input channels
(Conv: at one kernel tap; Gemm along K whatever transB says; MatMul B [K, N] along K).
The stats give the exact, measured sparsity of every pruned tensor and overall.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnxcomp import hessian as hs
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.errors import PassError, SpecError
from onnxcomp.model import peek_values
from onnxcomp.registry import register
from onnxcomp.spill import replace_values

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4) (keep N of every M); '' -> (0, 0)."""
    if not text:
        return 0, 0
    match = _PATTERN.match(str(text))
    if not match or not (0 < int(match.group(1)) < int(match.group(2)) <= 64):
        raise SpecError(f"prune: parameter pattern = {text!r} is not N:M with 0 < N < M <= 64 (e.g. 2:4)")
    return int(match.group(1)), int(match.group(2))


def allocate_global(scores: dict[str, np.ndarray], total: int, caps: dict[str, int]) -> dict[str, int]:
    """Prune counts per layer: the `total` lowest scores model-wide, no layer above its cap."""
    ordered = {k: np.sort(v.ravel()) for k, v in scores.items()}
    everything = np.sort(np.concatenate(list(ordered.values())))
    if total >= sum(caps.values()):
        return dict(caps)

    def count(tau: float, side: str) -> dict[str, int]:
        return {k: min(int(np.searchsorted(v, tau, side)), caps[k]) for k, v in ordered.items()}

    lo, hi = 0, len(everything) - 1
    while lo < hi:  # smallest threshold whose capped count reaches the total
        mid = (lo + hi) // 2
        if sum(count(everything[mid], "right").values()) >= total:
            hi = mid
        else:
            lo = mid + 1
    tau = everything[lo]
    below, upto = count(tau, "left"), count(tau, "right")
    left = total - sum(below.values())
    for k in below:  # ties at the threshold: fill in order until the total is met
        add = min(left, upto[k] - below[k])
        below[k] += add
        left -= add
    return below


@register
class Prune(Pass):
    """Zero the least important Conv/Gemm/MatMul weights (magnitude, N:M or Hessian/OBS)."""

    name = "prune"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        sparsity: float = param(0.5, "fraction of weights set to zero", min=0.0, max=1.0)
        scope: str = param("layer", "layer: each tensor at `sparsity`; global: one ranking for the model; "
                           "auto: per-layer sparsities from measured sensitivity", choices=("layer", "global", "auto"))
        pattern: str = param("", "N:M semi-structured sparsity along input channels (e.g. 2:4); "
                             "fixes the sparsity at 1 - N/M")
        saliency: str = param("magnitude", "what ranks weights: |w|, or the OBS cost from calibration "
                              "Hessians with the SparseGPT weight update", choices=("magnitude", "hessian"))
        min_params: int = param(0, "skip weight tensors with fewer elements", min=0)
        include: tuple[str, ...] = param((), "only these node/initializer names (fnmatch patterns)")
        exclude: tuple[str, ...] = param((), "never these node/initializer names (fnmatch patterns)")
        ops: tuple[str, ...] = param(hs.WEIGHT_OPS, "op types whose weights are pruned")
        max_layer_sparsity: float = param(0.95, "global/auto: no layer pruned beyond this", min=0.0, max=1.0)
        max_error: float = param(0.0, "auto: stop before the summed measured output error (relative "
                                 "squared error) passes this; 0 = no bound", min=0.0)
        samples: int = param(128, "calibration samples used (hessian, auto)", min=1)
        sequential: bool = param(True, "hessian: capture each layer's inputs from the model pruned so far")
        block_size: int = param(128, "hessian: SparseGPT lazy column-block width", min=1)
        damp: float = param(0.1, "hessian: dampening, a fraction of the mean Hessian diagonal (0.1, not "
                            "SparseGPT's 0.01: with a few calibration samples 0.01 fits the pruning to them; Magika "
                            "pruned to 55 % on 8 files misread an unseen one, cosine 0.37; at 0.1, 0.999)",
                            min=0.0, max=1.0)

        def __post_init__(self):
            n, m = parse_pattern(self.pattern)
            if m and self.sparsity not in (0.5, 1 - n / m):
                raise SpecError(f"prune: pattern {self.pattern} fixes the sparsity at {1 - n / m:g}; "
                                f"leave sparsity out (got {self.sparsity:g})")
            if m and self.scope != "layer":
                raise SpecError("prune: pattern works per layer; use scope=layer with it")
            unknown = [op for op in self.ops if op not in hs.WEIGHT_OPS]
            if unknown:
                raise SpecError(f"prune: parameter ops = {unknown[0]!r} is not allowed "
                                f"(choose from: {', '.join(hs.WEIGHT_OPS)})")

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: keep 1.5x as many weights each time (small steps near high
        sparsity, where accuracy turns); an N:M pattern has one sparsity, so it becomes unstructured."""
        sparsity = 1 - (1 - self.config.sparsity) * 1.5
        if sparsity < 0.05:
            return None
        return self.with_params(sparsity=round(sparsity, 4), pattern="")

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        self._uncalibrated: list[str] = []
        n, m = parse_pattern(cfg.pattern)
        layers = hs.find_weight_layers(model, cfg.ops, cfg.include, cfg.exclude, cfg.min_params, subgraphs=True)
        skipped: dict[str, str] = {}
        if m:
            for layer in list(layers):
                if layer.nm_axis_size() % m:
                    skipped[layer.name] = f"{layer.nm_axis_size()} input channels, not a multiple of {m}"
                    layers.remove(layer)
        if not layers:
            return PassResult(False, {"pruned_tensors": 0, "sparsity": 0.0, "skipped": skipped})
        hessian = cfg.saliency == "hessian"
        feeds = ctx.require_calibration(self.name) if (hessian or cfg.scope == "auto") else None
        dense_h: dict[str, np.ndarray] = {}
        if hessian and (cfg.scope != "layer" or not cfg.sequential):
            dense_h = ctx.analysis_of(model, f"hessians:{cfg.samples}:{'|'.join(layer.name for layer in layers)}",
                                   lambda: hs.layer_hessians(model, layers, feeds, cfg.samples))
        counts = self._allocate(model, ctx, layers, dense_h, feeds)
        # Names of the tensors whose values changed (the old values are not kept for comparing:
        # on a model of several GB that would hold every weight twice).
        changed: set[str] = set()
        if hessian and any(layer.supports_hessian for layer in layers):
            self._prune_hessian(model, layers, counts, n, m, feeds, {} if cfg.sequential else dense_h, changed)
        else:
            for layer in layers:
                _prune_magnitude(layer, counts.get(layer.name, 0), n, m, changed)
        fallback = [layer.name for layer in layers if hessian and not layer.supports_hessian]
        if fallback:
            ctx.note(f"prune: {len(fallback)} weight(s) pruned by magnitude (ConvTranspose, or inside a "
                     "Loop/Scan body: no Hessian support)")
        if self._uncalibrated:
            ctx.note(f"prune: {len(self._uncalibrated)} subgraph weight(s) pruned by magnitude: no calibration "
                     f"sample ran their branch ({', '.join(self._uncalibrated[:5])})")
        return _result(layers, changed, skipped, counts if not m else None)

    # ---- how many weights each layer loses ----------------------------------------------
    def _allocate(self, model, ctx, layers, dense_h, feeds) -> dict[str, int]:
        cfg = self.config
        if cfg.pattern:
            return {}
        if cfg.scope == "layer":
            return {layer.name: round(cfg.sparsity * layer.size) for layer in layers}
        if cfg.scope == "auto" and any(x.scope for x in layers):
            # measuring overrides initializers through ORT, which reaches main-graph ones only:
            # subgraph weights get the target sparsity as they would with scope=layer
            main = [x for x in layers if not x.scope]
            fixed = {x.name: round(cfg.sparsity * x.size) for x in layers if x.scope}
            ctx.note(f"prune(scope=auto): {len(fixed)} weight(s) inside subgraphs pruned at the target sparsity")
            return {**fixed, **(self._allocate(model, ctx, main, dense_h, feeds) if main else {})}
        caps = {layer.name: int(np.floor(cfg.max_layer_sparsity * layer.size)) for layer in layers}
        if cfg.scope == "global":
            scores = {}
            for layer in layers:
                w = np.asarray(layer.weight.values, dtype=np.float64)
                if layer.name in dense_h:
                    rows = layer.to_rows(w)
                    scores[layer.name] = np.stack([hs.obs_scores(rows[g], dense_h[layer.name][g], cfg.damp)
                                                   for g in range(len(rows))])
                else:
                    scores[layer.name] = np.abs(w)
            total = round(cfg.sparsity * sum(layer.size for layer in layers))
            return allocate_global(scores, total, caps)
        from onnxcomp.passes.sensitivity import allocate, cache_key, measure

        table = ctx.analysis_of(model, cache_key(cfg.saliency, cfg.samples, layers),
                             lambda: measure(model, layers, feeds, saliency=cfg.saliency, samples=cfg.samples,
                                             hessians=dense_h, damp=cfg.damp))
        chosen = allocate(table, {x.name: x.size for x in layers}, cfg.sparsity,
                          cfg.max_error or None, cfg.max_layer_sparsity)
        ctx.note("prune(scope=auto): per-layer sparsity " + ", ".join(f"{k}={v:.2f}" for k, v in chosen.items()))
        return {x.name: min(caps[x.name], round(chosen[x.name] * x.size)) for x in layers}

    # ---- SparseGPT ------------------------------------------------------------------------
    def _prune_hessian(self, model, layers, counts, n, m, feeds, dense_h, changed: set[str]) -> None:
        cfg = self.config
        order = [layers] if dense_h else hs.stages(model, layers)
        for stage in order:
            todo = [x for x in stage if x.supports_hessian and (m or counts.get(x.name, 0) > 0)]
            for layer in stage:
                if not layer.supports_hessian:
                    _prune_magnitude(layer, counts.get(layer.name, 0), n, m, changed)
            if not todo:
                continue
            hessians = dense_h if dense_h else hs.layer_hessians(model, todo, feeds, cfg.samples)
            for layer in todo:
                if layer.name not in hessians and layer.scope:  # a branch no calibration sample ran
                    self._uncalibrated.append(layer.name)
                    _prune_magnitude(layer, counts.get(layer.name, 0), n, m, changed)
                    continue
                if layer.name not in hessians:
                    raise PassError(f"no calibration activation reached {layer.name}")
                w = np.asarray(layer.weight.values)
                rows = layer.to_rows(w.astype(np.float64))
                total = counts.get(layer.name, 0)
                out = np.empty_like(rows)
                for g in range(len(rows)):
                    share = round(total * (g + 1) / len(rows)) - round(total * g / len(rows))
                    out[g] = hs.sparsegpt(rows[g], hessians[layer.name][g], share, n, m,
                                          cfg.block_size, cfg.damp)
                new = layer.from_rows(out).astype(w.dtype)
                if not np.array_equal(new, w):
                    changed.add(layer.name)
                replace_values(layer.weight, new)  # replaced, never edited in place: Model.copy() shares arrays


def _prune_magnitude(layer: hs.WeightLayer, count: int, n: int, m: int, changed: set[str]) -> None:
    if not m and count <= 0:
        return
    w = np.asarray(layer.weight.values)
    nonzero = np.count_nonzero(w)
    if m:
        rows = layer.to_rows(w)
        mask = hs.magnitude_mask(rows, count, n, m)
        new = layer.from_rows(np.where(mask, np.zeros((), w.dtype), rows)).astype(w.dtype, copy=False)
    else:
        new = _zero_smallest(w, count)
    if np.count_nonzero(new) != nonzero:  # magnitude pruning only zeroes weights
        changed.add(layer.name)
    replace_values(layer.weight, new)  # replaced, never edited in place: Model.copy() shares arrays


def _zero_smallest(w: np.ndarray, count: int) -> np.ndarray:
    """A copy of `w` with its `count` smallest |w| set to zero (of equal values at the threshold,
    the first ones in memory order): hessian.magnitude_mask's choice in about 2x the tensor's
    memory instead of 6x (its argpartition copies the tensor and makes int64 indices), which
    matters for weights of hundreds of MB."""
    flat = np.abs(w).ravel()
    flat.partition(count - 1)  # in place: flat is our own copy
    threshold = flat[count - 1]
    del flat
    below = np.abs(w) < threshold  # (a temporary the size of w, then bools)
    extra = count - int(np.count_nonzero(below))
    if extra > 0:  # part of the weights equal to the threshold go too
        ties = np.flatnonzero(np.abs(w) == threshold)[:extra]
        if len(ties) < extra:  # NaN weights: no threshold orders them; let argpartition decide
            mask = hs.magnitude_mask(w.reshape(1, 1, -1), count)
            return np.where(mask.reshape(w.shape), np.zeros((), w.dtype), w)
        below.flat[ties] = True
    return np.where(below, np.zeros((), w.dtype), w)


def _result(layers, changed: set[str], skipped, counts) -> PassResult:
    per_tensor, zeros, total = {}, 0, 0
    for layer in layers:
        w = np.asarray(peek_values(layer.weight))  # (not kept loaded: spilled weights stay on disk)
        z = int(w.size - np.count_nonzero(w))
        per_tensor[layer.name] = z / w.size
        zeros += z
        total += w.size
    stats = {
        "sparsity": zeros / total if total else 0.0,
        "pruned_tensors": len(changed),
        "zeros": zeros,
        "params": total,
        "per_tensor": per_tensor,
    }
    inside = [layer for layer in layers if layer.scope]
    if inside:  # per subgraph: tensors pruned and the sparsity of its weights
        stats["subgraph_tensors_pruned"] = sum(layer.name in changed for layer in inside)
        stats["per_subgraph"] = {}
        for scope in dict.fromkeys(layer.scope for layer in inside):
            mine = [layer for layer in inside if layer.scope == scope]
            size = sum(layer.size for layer in mine)
            zero = sum(per_tensor[layer.name] * layer.size for layer in mine)
            stats["per_subgraph"][scope] = {"tensors_pruned": sum(layer.name in changed for layer in mine),
                                            "sparsity": round(zero / size, 6) if size else 0.0}
    if skipped:
        stats["skipped"] = skipped
    return PassResult(bool(changed), stats)
