"""The accuracy gate: check a compressed model on held-out data, and when a lossy pass breaks
the gate, find that pass (bisection over the pipeline's snapshots), back off its strength and
retry, within a budget. The path taken goes into the report.

The default gate (`Gate.default()`, on for every lossy pipeline unless the user gives another or
says --no-gate): every output's cosine against the input model >= 0.99 on the held-out data, with
95 % confidence over the samples judged (the cosine's one-sided lower bound, from the jackknife over
samples, must reach 0.99: on 8 samples a result judged 0.9922 measured 0.989 on 32 others), and
on outputs that are score maps (probabilities, at least half of them near 0 or 1: detection scores,
text maps, speech probabilities, softmax classes) the decisions agree: the Dice overlap of the
minority decisions (p > 0.5 where that is rare, else p <= 0.5) on the elements the reference is
sure of (p <= 0.35 or p >= 0.65), per channel, pooled, >= 0.95. The cosine alone is no gate for a score
map: a face detector that found no face kept a score cosine of 0.9993. On outputs that are class
distributions (a last axis of 2 or more values in [0, 1] that sum to 1: softmax classes, CTC frames,
anchor classes) and on outputs named `logits` (a classifier's or a decoder's scores, by the
exporters' convention) the top-1 class must also agree on >= 0.95 of the rows, every row counted,
sure or not: a text-angle classifier whose pooled cosine on 8 held-out samples was 0.997 had flipped one of
them, and flipped 7 % of an independent set.

Gate kinds: `max_drop` (task metric drop in percentage points — top-1 accuracy against labels by
default, or the user's metric function: fn(outputs, labels) -> float, higher is better, where
outputs holds one {output name: array} per evaluation sample and labels is the evaluation data's
`labels` array, flattened, or None; the drop is (fn on the input model - fn on the result) * 100),
`min_cosine` and `atol` (output agreement with the original model). Evaluation data never
overlaps calibration data.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxcomp.agreement import (  # noqa: F401 (API)
    DECISION_MARGIN,
    cosine_lower_bound,
    is_class_distribution,
    is_logits,
    is_score_map,
    score_agreement,
    top1_agreement,
)
from onnxcomp.errors import InputError

LABELS_KEY = "labels"
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_SCORE_AGREEMENT = 0.95


@dataclass
class Gate:
    max_drop: float | None = None  # percentage points of the task metric (0.5 = half a point)
    min_cosine: float | None = None
    atol: float | None = None
    min_score_agreement: float | None = None  # Dice of the decisions on score-map outputs
    min_top1_agreement: float | None = None  # top-1 agreement on class-distribution and logits outputs
    confidence: bool = False  # min_cosine holds for the cosine's 95 % lower bound over samples
    metric: Callable[[list[dict[str, np.ndarray]], np.ndarray], float] | None = None
    budget: int = 6  # retries after the first run

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_drop, self.min_cosine, self.atol, self.min_score_agreement,
                                           self.min_top1_agreement))

    @classmethod
    def default(cls, budget: int = 6) -> Gate:
        """The gate every lossy pipeline gets unless told otherwise (module docstring)."""
        return cls(min_cosine=DEFAULT_MIN_COSINE, min_score_agreement=DEFAULT_MIN_SCORE_AGREEMENT,
                   min_top1_agreement=DEFAULT_MIN_SCORE_AGREEMENT, confidence=True, budget=budget)

    def describe(self) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"metric drop <= {self.max_drop} points")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine} per output" + (" (95 % lower bound)" if self.confidence else ""))
        if self.atol is not None:
            parts.append(f"max abs <= {self.atol}")
        if self.min_score_agreement is not None:
            parts.append(f"score-map decisions agree >= {self.min_score_agreement}")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 classes agree >= {self.min_top1_agreement}")
        return ", ".join(parts)


OFFSET_DOMINANCE = 10.0  # mean² over variance above which an output's cosine is taken about its mean


def dominant_offset(values: list[np.ndarray]) -> float:
    """The reference output's mean when it dwarfs the spread (mean² > 10 x variance, pooled over
    samples), else 0. The cosine of such an output mostly measures the offset: openwakeword's
    log-mel spectrogram (values 35-96) kept a cosine of 0.9991 at int8 with a 21 % RMS error, its
    cosine about the mean was 0.98. Probabilities, logits, boxes and features are not affected (the
    gauntlet's outputs measure 0 to 2.9: Ultraface's boxes, 0.5 +- 0.3, the highest)."""
    if not values or values[0].dtype.kind != "f":
        return 0.0
    flat = np.concatenate([np.asarray(v, np.float64).ravel() for v in values])
    flat = flat[np.isfinite(flat)]
    if flat.size < 2:
        return 0.0
    mean, var = float(flat.mean()), float(flat.var())
    return mean if mean * mean > OFFSET_DOMINANCE * var else 0.0


@dataclass
class Verdict:
    passed: bool
    figures: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def split_labels(feeds: list[dict[str, np.ndarray]], input_names: set[str]):
    """Separate a `labels` array (any non-input key named labels) from the feeds."""
    labels, clean = [], []
    for feed in feeds:
        clean.append({k: v for k, v in feed.items() if k in input_names})
        if LABELS_KEY in feed and LABELS_KEY not in input_names:
            labels.append(np.asarray(feed[LABELS_KEY]).reshape(-1))
    return clean, (np.concatenate(labels) if labels and len(labels) == len(feeds) else None)


def top1_accuracy(outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> float:
    first = [next(iter(o.values())) for o in outputs]
    predictions = np.concatenate([np.argmax(f.reshape(f.shape[0], -1), axis=-1) for f in first])
    return float(np.mean(predictions == labels))


def load_metric(target: str) -> Callable:
    """A gate metric from `MODULE:FUNCTION` (the current folder is importable) or `FILE.py:FUNCTION`.

    A file is imported by its name from its folder, put on sys.path, rather than loaded under a
    made-up name: the function then pickles by reference into batch mode's worker processes,
    which inherit sys.path."""
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise InputError(f"--gate-metric {target!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    path = Path(where)
    if path.suffix == ".py":
        if not path.is_file():
            raise InputError(f"--gate-metric {target!r}: {where}: no such file")
        folder, module_name = str(path.resolve().parent), path.stem
    else:
        folder, module_name = str(Path.cwd()), where
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raises
        raise InputError(f"--gate-metric {target!r}: cannot import {module_name} "
                         f"({type(exc).__name__}: {exc})") from exc
    if path.suffix == ".py" and Path(module.__file__ or "").resolve() != path.resolve():
        raise InputError(f"--gate-metric {target!r}: another module named {module_name} ({module.__file__}) "
                         "is imported instead; rename the file")
    fn = getattr(module, name, None)
    if fn is None:
        raise InputError(f"--gate-metric {target!r}: {module_name} has no function {name}")
    if not callable(fn):
        raise InputError(f"--gate-metric {target!r}: {name} is not a function (its type: {type(fn).__name__})")
    return fn


def _digest(feed: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(feed):
        h.update(key.encode())
        h.update(np.ascontiguousarray(feed[key]).tobytes())
    return h.hexdigest()


def check_disjoint(calibration, evaluation) -> None:
    """Refuse evaluation data that shares a sample with the calibration data."""
    if calibration is None or evaluation is None:
        return
    seen = {_digest(f) for f in calibration}
    shared = sum(_digest(f) in seen for f in evaluation)
    if shared:
        raise InputError(f"{shared} evaluation sample(s) also appear in the calibration data; they must not overlap")


class GateChecker:
    """Runs the reference once, then judges candidates against the gate."""

    def __init__(self, gate: Gate, reference, feeds: list[dict[str, np.ndarray]]):
        from onnxcomp.model import load

        self.gate = gate
        ref = load(reference)
        names = {t.name for t in ref.graph.inputs}
        self.feeds, self.labels = split_labels(feeds, names)
        if gate.max_drop is not None and self.labels is None and gate.metric is None:
            raise InputError("--max-drop needs labels in the evaluation data (an array named 'labels') or a metric")
        self.reference_outputs = self._outputs(ref)
        self.reference_metric = self._metric(self.reference_outputs)

    def _outputs(self, model) -> list[dict[str, np.ndarray]]:
        from onnxcomp.runtime import make_session, run
        from onnxcomp.validate import flat_outputs

        session = make_session(model, "cpu", threads=None)
        return [flat_outputs(run(session, feed)) for feed in self.feeds]

    def _metric(self, outputs) -> float | None:
        if self.gate.max_drop is None:
            return None
        fn = self.gate.metric or top1_accuracy
        name = getattr(fn, "__name__", "metric")
        try:  # the user's code: whatever it raises is one line, not a traceback
            value = float(fn(outputs, self.labels))
        except Exception as exc:
            raise InputError(f"the gate metric {name} failed: {type(exc).__name__}: {exc}") from exc
        if not np.isfinite(value):  # a NaN drop would compare False and pass the gate
            raise InputError(f"the gate metric {name} returned {value}; it must return a finite number")
        return value

    def shortfall(self, verdict: Verdict) -> float:
        """How many times the allowed output error a failed verdict has: (1 - cosine, or its lower
        bound) / (1 - min_cosine), at least 1. Only the cosine counts: 1 - cosine grows with the
        squared weight error, so a back-off can size its step by it; a metric drop or a share of
        flipped decisions does not scale that way (Ultraface missing a third of its faces was
        two 12 % steps from passing)."""
        least = self.gate.min_cosine
        if least is None or least >= 1:
            return 1.0
        worst = min((min(out.get("cosine", 1.0), out.get("cosine_low", 1.0))
                     for out in verdict.figures.get("per_output", {}).values()), default=1.0)
        ratio = (1 - worst) / (1 - least)
        return max(1.0, ratio) if np.isfinite(ratio) else 1.0

    def check(self, candidate) -> Verdict:
        from onnxcomp.context import Tolerance
        from onnxcomp.validate import compare_arrays

        outputs = self._outputs(candidate)
        figures: dict[str, Any] = {"samples": len(self.feeds)}
        reasons = []
        if self.gate.max_drop is not None:
            value = self._metric(outputs)
            drop = (self.reference_metric - value) * 100
            figures.update(metric=value, reference_metric=self.reference_metric, drop_points=drop)
            if drop > self.gate.max_drop:
                reasons.append(f"metric {value:.4f} vs {self.reference_metric:.4f} (drop {drop:.2f} points)")
        if any(v is not None for v in (self.gate.min_cosine, self.gate.atol, self.gate.min_score_agreement,
                                       self.gate.min_top1_agreement)):
            tol = Tolerance(atol=float("inf"), rtol=0.0)
            per_output = {}
            for name in self.reference_outputs[0]:
                ref = [o[name] for o in self.reference_outputs]
                cand = [o.get(name) for o in outputs]
                if any(c is None for c in cand):
                    per_output[name] = {"cosine": 0.0, "max_abs": float("inf")}
                    reasons.append(f"output {name!r} is missing")
                    continue
                offset = dominant_offset(ref)
                if offset:  # the cosine about the output's mean: see dominant_offset
                    ref_c, cand_c = [r - offset for r in ref], [c - offset for c in cand]
                else:
                    ref_c, cand_c = ref, cand
                result = compare_arrays(name, ref_c, cand_c, tol)
                figures_of = {"cosine": result.cosine, "max_abs": result.max_abs}
                if offset:
                    figures_of["centered_at"] = offset
                if self.gate.confidence and len(ref) >= 2:
                    figures_of["cosine_low"] = cosine_lower_bound(ref_c, cand_c, result.cosine)
                if not result.shape_ok:
                    reasons.append(f"output {name!r}: {result.reason}")
                agreement = score_agreement(ref, cand)
                if agreement is not None:
                    figures_of["score_agreement"] = agreement
                top1 = top1_agreement(ref, cand, name)
                if top1 is not None:
                    figures_of["top1_agreement"] = top1
                per_output[name] = figures_of
            figures["per_output"] = per_output
            figures["cosine"] = min((f["cosine"] for f in per_output.values()), default=1.0)
            figures["max_abs"] = max((f["max_abs"] for f in per_output.values()), default=0.0)
            agreements = [f["score_agreement"] for f in per_output.values() if "score_agreement" in f]
            if agreements:
                figures["score_agreement"] = min(agreements)
            top1s = [f["top1_agreement"] for f in per_output.values() if "top1_agreement" in f]
            if top1s:
                figures["top1_agreement"] = min(top1s)
            for name, f in per_output.items():
                about = f" about its mean {f['centered_at']:.4g}" if "centered_at" in f else ""
                if self.gate.min_cosine is not None and f["cosine"] < self.gate.min_cosine:
                    reasons.append(f"output {name!r} cosine{about} {f['cosine']:.4f} < {self.gate.min_cosine}")
                elif self.gate.min_cosine is not None and f.get("cosine_low", 1.0) < self.gate.min_cosine:
                    reasons.append(f"output {name!r} cosine{about} {f['cosine']:.4f}, but its 95 % lower bound over "
                                   f"{len(self.feeds)} samples is {f['cosine_low']:.4f} < {self.gate.min_cosine}")
                if self.gate.atol is not None and f["max_abs"] > self.gate.atol:
                    reasons.append(f"output {name!r} max abs {f['max_abs']:.3g} > {self.gate.atol}")
                if self.gate.min_score_agreement is not None and \
                        f.get("score_agreement", 1.0) < self.gate.min_score_agreement:
                    reasons.append(f"output {name!r} score decisions agree {f['score_agreement']:.4f} "
                                   f"< {self.gate.min_score_agreement}")
                if self.gate.min_top1_agreement is not None and \
                        f.get("top1_agreement", 1.0) < self.gate.min_top1_agreement:
                    reasons.append(f"output {name!r} top-1 classes agree {f['top1_agreement']:.4f} "
                                   f"< {self.gate.min_top1_agreement}")
        return Verdict(not reasons, figures, "; ".join(reasons))


def describe_figures(figures: dict[str, Any]) -> str:
    """One line of a verdict's figures, output by output: the same words in the CLI and report."""
    parts = []
    if "metric" in figures:
        parts.append(f"metric {figures['metric']:.4f} (input model {figures['reference_metric']:.4f}, "
                     f"drop {figures['drop_points']:.2f} points)")
    for name, f in figures.get("per_output", {}).items():
        text = f"{name}: cosine {f['cosine']:.4f}"
        if "centered_at" in f:
            text += f" about its mean {f['centered_at']:.4g}"
        if "cosine_low" in f:
            text += f" (95 % lower bound {f['cosine_low']:.4f})"
        text += f", max abs {f['max_abs']:.3g}"
        if "score_agreement" in f:
            text += f", score decisions agree {f['score_agreement']:.4f}"
        if "top1_agreement" in f:
            text += f", top-1 agree {f['top1_agreement']:.4f}"
        parts.append(text)
    return "; ".join(parts)


