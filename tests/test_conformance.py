"""Conformance: `fold, cleanup, fuse` over every ONNX backend node case and the nine light models.

For every case ONNX Runtime can run, `fold, cleanup` alone must give bit-identical outputs to the
unoptimized model (NaN equal to NaN), and the fused model must match the expected outputs (rtol
1e-3, atol 1e-7, as onnx's backend runner) -- or, where ORT's own outputs differ from onnx's
expected ones, ORT's outputs of the unoptimized model. Element types ORT's Python API cannot
carry (bfloat16, float8, float4, int4, int2) go through onnxcomp.runtime's raw-byte bridge.
Skipped, with the reason counted: cases ORT cannot run, and cases whose outputs vary from run to
run (random ops). The totals go to benchmarks/results/conformance.json and are printed.
"""

from __future__ import annotations

import glob
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.model import Model
from onnxcomp.runtime import CannotRun, make_session, run

ort.set_default_logger_severity(4)  # cases ORT cannot run are counted, not logged

RTOL, ATOL = 1e-3, 1e-7
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "conformance.json"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# The light models build their weights with ConstantOfShape (up to 392 MiB each in vgg19): fold
# them all by lifting the growth limit, which by default keeps such expansions as nodes.
LIGHT_SPEC = "fold(max_growth_mb=1024), cleanup, fuse"


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = make_session(proto, "cpu", threads=1)
    names = [o.name for o in session.get_outputs()]
    result = run(session, feeds, names)
    return [result[n] for n in names]


def _close(expected, actual) -> bool:
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):  # sequences, datasets
        return (isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple))
                and len(expected) == len(actual) and all(_close(e, a) for e, a in zip(expected, actual)))
    if expected is None or actual is None:  # empty optionals
        return expected is None and actual is None
    e, a = np.asarray(expected), np.asarray(actual)
    if e.shape != a.shape:
        return False
    if e.dtype.type.__module__.startswith("ml_dtypes"):  # bfloat16, float8, int4...: compare as values
        wide = np.float32 if "float" in e.dtype.name else np.int32
        e, a = e.astype(wide), a.astype(e.dtype).astype(wide)
    if e.dtype.kind in "fc":
        a = a.astype(e.dtype) if a.dtype != e.dtype else a
        return bool(np.allclose(a, e, rtol=RTOL, atol=ATOL, equal_nan=True))
    if e.dtype == object or e.dtype.kind in "USO":
        return bool((e.astype(str) == a.astype(str)).all())
    return bool(np.array_equal(e, a))


def _identical(x, y) -> bool:
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        return (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y)
                and all(_identical(a, b) for a, b in zip(x, y)))
    if x is None or y is None:
        return x is None and y is None
    a, b = np.asarray(x), np.asarray(y)
    if a.dtype == object:
        return a.shape == b.shape and bool((a.astype(str) == b.astype(str)).all())
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_case(name: str, proto: onnx.ModelProto, datasets: list, spec: str = "fold, cleanup, fuse"):
    """-> ("passed", detail) | ("skipped", reason) | ("failed", reason), plus node counts."""
    try:
        reference = [_run(proto, feeds) for feeds, _ in datasets]
    except CannotRun as exc:
        return "skipped", "ORT cannot run: " + _reason(exc), None
    if not all(_close(exp, ref) for (_, exp), ref in zip(datasets, reference)):
        # ORT's own semantics differ from onnx's expected outputs (DFT precision, int4 saturation,
        # resize modes...): the optimized model must then reproduce ORT's outputs instead.
        again = [_run(proto, feeds) for feeds, _ in datasets]
        if not all(_identical(r, a) for r, a in zip(reference, again)):
            return "skipped", "ORT's outputs vary from run to run (random ops)", None
        datasets = [(feeds, ref) for (feeds, _), ref in zip(datasets, reference)]
    exact_spec, fuse_spec = spec.rsplit(", fuse", 1)[0], "fuse"
    try:
        model = Model.from_proto(proto)
        exact = onnxcomp.optimize(model, exact_spec, check=False).model
        exact_proto = exact.to_proto()
        fused = onnxcomp.optimize(Model.from_proto(exact_proto), fuse_spec, check=False)
    except Exception as exc:  # noqa: BLE001 - onnx/ORT raise many exception types
        try:
            Model.from_proto(proto).to_proto()
        except Exception as core:  # noqa: BLE001 - onnx/ORT raise many exception types
            return "failed", f"onnxcomp cannot load/save it: {type(core).__name__}: {core}", None
        return "failed", f"pass error: {type(exc).__name__}: {exc}", None
    counts = (len(proto.graph.node), len(exact_proto.graph.node), len(fused.model.graph.nodes),
              sum(n.op == "ConstantOfShape" for n in fused.model.graph.nodes))
    try:
        exact_out = [_run(exact_proto, feeds) for feeds, _ in datasets]
    except CannotRun as exc:
        return "failed", "optimized (fold, cleanup) model does not run: " + _reason(exc), counts
    if not all(_identical(r, o) for r, o in zip(reference, exact_out)):
        return "failed", "fold, cleanup changed the outputs (not bit-identical)", counts
    if fused.report.passes[-1].changed:
        try:
            fused_out = [_run(fused.model.to_proto(), feeds) for feeds, _ in datasets]
        except CannotRun as exc:
            return "failed", "optimized (fuse) model does not run: " + _reason(exc), counts
        if not all(_close(exp, out) for (_, exp), out in zip(datasets, fused_out)):
            return "failed", "fuse moved outputs outside rtol 1e-3 / atol 1e-7", counts
    return "passed", "", counts


