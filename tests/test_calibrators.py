"""Streaming calibrators: ranges from batches of any shape, without keeping activations."""

import numpy as np
import pytest

from onnxcomp.quant import calibrators
from onnxcomp.quant.calibrators import Histogram, kl_divergence


def test_minmax_tracks_extremes_across_batches_of_different_shapes():
    cal = calibrators.make("minmax")
    cal.update("t", np.array([[0.5, -1.0]], np.float32))
    cal.update("t", np.arange(12, dtype=np.float32).reshape(1, 3, 4) - 3)
    assert cal.ranges()["t"] == (-3.0, 8.0)


def test_histogram_keeps_every_count_and_two_percent_resolution_across_scales():
    rng = np.random.default_rng(0)
    h = Histogram()
    small, large = rng.normal(0, 0.1, 5000), rng.normal(0, 10, 5000)
    h.update(small)
    h.update(large)
    assert h.total() == 10000
    values, counts = h.signed()
    cdf = np.cumsum(counts) / counts.sum()
    data = np.concatenate([small, large])
    for q in (0.1, 0.3, 0.5, 0.7, 0.9):
        estimate = values[np.searchsorted(cdf, q)]
        exact = np.quantile(data, q)
        assert abs(estimate - exact) <= 0.03 * abs(exact) + 1e-3


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibrators_clip_a_single_far_outlier(method):
    rng = np.random.default_rng(1)
    cal = calibrators.make(method, percentile=99.9)
    for n in (300, 1000, 777):  # batches of different lengths, like sentences
        cal.update("t", rng.normal(0, 1, (1, n, 8)).astype(np.float32))
    cal.update("t", np.array([1000.0], np.float32))
    lo, hi = cal.ranges()["t"]
    assert 1.0 < hi < 100.0
    assert -100.0 < lo < 0.0


def test_every_calibrator_range_lies_within_the_observed_values():
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_cauchy(20000)).astype(np.float32)  # post-ReLU-like, heavy tail
    for method in calibrators.CALIBRATORS:
        cal = calibrators.make(method)
        cal.update("t", x)
        lo, hi = cal.ranges()["t"]
        assert x.min() <= max(lo, x.min()) and hi <= x.max() + 1e-6, method
        assert hi > 0


def test_mse_calibrator_beats_minmax_on_quantization_error_for_heavy_tails():
    rng = np.random.default_rng(3)
    x = rng.standard_t(2, 50000).astype(np.float32)

    def mse(lo, hi):
        scale = (hi - lo) / 255
        zp = np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - x) ** 2))

    ranges = {}
    for method in ("minmax", "mse"):
        cal = calibrators.make(method)
        cal.update("t", x)
        ranges[method] = cal.ranges()["t"]
    assert mse(*ranges["mse"]) < mse(*ranges["minmax"])


def test_kl_divergence_is_zero_for_a_histogram_its_quantization_represents_exactly():
    flat = np.ones(1024)
    assert kl_divergence(flat, levels=128) == pytest.approx(0.0, abs=1e-12)
    uneven = np.random.default_rng(4).random(1024)
    assert kl_divergence(uneven, levels=128) > 0


def test_unknown_calibrator_is_a_user_error():
    from onnxcomp.errors import PassError

    with pytest.raises(PassError, match="unknown calibrator"):
        calibrators.make("magic")


def test_every_calibrator_runs_on_minilm_sentences_of_different_lengths():
    zoo = pytest.importorskip("models.zoo")
    e = zoo.get("minilm")
    ok, why = e.available()
    if not ok:
        pytest.skip(why)
    from onnxcomp.calibration import capture
    from onnxcomp.model import load

    model = load(e.path)
    names = [n.inputs[0].name for n in model.graph.nodes if n.op == "MatMul"][:12]
    feeds = e.calibration(3)
    assert len({f["input_ids"].shape[1] for f in feeds}) > 1  # ORT's histogram calibrators fail on this
    cals = {m: calibrators.make(m) for m in calibrators.CALIBRATORS}
    for _feed, values in capture(model, names, feeds):
        for name, value in values.items():
            for cal in cals.values():
                cal.update(name, value)
    for method, cal in cals.items():
        ranges = cal.ranges()
        assert set(ranges) == set(names), method
        assert all(np.isfinite(lo) and np.isfinite(hi) and lo <= hi for lo, hi in ranges.values()), method