def run_gated(pipeline, source, ctx, checker: GateChecker) -> tuple[Any, list[dict[str, Any]]]:
    """Run the pipeline; while the gate fails, bisect to the culprit pass and back it off.

    Returns (PipelineResult, path) where path lists every attempt. Raises GateFailed when the
    budget is spent or no pass can be weakened further.
    """
    from onnxcomp.errors import GateFailed
    from onnxcomp.pipeline import Pipeline

    passes = list(pipeline.passes)
    path: list[dict[str, Any]] = []
    best = None  # (closeness, model) of the attempt nearest the gate: --keep-failed writes it
    stalled = None  # (index, closeness) of the pass last backed off, and how near the gate that attempt was
    notes_before = list(ctx.notes)
    for attempt in range(checker.gate.budget + 1):
        ctx.notes[:] = notes_before  # a discarded attempt's notes do not describe the result
        snapshots = []
        # exact passes after the last lossy one (entropy coding) cannot change the outputs: they
        # run once, on the attempt that passes
        cut = max((i + 1 for i, p in enumerate(passes) if not p.exact), default=0)
        trial = Pipeline(passes[:cut], verify_each=pipeline.verify_each, on_failure=pipeline.on_failure)
        result = trial.run(source.copy(), ctx, snapshots=snapshots)
        verdict = checker.check(result.model)
        whole = Pipeline(passes)
        step = {"attempt": attempt, "pipeline": str(whole), "passed": verdict.passed, **verdict.figures}
        path.append(step)
        if verdict.passed:
            return _finish(result, Pipeline(passes[cut:], verify_each=pipeline.verify_each), whole, ctx), path
        closeness = (-verdict.figures.get("drop_points", 0.0), verdict.figures.get("cosine", 1.0))
        if best is None or closeness > best[0]:
            best = (closeness, result.model)
        culprit = _first_failing(checker, passes, snapshots)
        if stalled is not None and stalled[0] == culprit and closeness <= stalled[1]:
            # backing this pass off did not move the outputs at all: an earlier lossy pass used up
            # the allowance (pruning at 0.44 of 0.5 points, then any codebook at 0.67), so weaken it
            culprit = max((i for i in range(culprit) if not passes[i].lossless), default=culprit)
        step["culprit"] = str(passes[culprit])
        weaker = _backoff(passes[culprit], checker.shortfall(verdict))
        step["reason"] = verdict.reason
        if weaker is None:
            step["action"] = f"{passes[culprit]} cannot be weakened further; removed"
            passes = passes[:culprit] + passes[culprit + 1:]
        else:
            step["action"] = f"backed off {passes[culprit]} -> {weaker}"
            passes = passes[:culprit] + [weaker] + passes[culprit + 1:]
        stalled = (culprit, closeness) if weaker is not None else None
        ctx.invalidate()
    last = path[-1]
    error = GateFailed(f"the gate ({checker.gate.describe()}, on {len(checker.feeds)} samples) still fails "
                       f"after {checker.gate.budget} back-offs, at pass {last.get('culprit', '?')}: "
                       f"{last.get('reason', '')}")
    error.path = path  # type: ignore[attr-defined]
    error.best_model = best[1] if best else None  # type: ignore[attr-defined]
    raise error


