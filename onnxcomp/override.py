"""Run a model with some of its weights replaced, in one ORT session, and measure the change.

The weights become overridable graph inputs (IR >= 4), so every candidate (a pruned, quantized or
rounded copy of one weight) runs in the same session: no session is rebuilt per candidate. Used by
the passes that measure each layer's effect on the whole model's outputs (sensitivity, prune's
auto scope, gptq's mixed precision, quantize's per-channel choice).
"""

from __future__ import annotations

import time

import numpy as np
import onnx

EVAL_SAMPLES = 16
MIN_SAMPLES = 4  # the fewest samples a time budget leaves


def output_error(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                 centered: bool = False) -> float:
    """Relative squared error Σ‖y - y₀‖² / Σ‖y₀‖², averaged over the float outputs.

    `centered`: relative to each output's variance, Σ‖y₀ - mean(y₀)‖², instead of its energy, so
    an output that sits near a constant (a detector's background probability near 1) weighs what
    varies in it, not its offset."""
    errors = []
    for name, ref0 in reference[0].items():
        if not np.issubdtype(ref0.dtype, np.floating):
            continue
        num = sum(float(np.sum((c[name].astype(np.float64) - r[name]) ** 2)) for r, c in zip(reference, candidate))
        offset = float(np.mean([np.mean(r[name], dtype=np.float64) for r in reference])) if centered else 0.0
        den = sum(float(np.sum((r[name].astype(np.float64) - offset) ** 2)) for r in reference)
        errors.append(num / max(den, 1e-30))
    return float(np.mean(errors)) if errors else 0.0


def _override_session(model, names: list[str]):
    """An ORT session in which the named initializers can be replaced by feeding them."""
    from onnxcomp.runtime import make_session

    proto = model.to_proto()
    proto.ir_version = max(proto.ir_version, 4)  # IR >= 4: initializers listed as inputs are overridable defaults
    listed = {i.name for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    for name in names:
        if name not in listed:
            t = inits[name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return make_session(proto, "cpu", threads=None)


class OverrideRunner:
    """Runs the model on held calibration feeds with some weights replaced, in ONE ORT session
    (the weights are overridable graph inputs), and measures the output error against the
    unchanged model's outputs."""

    def __init__(self, model, names: list[str], feeds, samples: int = EVAL_SAMPLES, centered: bool = False,
                 budget: tuple[int, float] | None = None):
        """`budget` = (error() calls the caller will make, seconds): fewer samples (down to
        MIN_SAMPLES) when that many runs of the model would take longer (a 800 x 608 layout
        detector: 102 layers x 16 samples x 0.24 s)."""
        self.centered = centered
        self.session = _override_session(model, names)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()}
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        missing = [name for name in names if name not in overridable]
        if missing:
            raise RuntimeError(f"onnxruntime does not let {missing[0]} be overridden")
        self.feedable = self.inputs | overridable  # ORT lists overridable initializers apart from inputs
        self.evaluation = [f for _, f in zip(range(samples), feeds)]
        self.reference = [self.run(f) for f in self.evaluation[:1]]  # (the first run warms the session up)
        if len(self.evaluation) > 1:
            started = time.perf_counter()
            self.reference.append(self.run(self.evaluation[1]))  # the second one is timed
            if budget is not None:
                calls, seconds = budget
                fit = int(seconds / max(calls * (time.perf_counter() - started), 1e-9))
                self.evaluation = self.evaluation[:max(MIN_SAMPLES, min(fit, len(self.evaluation)))]
        self.reference += [self.run(f) for f in self.evaluation[2:]]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {k: v for k, v in feed.items() if k in self.feedable})
        return dict(zip(self.outputs, values))

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """output_error of the model with these initializers replaced."""
        return output_error(self.reference, [self.run({**f, **replaced}) for f in self.evaluation], self.centered)