def _reason(exc: Exception) -> str:
    text = str(exc).split(": ", 1)[-1]
    if "Numpy_type" in text or "No corresponding Numpy type" in text:
        return "its Python API has no numpy type for this dtype (float8, int4, bfloat16...)"
    for marker in ("NOT_IMPLEMENTED", "Could not find an implementation", "INVALID_GRAPH", "INVALID_ARGUMENT",
                   "FAIL", "RUNTIME_EXCEPTION"):
        if marker in text:
            return marker
    return text[:60]


def _normalize(value):
    """Data-set entries may be TensorProtos or numpy scalars (as in onnx's own runner)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        inputs = [i.name for i in case.model.graph.input if i.name not in {t.name for t in case.model.graph.initializer}]
        datasets = []
        for ins, outs in case.data_sets:
            datasets.append(({n: _normalize(v) for n, v in zip(inputs, ins)}, [_normalize(v) for v in outs]))
        yield case.name, case.model, datasets


def light_cases():
    for path in sorted(glob.glob(str(LIGHT_DIR / "light_*.onnx"))):
        proto = onnx.load(path)
        inits = {t.name for t in proto.graph.initializer}
        feeds = {}
        for vi in proto.graph.input:
            if vi.name in inits:
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            feeds[vi.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)  # as onnx's runner does
        expected = [numpy_helper.to_array(onnx.load_tensor(f"{path[:-5]}_output_{i}.pb"))
                    for i in range(len(proto.graph.output))]
        yield Path(path).stem, proto, [(feeds, expected)]


def _totals(results: dict) -> dict:
    status = Counter(s for s, _ in results.values())
    reasons = Counter(r for s, r in results.values() if s == "skipped")
    return {"passed": status["passed"], "skipped": status["skipped"], "failed": status["failed"],
            "skipped_by_reason": dict(reasons.most_common()),
            "failures": {k: r for k, (s, r) in results.items() if s == "failed"}}


def _save(key: str, data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[key] = data
    RESULTS.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


def test_every_backend_node_case_keeps_its_outputs_after_fold_cleanup_fuse(capsys):
    started = time.perf_counter()
    results = {}
    for name, proto, datasets in node_cases():
        status, reason, _ = check_case(name, proto, datasets)
        results[name] = (status, reason)
    totals = _totals(results)
    totals["seconds"] = round(time.perf_counter() - started, 1)
    _save("node_cases", totals)
    with capsys.disabled():
        print(f"\nconformance (node cases): {totals['passed']} passed, {totals['skipped']} skipped, "
              f"{totals['failed']} failed in {totals['seconds']} s; skipped by reason: {totals['skipped_by_reason']}")
    assert totals["passed"] > 1000
    assert not totals["failures"], "\n".join(f"{k}: {v}" for k, v in totals["failures"].items())


@pytest.mark.skipif(not LIGHT_DIR.is_dir(), reason="onnx was installed without its backend test data")
def test_light_models_keep_their_outputs_and_lose_every_constantofshape(capsys):
    started = time.perf_counter()
    results, counts, leftovers = {}, {}, {}
    for name, proto, datasets in light_cases():
        status, reason, count = check_case(name, proto, datasets, LIGHT_SPEC)
        results[name] = (status, reason)
        if count:
            counts[name] = {"before": count[0], "fold_cleanup": count[1], "after": count[2]}
        if count is None or count[3]:
            leftovers[name] = count[3] if count else "not optimized"
    totals = _totals(results)
    totals.update(nodes=counts, seconds=round(time.perf_counter() - started, 1))
    _save("light_models", totals)
    with capsys.disabled():
        print(f"\nconformance (light models): {totals['passed']} passed, {totals['skipped']} skipped, "
              f"{totals['failed']} failed in {totals['seconds']} s; nodes: {counts}")
    assert len(results) == 9
    assert not totals["failures"], "\n".join(f"{k}: {v}" for k, v in totals["failures"].items())
    assert not leftovers, f"ConstantOfShape left: {leftovers}"
