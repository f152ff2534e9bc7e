"""The pipeline: per-pass report, verify_each with rollback, stop/continue, and optimize()."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxcomp
from onnxcomp import GateFailed, Pass, PassResult, Pipeline, param, register


@register
class BreakFirstConv(Pass):
    """Claims to be lossless but doubles the first Conv weight (a buggy pass, for the tests)."""

    name = "test_break_first_conv"

    @dataclass(frozen=True)
    class Config:
        factor: float = param(2.0, "weight multiplier")

    def run(self, model, ctx):
        conv = next(n for n in model.graph.nodes if n.op == "Conv")
        weight = conv.inputs[1]
        weight.values = np.asarray(weight.values * self.config.factor, dtype=weight.values.dtype)
        return PassResult(True, {"scaled": 1})


@register
class DropUnusedConstants(Pass):
    """Removes initializers nothing reads (a correct little pass, for the tests)."""

    name = "test_drop_unused"

    def run(self, model, ctx):
        before = len(model.initializers())
        model.graph.cleanup()
        removed = before - len(model.initializers())
        return PassResult(removed > 0, {"removed": removed})


def _add_unused_initializer(model):
    unused = gs.Constant("unused_weight", np.ones((16, 16), np.float32))
    model.graph.nodes.append(gs.Node("Identity", inputs=[unused], outputs=[gs.Variable("unused_out")]))
    return model


def test_report_counts_nodes_initializers_and_bytes_for_each_pass(mnist_path):
    model = _add_unused_initializer(onnxcomp.load(mnist_path))
    result = Pipeline.parse("test_drop_unused, test_drop_unused").run(model)
    first, second = result.report.passes
    assert first.changed and first.status == "ok"
    assert first.before["initializers"] - first.after["initializers"] == 1
    assert first.before["param_bytes"] - first.after["param_bytes"] == 16 * 16 * 4
    assert first.before["nodes"] - first.after["nodes"] == 1
    assert not second.changed and second.status == "unchanged"
    assert result.report.output == result.model.summary()


def test_verify_each_names_and_rolls_back_a_pass_that_breaks_outputs(mnist_path):
    pipeline = Pipeline.parse("test_break_first_conv", verify_each=True)
    original = onnxcomp.load(mnist_path)
    with pytest.raises(GateFailed) as info:
        pipeline.run(onnxcomp.load(mnist_path))
    assert "test_break_first_conv" in str(info.value) and "rolled back" in str(info.value)
    assert info.value.report.passes[0].status == "rolled back"
    del original


def test_verify_each_can_continue_past_a_failing_pass_with_the_model_unchanged(mnist_path):
    pipeline = Pipeline.parse("test_break_first_conv, test_drop_unused", verify_each=True, on_failure="continue")
    model = _add_unused_initializer(onnxcomp.load(mnist_path))
    result = pipeline.run(model)
    statuses = [p.status for p in result.report.passes]
    assert statuses == ["rolled back", "ok"]
    check = onnxcomp.validate(mnist_path, result.model, tolerance=onnxcomp.Tolerance.exact())
    assert check.passed, check.worst()


def test_without_verify_each_a_breaking_pass_is_caught_by_the_final_check(mnist_path):
    result = onnxcomp.optimize(mnist_path, "test_break_first_conv")
    assert result.report.validation is not None
    assert result.report.validation["passed"] is False


def test_optimize_accepts_calibration_data_from_a_python_iterable(mnist_path):
    feeds = ({"Input3": np.full((1, 1, 28, 28), i, np.float32)} for i in range(3))
    result = onnxcomp.optimize(mnist_path, "test_drop_unused", calibration=feeds)
    assert result.report.pipeline == "test_drop_unused"


def test_bad_calibration_data_ends_as_one_clear_error(mnist_path):
    with pytest.raises(onnxcomp.OnnxcompError) as info:
        onnxcomp.optimize(mnist_path, "test_break_first_conv(factor=0.5)", calibration=[{"Input3": 1}, 2])
    assert "\n" not in str(info.value)
