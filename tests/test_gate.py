"""The accuracy gate: bisection names the pass that broke it, backs it off, and retries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import onnxcomp
from onnxcomp import GateFailed, Pass, PassResult, param, register
from onnxcomp.gate import Gate


@register
class NoiseWeights(Pass):
    """Adds relative noise to every Conv weight (a lossy pass whose strength can be lowered)."""

    name = "test_noise_weights"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        strength: float = param(0.5, "relative noise added to Conv weights", min=0.0)

    def run(self, model, ctx):
        rng = np.random.default_rng(0)
        for node in model.graph.nodes:
            if node.op == "Conv":
                w = node.inputs[1]
                noise = rng.standard_normal(w.values.shape).astype(np.float32)
                w.values = (w.values * (1 + self.config.strength * noise)).astype(np.float32)
        return PassResult(self.config.strength > 0, {"strength": self.config.strength})

    def backoff(self):
        if self.config.strength < 1e-3:
            return None
        return self.with_params(strength=self.config.strength / 4)


@register
class StubbornNoise(Pass):
    """Adds the same relative noise to every Conv weight whatever its level: backing it off never helps."""

    name = "test_stubborn_noise"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        level: int = param(3, "back-off steps left (the noise does not depend on it)", min=0)

    def run(self, model, ctx):
        rng = np.random.default_rng(1)
        for node in model.graph.nodes:
            if node.op == "Conv":
                w = node.inputs[1]
                w.values = (w.values * (1 + 0.02 * rng.standard_normal(w.values.shape))).astype(np.float32)
        return PassResult(True, {"level": self.config.level})

    def backoff(self):
        return self.with_params(level=self.config.level - 1) if self.config.level > 0 else None


def _feeds(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [{"Input3": rng.uniform(0, 255, (1, 1, 28, 28)).astype(np.float32)} for _ in range(count)]


def test_a_failing_gate_bisects_to_the_lossy_pass_and_backs_it_off(mnist_path):
    result = onnxcomp.optimize(mnist_path, "cleanup, test_noise_weights(strength=0.8), cleanup",
                               evaluation=_feeds(6, 1), gate=Gate(min_cosine=0.999))
    path = result.report.gate["path"]
    assert result.report.gate["passed"]
    assert path[0]["culprit"] == "test_noise_weights(strength=0.8)"
    assert "backed off test_noise_weights(strength=0.8) -> test_noise_weights(strength=0.2)" in path[0]["action"]
    assert path[-1]["passed"] and path[-1]["cosine"] >= 0.999
    assert len(path) >= 2


def test_when_backing_off_the_culprit_does_not_move_the_outputs_the_earlier_lossy_pass_is_backed_off(mnist_path):
    # the first pass alone stays within the gate but uses most of it; the second tips it over at
    # any level: backing the second off again and again (then removing it) would be wasted tries
    result = onnxcomp.optimize(mnist_path, "test_noise_weights(strength=0.0125), test_stubborn_noise",
                               evaluation=_feeds(6, 1), gate=Gate(min_cosine=0.999))
    path = result.report.gate["path"]
    assert [p.get("culprit") for p in path[:2]] == ["test_stubborn_noise", "test_noise_weights(strength=0.0125)"]
    assert path[1]["cosine"] == path[0]["cosine"]  # the stubborn pass's back-off changed nothing
    assert path[2]["passed"] and path[2]["pipeline"] == "test_noise_weights(strength=0.003125), test_stubborn_noise(level=2)"


def test_a_gate_that_cannot_be_met_within_the_budget_fails_with_the_path(mnist_path):
    with pytest.raises(GateFailed) as info:
        onnxcomp.optimize(mnist_path, "test_noise_weights(strength=0.8)", evaluation=_feeds(4, 2),
                          gate=Gate(min_cosine=0.9999999, budget=1))
    assert "still fails after 1 back-offs, at pass test_noise_weights(strength=0.2)" in str(info.value)


def test_max_drop_needs_labels(mnist_path):
    with pytest.raises(onnxcomp.InputError, match="needs labels"):
        onnxcomp.optimize(mnist_path, "test_noise_weights", evaluation=_feeds(2, 3), gate=Gate(max_drop=0.5))


def test_max_drop_is_measured_against_labels_in_the_evaluation_data(mnist_path):
    feeds = _feeds(8, 4)
    reference = onnxcomp.runtime.make_session(mnist_path)
    for feed in feeds:  # label each sample with the fp32 model's own prediction: accuracy 1.0
        feed["labels"] = np.argmax(onnxcomp.runtime.run(reference, feed)["Plus214_Output_0"], -1)
    result = onnxcomp.optimize(mnist_path, "test_noise_weights(strength=0.01)", evaluation=feeds,
                               gate=Gate(max_drop=20))
    assert result.report.gate["reference_metric"] == 1.0
    assert result.report.gate["drop_points"] <= 20


def test_evaluation_data_that_overlaps_calibration_is_refused(mnist_path):
    feeds = _feeds(4, 5)
    with pytest.raises(onnxcomp.InputError, match="must not overlap"):
        onnxcomp.optimize(mnist_path, "test_noise_weights", calibration=feeds, evaluation=feeds[:2],
                          gate=Gate(min_cosine=0.9))
