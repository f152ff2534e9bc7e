"""Validation: run a reference and a candidate model on the same inputs and compare outputs.

Inputs come from the user (an .npz or feeds) or are generated from the declared input types
and shapes, with dynamic dimensions given sizes. Each requested execution provider runs both
models; per output we report max abs error, max relative error, cosine similarity and top-1
agreement (for classifier-like outputs), and judge them against per-output tolerances.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx

from onnxcomp.context import Tolerance
from onnxcomp.errors import InputError
from onnxcomp.limits import check_generated_size
from onnxcomp.model import Model, load
from onnxcomp.runtime import CannotRun, RuntimeUnavailable, make_session, parse_providers, run

DEFAULT_DYNAMIC_BATCH = 1
DEFAULT_DYNAMIC_DIM = 32


def _input_specs(proto: onnx.ModelProto) -> list[tuple[str, int, list]]:
    initializers = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in initializers:  # IR < 4 lists weights as inputs
            continue
        if not vi.type.HasField("tensor_type"):
            kind = vi.type.WhichOneof("value") or "untyped"
            raise InputError(f"input {vi.name!r} is a {kind.replace('_type', '')}, not a tensor: "
                             "cannot generate it; give the inputs as data")
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        specs.append((vi.name, tt.elem_type, dims))
    return specs


def generate_inputs(model, count: int = 1, seed: int = 0, dims: dict[str, int] | None = None,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds built from the declared inputs: floats ~ N(0, 1), integers in [0, 2), bools random.

    An input named in `shapes` takes that whole shape (any axis, named or not); otherwise a
    dynamic dimension gets its size from `dims` (by name), else 1 on axis 0 and 32 elsewhere.
    Small integers keep index-like inputs (token ids, gather indices) in range.
    """
    proto = model.to_proto() if isinstance(model, Model) else model
    rng = np.random.default_rng(seed)
    dims, shapes = dims or {}, shapes or {}
    feeds = []
    for _ in range(count):
        feed = {}
        for name, elem_type, shape in _input_specs(proto):
            size = [] if name not in shapes else list(shapes[name])
            for axis, d in enumerate(shape if name not in shapes else ()):
                if isinstance(d, int) and d > 0:
                    size.append(d)
                elif isinstance(d, str) and d in dims:
                    size.append(int(dims[d]))
                elif isinstance(d, int) and d == 0 and d is not None:
                    size.append(0)
                else:
                    size.append(DEFAULT_DYNAMIC_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM)
            np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
            check_generated_size(name, size, np_type)
            if np.issubdtype(np_type, np.floating):
                value = rng.standard_normal(size).astype(np_type)
            elif np_type == np.bool_:
                value = rng.integers(0, 2, size).astype(np.bool_)
            elif np.issubdtype(np_type, np.integer):
                value = rng.integers(0, 2, size).astype(np_type)
            elif np_type == np.object_:
                value = np.array(["a"] * int(np.prod(size)), dtype=object).reshape(size)
            else:
                raise InputError(f"input {name!r}: cannot generate values of type {np_type}; pass inputs as .npz")
            feed[name] = value
        feeds.append(feed)
    return feeds


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    shape_ok: bool
    passed: bool
    reason: str = ""


@dataclass
class ProviderComparison:
    provider: str
    outputs: list[OutputComparison] = field(default_factory=list)
    skipped: str = ""  # why this provider could not be compared (EP absent, model not runnable)

    @property
    def passed(self) -> bool:
        return not self.skipped and all(o.passed for o in self.outputs)


@dataclass
class ValidationReport:
    providers: list[ProviderComparison]
    samples: int

    @property
    def passed(self) -> bool:
        ran = [p for p in self.providers if not p.skipped]
        return bool(ran) and all(p.passed for p in ran)

    @property
    def ran_any(self) -> bool:
        return any(not p.skipped for p in self.providers)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples,
                "providers": [{**asdict(p), "passed": p.passed} for p in self.providers]}

    def worst(self) -> str:
        """One line: the worst output figures, for reports and error messages."""
        parts = []
        for p in self.providers:
            if p.skipped:
                parts.append(f"{p.provider}: not run ({p.skipped})")
                continue
            for o in p.outputs:
                parts.append(f"{p.provider}/{o.name}: max_abs={o.max_abs:.3g} cos={o.cosine:.6f}"
                             + (f" {o.reason}" if o.reason else ""))
        return "; ".join(parts)


