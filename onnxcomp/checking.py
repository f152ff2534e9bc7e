"""How one `optimize` run is checked: which gate holds it, the data it is judged on, and the one
verdict the report and the CLI show.

- A lossy pipeline is held to the user's gate, else `Gate.default()`, on the evaluation data or
  else a held-out part of the calibration data (never used for calibration); with neither it
  is refused. `gate=False` (--no-gate) runs it unchecked, and the report and the written
  model's metadata say NOT VALIDATED.
- A lossless pipeline is held to float rounding on the data given (evaluation, else calibration),
  else on generated inputs, and then the report says so beside the figures.
"""

from __future__ import annotations

from onnxcomp.context import PassContext, Tolerance
from onnxcomp.errors import GateFailed, InputError
from onnxcomp.gate import Gate, GateChecker, check_disjoint, describe_figures, run_gated
from onnxcomp.model import Model
from onnxcomp.pipeline import LOSSLESS_TOLERANCE, Pipeline
from onnxcomp.report import Report

NOT_VALIDATED = "NOT VALIDATED (--no-gate)"
FEW_SAMPLES = 16  # below this many judged samples the report says how little the verdict covers


def gate_for(pipeline: Pipeline, gate: Gate | bool | None) -> Gate | None:
    """The gate this run is held to: the user's, else the default for a lossy pipeline;
    `False` is the user's --no-gate."""
    if gate is False:
        return None
    if isinstance(gate, Gate) and gate.active:
        return gate
    if pipeline.lossless:
        return None
    return Gate.default(budget=gate.budget if isinstance(gate, Gate) else 6)


def hold_out(pipeline: Pipeline, ctx: PassContext) -> None:
    """Set ctx.evaluation to the data the gate judges on: the evaluation set, else a held-out part
    of the calibration data. A lossy pipeline with neither is refused in one line."""
    if ctx.evaluation is None and ctx.calibration is not None and len(ctx.calibration) >= 2:
        total = len(ctx.calibration)
        ctx.calibration, ctx.evaluation = ctx.calibration.split(0.5)
        ctx.note(f"held out {len(ctx.evaluation)} of the {total} calibration samples for the gate "
                 f"(calibration used the other {len(ctx.calibration)})")
    if ctx.evaluation is None and not pipeline.lossless:
        have = ("only one calibration sample, none to hold out" if ctx.calibration is not None
                else "no data to check it on")
        lossy = ", ".join(str(p) for p in pipeline.passes if not p.lossless)
        raise InputError(f"the pipeline is lossy ({lossy}) and there is {have}: give --calibration with at least "
                         "two samples (part is held out for the accuracy gate) or --evaluation, or --no-gate to "
                         "write it NOT VALIDATED")
    check_disjoint(ctx.calibration, ctx.evaluation)
    if ctx.evaluation is not None and len(ctx.evaluation) < FEW_SAMPLES:
        ctx.note(f"the gate judges on {len(ctx.evaluation)} samples: it vouches for inputs like them, not for "
                 f"content they lack; give --evaluation with {FEW_SAMPLES} or more varied samples for a firmer verdict")


def run_with_gate(pipeline: Pipeline, source: Model, ctx: PassContext, gate: Gate):
    """Hold the pipeline to the gate on held-out data, bisecting and backing off as needed."""
    from onnxcomp.validate import generate_inputs

    feeds = list(ctx.evaluation) if ctx.evaluation is not None else \
        generate_inputs(source, 8, seed=ctx.seed + 1, dims=ctx.dims, shapes=ctx.shapes)
    checker = GateChecker(gate, source, feeds)
    try:
        result, path = run_gated(pipeline, source, ctx, checker)
    except GateFailed as exc:
        exc.report = Report(pipeline=str(pipeline), notes=list(ctx.notes), gate={  # type: ignore[attr-defined]
            "gate": gate.describe(), "passed": False, "data": data_words(ctx), "path": getattr(exc, "path", [])})
        raise
    result.report.gate = {"gate": gate.describe(), "passed": True, "data": data_words(ctx), "path": path, **{
        k: v for k, v in path[-1].items() if k not in ("attempt", "pipeline", "passed")}}
    if len(path) > 1:
        result.report.notes.append(f"accuracy gate: {len(path) - 1} back-off(s); final pipeline: {path[-1]['pipeline']}")
        if all(r.lossless for r in result.report.passes) and not pipeline.lossless:
            result.report.notes.append("no weight was changed: the gate removed every lossy pass, so only the "
                                       "lossless passes were applied")
    return result


