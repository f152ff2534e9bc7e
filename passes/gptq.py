"""gptq: low-bit weights with the rounding error compensated from calibration data (GPTQ), at a
fixed width or with per-layer widths chosen to a size or an error bound (mixed precision).

    MatMul/Gemm W  =>  MatMulNBits(codes 2/4/8 bits, block scales)        (form=auto, where it applies)
    other weights  =>  (Cast(codes uint8) - Cast(zero)) * scale            (ORT folds it at load)

Conv, Gemm and MatMul weights are quantized by GPTQ (onnxcomp.quant.gptq) with their layer
Hessians; embedding tables (a Gather's float table) by round-to-nearest on the same grid. With
`choices`, every layer is quantized at each width; each choice's packed bytes are measured by the
container's own coder and its error by running the whole model on held calibration samples with
that layer alone changed; onnxcomp.quant.mixed then picks the widths: `target_ratio` (the
quantized weights' packed bytes at most their float32 bytes / ratio, least error) or `max_error`
(fewest bytes within that summed output error). The stats list every layer's bits, form, packed
bytes and measured error.

The Hessians come from the float model in one calibration pass (not layer by layer through the
already-quantized model as in the paper: one pass, and within the gate's measured accuracy).
Only the main graph's weights are quantized; weights inside If/Loop/Scan bodies stay float.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from onnxcomp import hessian as hs
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.errors import SpecError
from onnxcomp.quant import lowbit, mixed
from onnxcomp.quant.gptq import ENTROPY_GRID_BITS, Quantized, factor_many, quantize
from onnxcomp.quant.qdq import NodeBuilder
from onnxcomp.registry import register

SPARSE_MAX_BITS = 4
REFERENCE_BITS = 3  # the choice whose whole-model error is measured (well above noise, below breakage)
BACKOFF = 0.88  # each back-off asks for at least 12 % less compression
FLOAT_BITS = 32
MEASURE_BUDGET_S = 90.0  # model runs measuring the choices; past it, fewer held samples (at least 4)


@register
class Gptq(Pass):
    """Low-bit weights (GPTQ, error-compensated with calibration Hessians), fixed or mixed per layer."""

    name = "gptq"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        bits: int = param(4, "bits per weight (without choices)", min=2, max=8)
        group_size: int = param(128, "columns along K sharing one scale (0: one per output channel; Conv "
                                     "always has one per output channel)", min=0)
        symmetric: bool = param(False, "symmetric grids (zero in the middle) instead of min/max ones")
        act_order: bool = param(True, "round the columns with the largest Hessian diagonal first")
        damp: float = param(0.1, "Hessian dampening, a fraction of its mean diagonal (0.1, not the paper's 0.01: "
                                  "with tens of calibration samples, not thousands, it generalizes better; "
                                  "measured on MiniLM 4-bit: cosine 0.984 vs 0.980)", min=0.0, max=1.0)
        samples: int = param(128, "calibration samples for the Hessians", min=1)
        ops: tuple[str, ...] = param(("Conv", "Gemm", "MatMul", "Gather"), "op types whose weights are quantized "
                                     "(Gather: embedding tables)")
        exclude: tuple[str, ...] = param((), "node or initializer names (fnmatch) kept in float")
        min_size: int = param(256, "weights with fewer elements stay in float, unless they hold 1 % of all the weights "
                                           "quantized", min=0)
        form: str = param("auto", "auto: MatMulNBits where it applies, else the folded form; fold: folded only",
                          choices=("auto", "fold"))
        grid: str = param("minmax", "minmax: 2**bits levels over each group's (searched) range; entropy: at up to "
                                    "5 bits, one step per row, sized so the codes carry about `bits` bits of "
                                    "entropy, all of uint8's levels (for .onnxc: fewer coded bytes at the same "
                                    "error; folded form)", choices=("minmax", "entropy"))
        sparsity: float = param(0.0, "fraction of each weight pruned jointly with the rounding (SparseGPT)",
                                min=0.0, max=0.95)
        choices: tuple[int | float, ...] = param((), "bit widths to choose from per layer (mixed precision); "
                                                     "with grid=entropy, halves up to 5 bits too (2.5: a step "
                                                     "between 2 and 3 bits, dense only)")
        sparsities: tuple[float, ...] = param((), "with choices: sparsities to choose from per layer at widths up to 4 bits (default: sparsity)")
        target_ratio: float = param(0.0, "with choices: packed weight bytes at most float32 bytes / this", min=0.0)
        max_error: float = param(0.0, "with choices: fewest bytes with summed measured output error at most this "
                                      "(relative squared error)", min=0.0)
        eval_samples: int = param(16, "held calibration samples measuring each choice's output error", min=1)
        measure_every: bool = param(False, "run the model for every choice of every layer (slow on big CNNs); "
                                    "by default once per layer, scaled to its other choices by their "
                                    "Hessian-weighted weight error")

        def __post_init__(self):
            if any(not 0.0 <= x <= 0.95 for x in self.sparsities):
                raise SpecError("gptq: parameter sparsities must be fractions between 0 and 0.95")
            if any(not 2 <= b <= 8 for b in self.choices):
                raise SpecError("gptq: parameter choices must be bit widths between 2 and 8")
            fractional = [b for b in self.choices if float(b) != int(b)]
            if fractional and (self.grid != "entropy" or any(b > ENTROPY_GRID_BITS for b in fractional)):
                raise SpecError(f"gptq: fractional choices ({', '.join(f'{b:g}' for b in fractional)}) need "
                                f"grid=entropy and at most {ENTROPY_GRID_BITS} bits (a min/max grid has 2**bits levels)")
            if self.choices and not (self.target_ratio or self.max_error):
                raise SpecError("gptq: choices needs target_ratio or max_error (what the widths are chosen for)")

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: less compression (mixed), or one more bit (fixed). The output
        error falls about 4x per bit added to every weight, so a ratio `shortfall` times over the
        allowed error asks for log4(shortfall) more bits a weight (at least a 12 % step): PP-OCR
        rec, at a cosine of 0.83 for 0.99 at 16x, needed 7 back-offs of 12 % (7.7 minutes)."""
        cfg = self.config
        if cfg.choices:
            if cfg.target_ratio:
                bits = FLOAT_BITS / cfg.target_ratio
                wanted = FLOAT_BITS / (bits + 0.5 * math.log2(max(shortfall, 1.0)))
                smaller = round(min(cfg.target_ratio * BACKOFF, wanted), 2)
                return self.with_params(target_ratio=smaller) if smaller >= 2 else None
            return self.with_params(max_error=cfg.max_error / 4) if cfg.max_error > 1e-7 else None
        return self.with_params(bits=cfg.bits + 1) if cfg.bits < 8 else None

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        started = time.perf_counter()
        targets = lowbit.find_targets(model, cfg.ops, cfg.exclude, cfg.min_size)
        if not targets:
            return PassResult(False, {"layers": 0, "reason": "no weight of the chosen ops to quantize"})
        feeds = ctx.require_calibration(self.name)
        layers = [t.layer for t in targets if t.layer is not None and t.layer.supports_hessian]
        key = f"hessians:{cfg.samples}:" + "|".join(layer.name for layer in layers)
        hessians = ctx.analysis_of(model, key, lambda: hs.layer_hessians(model, layers, feeds, cfg.samples)) \
            if layers else {}
        # kept across the gate's back-offs (same model, same settings: only the target moves)
        kept = ctx.analysis_of(model, "gptq-kept:" + self._table_key(targets), lambda: ({}, {}))
        found: dict[tuple[str, int, float], Quantized] = kept[0]
        factors: dict[str, list] = kept[1]

        def form(target: lowbit.Target, bits: int) -> str:
            if self._grid(bits) == "entropy":
                return "fold"
            group = cfg.group_size if target.groupable() else 0
            return "nbits" if cfg.form == "auto" and target.nbits_ready(bits, group) else "fold"

        def quantized(target: lowbit.Target, bits: int, sparsity: float) -> Quantized:
            if (target.name, bits, sparsity) not in found:
                h = hessians.get(target.name)
                if h is not None and target.name not in factors:  # one factorization for every width
                    factors[target.name] = factor_many(list(h), cfg.act_order, cfg.damp)
                found[(target.name, bits, sparsity)] = self._quantize(
                    target, bits, self._group(target, form(target, bits)), h, sparsity, factors.get(target.name))
            return found[(target.name, bits, sparsity)]

        stats: dict = {}
        if cfg.choices:
            table = ctx.analysis_of(model, self._table_key(targets),
                                    lambda: self._measure(model, targets, feeds, quantized, form, hessians))
            fp32 = sum(int(np.prod(t.weight.shape)) * 4 for t in targets)
            budget = int(fp32 / cfg.target_ratio) if cfg.target_ratio else None
            picked = mixed.choose(table, budget, cfg.max_error or None)
            chosen = {t.name: (picked[t.name].bits, picked[t.name].sparsity) for t in targets}
            stats["measured"] = {name: {f"{c.bits:g}b/{c.sparsity:g}": {"bytes": c.nbytes, "error": c.error} for c in cs}
                                 for name, cs in table.items()}
            stats["estimated_error"] = sum(picked[t.name].error for t in targets)
        else:
            chosen = {t.name: (cfg.bits, cfg.sparsity) for t in targets}
        per_layer = {}
        build = NodeBuilder(model.graph, "gptq")
        for target in targets:
            bits, sparsity = chosen[target.name]
            q = quantized(target, bits, sparsity)
            how = form(target, bits)
            arrays = lowbit.stored_arrays(target, q, how)
            per_layer[target.name] = {"op": target.op, "bits": bits, "sparsity": sparsity, "form": how,
                                      "elements": int(q.codes.size),
                                      "group": int(q.group if q.group < q.codes.shape[1] else 0),
                                      "bytes": lowbit.coded_bytes(arrays) if cfg.choices else
                                      int(sum(a.nbytes for a in arrays))}
            if how == "nbits":
                lowbit.write_nbits(build, target, q)
            else:
                lowbit.write_fold(build, target, q)
        if any(v["form"] == "nbits" for v in per_layer.values()):
            model.opset_imports.setdefault("com.microsoft", 1)
        model.graph.cleanup().toposort()
        weights = sum(v["elements"] for v in per_layer.values())
        stats.update({
            "layers": len(per_layer), "per_layer": per_layer,
            "bits_per_layer": {name: v["bits"] for name, v in per_layer.items()},
            "sparsity_per_layer": {name: v["sparsity"] for name, v in per_layer.items() if v["sparsity"]},
            "mean_bits": round(sum(v["bits"] * v["elements"] for v in per_layer.values()) / max(weights, 1), 3),
            "weight_bytes_before": weights * 4,
            ("weight_packed_bytes" if cfg.choices else "weight_bytes_after"):
                sum(v["bytes"] for v in per_layer.values()),
            "hessian_layers": len(hessians), "quantize_s": round(time.perf_counter() - started, 2)})
        return PassResult(True, stats)

    # ---- helpers -------------------------------------------------------------------------
    def _grid(self, bits: int) -> str:
        return "entropy" if self.config.grid == "entropy" and bits <= ENTROPY_GRID_BITS else "minmax"

    def _group(self, target: lowbit.Target, form: str) -> int:
        """Columns per grid. MatMulNBits pads K to whole blocks; the folded form needs groups that
        divide K (no padding, so no Slice, which old opsets lack): the largest divisor of K up to
        group_size, or one grid per row where K has none of a useful size."""
        group = self.config.group_size if target.groupable() else 0
        k = target.cols
        if group == 0 or group >= k or form == "nbits":
            return group
        divisor = next(d for d in range(group, 0, -1) if k % d == 0)
        return divisor if divisor >= max(8, group // 4) else 0

    def _quantize(self, target: lowbit.Target, bits: int, group: int, h: np.ndarray | None, sparsity: float,
                  factored: list | None) -> Quantized:
        cfg = self.config
        w = np.asarray(target.weight.values, np.float32)
        rows = target.to_rows(w)
        parts = [quantize(rows[g], bits, group, None if h is None else h[g], cfg.symmetric, cfg.act_order,
                          percdamp=cfg.damp, sparsity=sparsity, factored=None if factored is None else factored[g],
                          grid=self._grid(bits))
                 for g in range(len(rows))]
        if len(parts) == 1:
            return parts[0]
        return Quantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                         np.concatenate([p.zero for p in parts]), bits, parts[0].group)

    def _table_key(self, targets) -> str:
        cfg = self.config
        return (f"gptq-table:{cfg.choices}:{cfg.sparsities or (cfg.sparsity,)}:{cfg.group_size}:{cfg.symmetric}:{cfg.grid}:"
                f"{cfg.act_order}:{cfg.damp}:{cfg.samples}:{cfg.form}:{cfg.eval_samples}:{cfg.measure_every}:"
                + "|".join(t.name for t in targets))

    def _measure(self, model, targets, feeds, quantized, form, hessians) -> dict[str, list[mixed.Choice]]:
        """Every layer at every width: packed bytes (the coder's own) and whole-model output error.

        The model runs once per layer, at a reference choice (REFERENCE_BITS, dense); the other
        choices' errors are that measurement scaled by their layer-local error, tr(ΔW H ΔWᵀ) with
        the layer Hessian (‖ΔW‖² for an embedding table): within one layer the two move together,
        and running the model for each of a dozen choices of every layer took the 12 MB NudeNet
        detector past the gauntlet's 120 s. `measure_every` runs them all."""
        from onnxcomp.override import OverrideRunner

        cfg = self.config
        runner = OverrideRunner(model, [t.name for t in targets], feeds, cfg.eval_samples, centered=True,
                                budget=(len(targets) * (len(cfg.choices) if cfg.measure_every else 1), MEASURE_BUDGET_S))
        table = {}
        for target in targets:
            choices = [(bits, sparsity) for bits in cfg.choices for sparsity in self._sparsities(bits)]
            stored = {c: quantized(target, *c) for c in choices}
            nbytes = {c: lowbit.coded_bytes(lowbit.stored_arrays(target, q, form(target, c[0])))
                      for c, q in stored.items()}
            if cfg.measure_every:
                errors = {c: runner.error({target.name: self._stored_float(target, q)}) for c, q in stored.items()}
            else:
                rows = target.to_rows(np.asarray(target.weight.values, np.float64))
                local = {c: self._local_error(rows, q, hessians.get(target.name)) for c, q in stored.items()}
                reference = min(choices, key=lambda c: (abs(c[0] - REFERENCE_BITS), c[1]))
                measured = runner.error({target.name: self._stored_float(target, stored[reference])})
                scale = measured / local[reference] if local[reference] > 0 else 0.0
                errors = {c: local[c] * scale for c in choices}
            table[target.name] = [mixed.Choice(c[0], nbytes[c], errors[c], c[1]) for c in choices]
        return table

    @staticmethod
    def _local_error(rows: np.ndarray, q: Quantized, h: np.ndarray | None) -> float:
        """tr(ΔW H ΔWᵀ) summed over conv groups (rows: the float weight as [groups, rows, cols])."""
        diff = q.dequantized().astype(np.float64).reshape(rows.shape) - rows
        if h is None:
            return float(np.sum(diff ** 2))
        return float(sum(np.sum((d @ hg) * d) for d, hg in zip(diff, h)))

    def _sparsities(self, bits: int) -> tuple[float, ...]:
        """Sparsities tried at this width: pruning pays beside few bits, so above SPARSE_MAX_BITS
        only the dense choice is measured (it halves the measuring time)."""
        cfg = self.config
        if not cfg.sparsities:
            return (cfg.sparsity,)
        # (a half-bit width is there to refine the dense steps between whole widths)
        return cfg.sparsities if bits <= SPARSE_MAX_BITS and float(bits).is_integer() else (min(cfg.sparsities),)

    @staticmethod
    def _stored_float(target: lowbit.Target, q: Quantized) -> np.ndarray:
        rows = q.dequantized()
        groups = target.layer.groups if target.layer is not None else 1
        return target.from_rows(rows.reshape(groups, -1, rows.shape[1])).astype(np.float32)