def _backoff(step, shortfall: float):
    """step.backoff(shortfall), or step.backoff() for a pass written before it took one (plugins)."""
    import inspect

    try:
        takes = bool(inspect.signature(step.backoff).parameters)
    except (TypeError, ValueError):
        takes = False
    return step.backoff(shortfall) if takes else step.backoff()


def _finish(result, tail, whole, ctx):
    """Run the trailing exact passes on the attempt that passed and make one report of both."""
    result.report.pipeline = str(whole)
    if not tail.passes:
        return result
    done = tail.run(result.model, ctx)
    report = result.report
    report.passes += done.report.passes
    report.output, report.seconds = done.report.output, report.seconds + done.report.seconds
    report.notes += [n for n in done.report.notes if n not in report.notes]
    result.model = done.model
    return result


def _first_failing(checker: GateChecker, passes, snapshots) -> int:
    """Index of the first lossy pass after which the gate fails (binary search over snapshots;
    a later pass rarely repairs what an earlier one broke, so failure is taken as monotonic)."""
    lossy = [i for i, p in enumerate(passes) if not p.lossless and i < len(snapshots)]
    if not lossy:
        return len(passes) - 1
    lo, hi = 0, len(lossy) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if checker.check(snapshots[lossy[mid]]).passed:
            lo = mid + 1
        else:
            hi = mid
    return lossy[lo]