def data_words(ctx: PassContext, lossless: bool = False) -> str:
    """What a verdict was measured on, in words (shown on the same line as the figures)."""
    if ctx.evaluation is not None:
        return f"{len(ctx.evaluation)} samples of {ctx.evaluation.description}"
    if lossless and ctx.calibration is not None:
        return f"{len(ctx.calibration)} samples of {ctx.calibration.description}"
    return "GENERATED inputs (no data was given: these figures say nothing about real inputs)"


def report_gated(result, gate: Gate, original: Model, ctx: PassContext) -> None:
    """The validation section of a gated run: the gate's own verdict and figures on the data it
    judged (one measure, one verdict), plus any other execution provider held to the same gate."""
    from onnxcomp.validate import validate

    figures = result.report.gate
    outputs = [{"name": name, "max_abs": f["max_abs"], "max_rel": None, "cosine": f["cosine"],
                "top1": f.get("top1_agreement"), "shape_ok": True, "passed": True, "reason": "",
                **({"score_agreement": f["score_agreement"]} if "score_agreement" in f else {})}
               for name, f in figures.get("per_output", {}).items()]
    providers = [{"provider": "cpu", "outputs": outputs, "skipped": "", "passed": True}]
    passed, summary = True, describe_figures(figures)
    others = [p for p in ctx.providers if p != "cpu"]
    if others and ctx.evaluation is not None:
        tol = Tolerance(atol=gate.atol if gate.atol is not None else float("inf"), rtol=0.0,
                        min_cosine=gate.min_cosine)
        extra = validate(original, result.model, ctx.evaluation, others, tol)
        providers += extra.to_dict()["providers"]
        if extra.ran_any and not extra.passed:
            passed, summary = False, summary + "; " + extra.worst()
    result.report.validation = {"passed": passed, "verdict": "passed the gate" if passed else "OUTSIDE tolerance",
                                "data": figures["data"], "samples": figures.get("samples", 0),
                                "gate": gate.describe(), "summary": summary, "providers": providers}


def report_unchecked(result, original: Model, ctx: PassContext, tolerance: Tolerance | None, check: bool) -> None:
    """--no-gate: the figures are still measured (on real data when there is any), nothing is
    judged, and the report and the model's own metadata say so."""
    from onnxcomp.validate import validate

    result.model.metadata["onnxcomp.validation"] = NOT_VALIDATED
    validation = {"passed": None, "verdict": NOT_VALIDATED, "data": data_words(ctx, lossless=True), "summary": ""}
    if check:
        feeds = ctx.evaluation if ctx.evaluation is not None else ctx.calibration
        report = validate(original, result.model, feeds, ctx.providers, tolerance or LOSSLESS_TOLERANCE,
                          dims=ctx.dims, shapes=ctx.shapes)
        validation.update(report.to_dict(), passed=None, summary="figures only: " + report.worst())
    result.report.validation = validation
    result.report.notes.append(f"{NOT_VALIDATED}: the accuracy gate was turned off; nothing checked this model")


def report_lossless(result, original: Model, ctx: PassContext, tolerance: Tolerance | None) -> None:
    """A lossless pipeline is held to float rounding (or the user's tolerance) on the data given."""
    from onnxcomp.validate import validate

    feeds = ctx.evaluation if ctx.evaluation is not None else ctx.calibration
    report = validate(original, result.model, feeds, ctx.providers, tolerance or LOSSLESS_TOLERANCE,
                      dims=ctx.dims, shapes=ctx.shapes)
    validation = report.to_dict()
    validation.update(data=data_words(ctx, lossless=True), summary=report.worst(),
                      verdict="within tolerance" if report.passed else "OUTSIDE tolerance")
    if not report.ran_any:  # custom ops ORT cannot run are not an error for the passes: say it plainly
        validation.update(passed=None, verdict="not validated", summary="not validated: " + report.worst())
    result.report.validation = validation


def say_when_nothing_lossy_changed(report: Report) -> None:
    """A lossy pipeline whose lossy passes left every weight as it was says so in one line, with
    each pass's own reason (e.g. quantize_dynamic on a model without MatMul/Gemm/Conv, or a gate
    that backed every pass off). The pipeline records per pass whether it made a new weight."""
    lossy = [r for r in report.passes if not r.lossless]
    if not lossy or any(r.weights_changed is not False for r in lossy):
        return
    reasons = [f"{r.spec}: {r.stats.get('reason') or r.message or _what_it_did(r)}" for r in lossy]
    report.notes.append("no weight was changed by the lossy passes: " + "; ".join(reasons))


def _what_it_did(record) -> str:
    return "changed the graph only" if record.changed else "nothing to change"
