"""Pipeline: run passes in order, report each, and (on request) verify each against the last.

After every pass the graph is re-sorted (a cycle or dangling tensor fails there, naming the
pass). With `verify_each`, the model before the pass is kept and both run on ORT: exact passes
must give bit-identical outputs, lossless ones outputs within float rounding, lossy ones the
context's tolerance. A pass that fails is named and rolled back; the pipeline then stops (an
error carrying the report) or continues, as the user chose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from onnxcomp import registry
from onnxcomp.base import Pass
from onnxcomp.context import PassContext, Tolerance
from onnxcomp.errors import GateFailed, OnnxcompError, PassError, SpecError
from onnxcomp.graph_utils import toposort
from onnxcomp.model import Model
from onnxcomp.report import PassRecord, Report
from onnxcomp.spec import load_file_steps, parse_steps

# Lossless passes are held to float rounding: elementwise, or within 0.1 % of the output's largest
# magnitude, since folding a BatchNorm/Mul/Add into conv weights rounds differently and a deep net
# amplifies that (PP-OCRv4's detector: 2.2e-4 on a [0, 1] map, cosine 1.000000).
LOSSLESS_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-4, scale_rtol=1e-3)
ON_FAILURE = ("stop", "continue")


@dataclass
class PipelineResult:
    model: Model
    report: Report


class Pipeline:
    """An ordered list of passes plus how to check them."""

    def __init__(self, passes: Sequence[Pass], verify_each: bool = False, on_failure: str = "stop"):
        if on_failure not in ON_FAILURE:
            raise SpecError(f"on_failure must be one of {ON_FAILURE}, not {on_failure!r}")
        self.passes = list(passes)
        self.verify_each = verify_each
        self.on_failure = on_failure

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str, **options: Any) -> Pipeline:
        """From spec text (`"fold, prune(sparsity=0.5)"`) or the path of a YAML/JSON file."""
        path = Path(spec)
        if path.suffix in (".yaml", ".yml", ".json"):
            if not path.is_file():
                raise SpecError(f"{spec}: no such pipeline file")
            steps, file_options = load_file_steps(path)
            options = {**file_options, **options}
        else:
            steps = parse_steps(spec)
        allowed = {"verify_each", "on_failure"}
        unknown = set(options) - allowed
        if unknown:
            raise SpecError(f"unknown pipeline option(s): {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})")
        return cls([registry.get(name)(**params) for name, params in steps], **options)

    def __str__(self) -> str:
        return ", ".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    @property
    def lossless(self) -> bool:
        return all(p.lossless for p in self.passes)

    # ---- running -------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext | None = None, snapshots: list | None = None) -> PipelineResult:
        """Run every pass over `model` (edited in place). With `snapshots` (a list), a copy of the
        model after each pass is appended to it (the accuracy gate bisects over them)."""
        ctx = ctx or PassContext()
        if any(p.needs_input_model for p in self.passes):
            ctx.input_model = model.copy()  # distill's default teacher
        report = Report(pipeline=str(self), input=model.summary())
        started = time.perf_counter()
        feeds = None
        for index, pass_ in enumerate(self.passes):
            if ctx.progress:
                ctx.progress(str(pass_), index / max(1, len(self.passes)))
            before = model.summary()
            weights_before = None if pass_.lossless else weight_digests(model)
            snapshot = model.copy() if (self.verify_each or self.on_failure == "continue") else None
            t0 = time.perf_counter()
            try:
                result = pass_.run(model, ctx)
                toposort(model.graph)
            except OnnxcompError as exc:
                if snapshot is None:
                    raise PassError(f"pass {pass_}: {exc}") from exc
                model = snapshot
                report.passes.append(PassRecord(str(pass_), pass_.lossless, "failed", False,
                                                time.perf_counter() - t0, before, before, message=str(exc)))
                continue
            except Exception as exc:  # a bug in a pass must still end as one clear line
                raise PassError(f"pass {pass_} failed on this model: {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - t0
            record = PassRecord(str(pass_), pass_.lossless, "ok" if result.changed else "unchanged",
                                result.changed, seconds, before, model.summary(), dict(result.stats))
            if weights_before is not None:
                weights_after = weight_digests(model)
                record.weights_changed = None if weights_after is None else bool(weights_after - weights_before)
            report.passes.append(record)
            if result.changed:
                ctx.invalidate(keep=getattr(pass_, "preserves", ()))
            if self.verify_each and result.changed and snapshot is not None:
                from onnxcomp.validate import generate_inputs, validate

                if feeds is None:
                    feeds = list(ctx.evaluation) if ctx.evaluation else \
                        generate_inputs(snapshot, 2, seed=ctx.seed, dims=ctx.dims, shapes=ctx.shapes)
                tol = Tolerance.exact() if pass_.exact else LOSSLESS_TOLERANCE if pass_.lossless else ctx.tolerance
                check = validate(snapshot, model, feeds, ctx.providers, tol)
                record.verification = ("verified" if check.passed else "FAILED: " + check.worst()) \
                    if check.ran_any else "not verified: " + check.worst()
                if check.ran_any and not check.passed:
                    model = snapshot
                    record.status = "rolled back"
                    record.after = before
                    if self.on_failure == "stop":
                        report.seconds = time.perf_counter() - started
                        error = GateFailed(f"pass {pass_} changed the outputs beyond tolerance and was rolled back: "
                                           f"{check.worst()}")
                        error.report = report  # type: ignore[attr-defined]
                        raise error
            if snapshots is not None:
                snapshots.append(model.copy())
        report.output = model.summary()
        report.notes.extend(ctx.notes)
        report.seconds = time.perf_counter() - started
        return PipelineResult(model, report)


def weight_digests(model: Model) -> set[bytes] | None:
    """Content digests of every weight (16+ values, any dtype, every graph, Constant nodes too), to
    tell whether a lossy pass made any weight the model did not hold before. None past
    HASH_LIMIT of weights (the note it feeds is then left out)."""
    import hashlib

    import numpy as np
    import onnx_graphsurgeon as gs

    from onnxcomp.context import HASH_LIMIT
    from onnxcomp.model import peek_values
    from onnxcomp.subgraphs import scopes

    if model.summary()["param_bytes"] > HASH_LIMIT:
        return None
    digests = set()
    for scope in scopes(model.graph):
        # peek_values: a weight left in its file (or spilled) is read, not loaded into the model
        values = [peek_values(t) for t in scope.graph.tensors().values() if isinstance(t, gs.Constant)]
        values += [peek_values(n.attrs["value"]) for n in scope.graph.nodes
                   if n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant)]
        for value in values:
            value = np.ascontiguousarray(value)
            if value.size >= 16:
                digests.add(hashlib.blake2b(value.tobytes(), digest_size=16).digest() + str(value.shape).encode())
    return digests


def as_pipeline(spec: str | Pipeline | Sequence[Pass], **options: Any) -> Pipeline:
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, str):
        return Pipeline.parse(spec, **options)
    return Pipeline(list(spec), **options)
