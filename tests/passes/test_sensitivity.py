"""sensitivity and prune(scope=auto): measured per-layer errors and the sparsities chosen from them."""

from __future__ import annotations

import numpy as np
import pytest
from onnxcomp.passes.sensitivity import Sensitivity, allocate, measure

import onnxcomp
from onnxcomp import hessian as hs
from onnxcomp.context import PassContext


@pytest.fixture(scope="module")
def digits():
    from models import zoo

    return zoo.get("digits_cnn")


def test_allocate_reaches_the_target_taking_the_least_sensitive_layer_first():
    table = {"fragile": [(0.0, 0.0), (0.5, 1.0), (0.9, 5.0)], "robust": [(0.0, 0.0), (0.5, 0.01), (0.9, 0.05)]}
    sizes = {"fragile": 100, "robust": 100}
    chosen = allocate(table, sizes, target=0.5)
    assert chosen["robust"] == pytest.approx(0.9) and chosen["fragile"] == pytest.approx(0.1)
    assert sum(chosen[k] * sizes[k] for k in sizes) == pytest.approx(100)


def test_allocate_stops_at_the_error_bound():
    table = {"a": [(0.0, 0.0), (0.5, 0.1), (0.9, 1.0)]}
    chosen = allocate(table, {"a": 10}, target=0.9, max_error=0.1)
    assert chosen["a"] == pytest.approx(0.5)


def test_measured_error_grows_with_sparsity_on_every_digits_layer(digits):
    model = onnxcomp.load(digits.path)
    layers = hs.find_weight_layers(model)
    table = measure(model, layers, digits.calibration(32), sparsities=(0.3, 0.9), eval_samples=16)
    assert set(table) == {layer.name for layer in layers}
    for points in table.values():
        assert points[0] == (0.0, 0.0) and 0 < points[1][1] < points[2][1]


def test_sensitivity_pass_reports_errors_and_changes_nothing(digits):
    model = onnxcomp.load(digits.path)
    before = {k: np.asarray(v.values).copy() for k, v in model.initializers().items()}
    ctx = PassContext(calibration=onnxcomp.CalibrationData(digits.calibration(32), "digits"))
    result = Sensitivity(sparsities=(0.5, 0.9), target=0.7).run(model, ctx)
    assert result.changed is False
    assert set(result.stats["errors"]) == set(result.stats["allocation"])
    assert all(np.array_equal(before[k], np.asarray(v.values)) for k, v in model.initializers().items())


def test_auto_scope_reaches_the_sparsity_with_less_error_than_uniform_layers(digits):
    cal, acc = digits.calibration(64), {}
    for scope in ("layer", "auto"):
        result = onnxcomp.optimize(digits.path, f"prune(sparsity=0.8, scope={scope})", calibration=cal, check=False, gate=False)
        stats = result.report.passes[0].stats
        assert stats["sparsity"] == pytest.approx(0.8, abs=2 / stats["params"])
        acc[scope] = digits.evaluate(result.model.to_proto())["test_acc"]
    assert acc["auto"] > acc["layer"] + 0.05, acc