def compare_arrays(name: str, ref: list[np.ndarray], cand: list[np.ndarray], tol: Tolerance) -> OutputComparison:
    """Metrics over all samples of one output, and the verdict against `tol`."""
    max_abs = max_rel = 0.0
    ref_scale = 0.0  # the output's largest finite |reference|, for tol.scale_rtol
    dots = ref_sq = cand_sq = 0.0
    agree = total = 0
    shape_ok, reason = True, ""
    within = elementwise_ok = True
    for r, c in zip(ref, cand):
        if r.shape != c.shape or r.dtype != c.dtype:
            shape_ok, reason = False, f"shape/dtype {r.shape}/{r.dtype} vs {c.shape}/{c.dtype}"
            break
        if r.dtype == object or r.dtype.kind in "USb":
            if not np.array_equal(r, c):
                within, reason = False, "values differ"
            continue
        rf, cf = r.astype(np.float64), c.astype(np.float64)
        nan_r, nan_c = np.isnan(rf), np.isnan(cf)
        if not np.array_equal(nan_r, nan_c):
            within, reason = False, "NaN positions differ"
        both = ~(nan_r | nan_c)
        inf_same = np.isinf(rf) & (rf == cf)
        ok = both & ~inf_same
        diff = np.abs(rf[ok] - cf[ok])  # masked first: Inf - Inf would warn
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(rf[ok]), 1e-12)).max()))
            ref_scale = max(ref_scale, float(np.abs(rf[ok]).max()))
            if np.any(diff > tol.atol + tol.rtol * np.abs(rf[ok])):
                elementwise_ok = False
        if np.any(np.isinf(rf) != np.isinf(cf)) or np.any(np.isinf(rf) & (rf != cf)):
            within, reason = False, "Inf positions differ"
        rv, cv = np.where(ok, rf, 0).ravel(), np.where(ok, cf, 0).ravel()
        dots += float(rv @ cv)
        ref_sq += float(rv @ rv)
        cand_sq += float(cv @ cv)
        if r.ndim >= 2 and r.shape[-1] > 1 and r.dtype.kind == "f":
            agree += int(np.sum(np.argmax(r, -1) == np.argmax(c, -1)))
            total += int(np.prod(r.shape[:-1]))
    if ref_sq == 0 and cand_sq == 0:
        cosine = 1.0
    elif ref_sq == 0 or cand_sq == 0:
        cosine = 0.0
    else:
        cosine = dots / np.sqrt(ref_sq * cand_sq)
    top1 = agree / total if total else None
    if not elementwise_ok and not (tol.scale_rtol is not None and max_abs <= tol.atol + tol.scale_rtol * ref_scale):
        within = False
    passed = shape_ok and within
    if passed and tol.min_cosine is not None and cosine < tol.min_cosine:
        passed, reason = False, f"cosine {cosine:.6f} < {tol.min_cosine}"
    if passed and tol.min_top1 is not None and top1 is not None and top1 < tol.min_top1:
        passed, reason = False, f"top-1 agreement {top1:.4f} < {tol.min_top1}"
    if not passed and not reason:
        reason = f"max abs error {max_abs:.3g} above atol {tol.atol:g} + rtol {tol.rtol:g}" + (
            f" (and above {tol.scale_rtol:g} of the output's largest value {ref_scale:.3g})" if tol.scale_rtol else "")
    return OutputComparison(name, max_abs, max_rel, float(cosine), top1, shape_ok, passed, reason)


def outputs_on(model, feeds: list[dict[str, np.ndarray]], provider: str) -> dict[str, list[np.ndarray]]:
    session = make_session(model, provider, threads=1)
    collected: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for name, value in flat_outputs(run(session, feed)).items():
            collected.setdefault(name, []).append(value)
    return collected


def flat_outputs(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Outputs as arrays: a sequence output becomes one entry per element plus its length, so
    it is compared element by element."""
    flat = {}
    for name, value in outputs.items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                flat[f"{name}[{i}]"] = np.asarray(item)
            flat[f"{name}.length"] = np.array(len(value))
        else:
            flat[name] = value
    return flat


def validate(reference, candidate, inputs: Iterable[dict[str, np.ndarray]] | str | None = None,
             providers: str | list[str] | None = None, tolerance: Tolerance | None = None,
             per_output: dict[str, Tolerance] | None = None, samples: int = 2,
             dims: dict[str, int] | None = None, provider_tolerance: dict[str, Tolerance] | None = None,
             reference_outputs: dict[str, dict[str, list[np.ndarray]]] | None = None,
             shapes: dict[str, tuple[int, ...]] | None = None) -> ValidationReport:
    """Compare `candidate` against `reference` on every provider; see module docstring.

    `provider_tolerance` overrides `tolerance` per EP (GPU math is not bit-identical to CPU).
    `reference_outputs` (per provider) skips re-running the reference when it is known.
    """
    ref_model, cand_model = load(reference), load(candidate)
    ref_proto, cand_proto = ref_model.to_proto(), cand_model.to_proto()
    if isinstance(inputs, str):
        from onnxcomp.feeds import CalibrationData, input_specs

        inputs = CalibrationData.from_source(inputs, specs=input_specs(ref_proto))
    tolerance = tolerance or Tolerance()
    try:
        feeds = list(inputs) if inputs is not None else generate_inputs(ref_proto, samples, dims=dims, shapes=shapes)
    except InputError as exc:
        return ValidationReport([ProviderComparison(p, skipped=str(exc)) for p in parse_providers(providers)], 0)
    results = []
    for provider in parse_providers(providers):
        comparison = ProviderComparison(provider)
        results.append(comparison)
        tol = (provider_tolerance or {}).get(provider, tolerance)
        try:
            ref_out = (reference_outputs or {}).get(provider) or outputs_on(ref_proto, feeds, provider)
        except (RuntimeUnavailable, CannotRun) as exc:
            comparison.skipped = f"reference: {exc}"
            continue
        try:
            cand_out = outputs_on(cand_proto, feeds, provider)
        except RuntimeUnavailable as exc:
            comparison.skipped = str(exc)
            continue
        except CannotRun as exc:
            comparison.outputs.append(OutputComparison("<model>", float("inf"), float("inf"), 0.0, None,
                                                       False, False, f"candidate: {exc}"))
            continue
        for name, ref_values in ref_out.items():
            if name not in cand_out:
                comparison.outputs.append(OutputComparison(name, float("inf"), float("inf"), 0.0, None,
                                                           False, False, "missing from the candidate"))
                continue
            comparison.outputs.append(
                compare_arrays(name, ref_values, cand_out[name], (per_output or {}).get(name, tol)))
    return ValidationReport(results, len(feeds))
