"""Validation: generated inputs, metrics, tolerances, providers and exit codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import Tolerance
from onnxcomp.validate import compare_arrays, generate_inputs

from .helpers import assert_one_line_error, run_cli

DYNAMIC = """
<ir_version: 8, opset_import: ["" : 17]>
dyn (float[batch, seq, 8] x, int64[batch, seq] ids) => (float[batch, seq, 8] y) {
    f = Cast<to = 1>(ids)
    u = Unsqueeze(f, axes)
    y = Add(x, u)
}
"""


def _dynamic_model() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(DYNAMIC)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "axes"))
    return proto


def test_generated_inputs_follow_declared_types_and_size_dynamic_dimensions():
    feed, = generate_inputs(_dynamic_model(), dims={"seq": 5})
    assert feed["x"].shape == (1, 5, 8) and feed["x"].dtype == np.float32
    assert feed["ids"].dtype == np.int64 and set(np.unique(feed["ids"])) <= {0, 1}


def test_a_model_validates_exactly_against_itself_on_dynamic_shapes():
    report = onnxcomp.validate(_dynamic_model(), _dynamic_model(), tolerance=Tolerance.exact())
    assert report.passed, report.worst()


def test_metrics_report_abs_rel_cosine_and_top1():
    ref = [np.array([[1.0, 2.0, 3.0]], np.float32)]
    cand = [np.array([[1.0, 2.5, 2.0]], np.float32)]
    result = compare_arrays("logits", ref, cand, Tolerance(atol=0.1, rtol=0.0))
    assert result.max_abs == pytest.approx(1.0)
    assert result.max_rel == pytest.approx(1 / 3)
    assert result.top1 == 0.0
    assert 0.9 < result.cosine < 1.0
    assert not result.passed


def test_nan_in_the_same_places_passes_and_elsewhere_fails():
    ref = [np.array([1.0, np.nan], np.float32)]
    assert compare_arrays("y", ref, [np.array([1.0, np.nan], np.float32)], Tolerance.exact()).passed
    assert not compare_arrays("y", ref, [np.array([np.nan, 1.0], np.float32)], Tolerance.exact()).passed


def test_min_cosine_is_applied_per_output():
    ref = [np.array([1.0, 0.0], np.float32)]
    cand = [np.array([1.0, 0.5], np.float32)]
    assert compare_arrays("y", ref, cand, Tolerance(atol=1.0, rtol=0, min_cosine=0.8)).passed
    assert not compare_arrays("y", ref, cand, Tolerance(atol=1.0, rtol=0, min_cosine=0.99)).passed


def test_cli_validate_exits_0_within_and_1_outside_tolerance(mnist_path, tmp_path):
    changed = onnxcomp.load(mnist_path)
    conv = next(n for n in changed.graph.nodes if n.op == "Conv")
    conv.inputs[1].values = conv.inputs[1].values * np.float32(1.001)
    candidate = onnxcomp.save(changed, tmp_path / "changed.onnx")
    assert run_cli("validate", mnist_path, mnist_path).returncode == 0
    outside = run_cli("validate", mnist_path, candidate, "--atol", "1e-6", "--rtol", "0")
    assert outside.returncode == 1, outside.stdout + outside.stderr
    within = run_cli("validate", mnist_path, candidate, "--atol", "1", "--json")
    assert within.returncode == 0 and '"passed": true' in within.stdout


def test_cli_validate_exits_2_on_an_unreadable_model(mnist_path, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    assert_one_line_error(run_cli("validate", mnist_path, bad), "not an ONNX model")


def test_cuda_provider_is_reported_as_not_run_where_absent(mnist_path):
    import onnxruntime as ort

    report = onnxcomp.validate(mnist_path, mnist_path, providers="cpu,cuda")
    cuda = report.providers[1]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert cuda.passed
    else:
        assert cuda.skipped and "not available" in cuda.skipped
        assert report.passed  # the CPU comparison still counts


@pytest.mark.cuda
def test_mnist_agrees_between_cpu_and_cuda_within_tf32_tolerance(mnist_path):
    feeds = generate_inputs(onnxcomp.load(mnist_path), 4)
    report = onnxcomp.validate(mnist_path, mnist_path, feeds, providers="cpu,cuda")
    assert report.passed, report.worst()
