"""Streaming activation-range calibrators: minmax, percentile, entropy (KL) and mse.

Each calibrator sees one batch at a time (`update(name, array)`) and never keeps the
activations: minmax keeps two numbers per tensor, the others a fixed-size histogram whose range
doubles (merging neighbouring bins exactly) whenever a batch exceeds it. Batches may have any
shape, so sequence models whose inputs differ in length calibrate as easily as images
(ONNX Runtime's histogram calibrators stack the batches and fail there).

`ranges()` returns {tensor name: (rmin, rmax)}.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import PassError

BINS = 2048  # histogram bins over [-R, R]; even, so range doubling merges bins exactly


class MinMax:
    """The observed minimum and maximum."""

    name = "minmax"

    def __init__(self, **_):
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def update(self, name: str, x: np.ndarray) -> None:
        x = _finite(x)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo[name] = min(self.lo.get(name, lo), lo)
        self.hi[name] = max(self.hi.get(name, hi), hi)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {k: (self.lo[k], self.hi[k]) for k in self.lo}


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    x = x.ravel()
    if not np.all(np.isfinite(x)):
        x = x[np.isfinite(x)]
    return x


class Histogram:
    """A symmetric, self-widening histogram of one tensor's values plus its exact min and max."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.radius = 0.0
        self.lo = np.inf
        self.hi = -np.inf

    @property
    def width(self) -> float:
        return 2 * self.radius / self.bins

    def update(self, x: np.ndarray) -> None:
        x = _finite(x)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        absmax = max(abs(lo), abs(hi))
        if self.radius == 0.0:
            self.radius = absmax if absmax > 0 else 1e-8
        elif absmax > self.radius:
            k = int(np.ceil(np.log2(absmax / self.radius)))
            self._widen(k)
        idx = ((x + self.radius) / self.width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _widen(self, k: int) -> None:
        """Multiply the radius by 2**k, merging each 2**k old bins into one (exact)."""
        factor = 2**k
        old = np.arange(self.bins)
        new_index = (old + (factor - 1) * self.bins // 2) // factor
        counts = np.zeros(self.bins, np.int64)
        np.add.at(counts, np.clip(new_index, 0, self.bins - 1), self.counts)
        self.counts = counts
        self.radius *= factor

    def centers(self) -> np.ndarray:
        return -self.radius + (np.arange(self.bins) + 0.5) * self.width


class _HistogramCalibrator:
    name = "histogram"

    def __init__(self, **options):
        self.options = options
        self.hists: dict[str, Histogram] = {}

    def update(self, name: str, x: np.ndarray) -> None:
        self.hists.setdefault(name, Histogram()).update(x)

    def ranges(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, h in self.hists.items():
            if h.counts.sum() == 0:
                continue
            lo, hi = self.choose(h)
            out[name] = (max(float(lo), h.lo), min(float(hi), h.hi))
        return out

    def choose(self, h: Histogram) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError


class Percentile(_HistogramCalibrator):
    """Clip each tail at the given percentile (default 99.99) of the observed values."""

    name = "percentile"

    def choose(self, h: Histogram) -> tuple[float, float]:
        p = float(self.options.get("percentile", 99.99))
        cdf = np.cumsum(h.counts) / h.counts.sum()
        edges = -h.radius + np.arange(1, h.bins + 1) * h.width  # right edge of each bin
        hi = edges[min(int(np.searchsorted(cdf, p / 100.0)), h.bins - 1)]
        lo = edges[max(int(np.searchsorted(cdf, 1 - p / 100.0)) - 1, 0)]
        return lo, hi


class Entropy(_HistogramCalibrator):
    """TensorRT's KL-divergence threshold on the |x| histogram (128 quantized levels)."""

    name = "entropy"

    def choose(self, h: Histogram) -> tuple[float, float]:
        half = h.bins // 2
        mags = h.counts[half:].astype(np.float64).copy()
        mags += h.counts[:half][::-1]
        threshold = kl_threshold(mags, h.width, levels=int(self.options.get("levels", 128)))
        return -threshold, threshold


def kl_threshold(hist: np.ndarray, width: float, levels: int = 128, stride: int = 8) -> float:
    """The clipping magnitude that minimises KL(P || Q) between the clipped histogram and its
    `levels`-level quantization (TensorRT calibration, 2017), searched every `stride` bins."""
    nbins = len(hist)
    total = hist.sum()
    if total == 0:
        return width * nbins
    last = int(np.nonzero(hist)[0].max()) + 1
    if last <= levels:
        return last * width
    best, best_i = np.inf, last
    for i in range(levels, last + 1, stride):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        src = hist[:i]
        # merge i bins into `levels` groups, spread each group's mass over its non-empty bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=src, minlength=levels)
        nonzero = np.bincount(groups, weights=(src > 0).astype(np.float64), minlength=levels)
        q = np.where(src > 0, mass[groups] / np.maximum(nonzero[groups], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        pn, qn = p / p_sum, q / q_sum
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i * width


class MSE(_HistogramCalibrator):
    """The clipped range [a*min, a*max] that minimises the expected quantize-dequantize MSE."""

    name = "mse"

    def choose(self, h: Histogram) -> tuple[float, float]:
        levels = 255
        centers = h.centers()
        weights = h.counts.astype(np.float64)
        nz = weights > 0
        centers, weights = centers[nz], weights[nz]
        lo0, hi0 = min(h.lo, 0.0), max(h.hi, 0.0)
        best, best_range = np.inf, (lo0, hi0)
        for a in np.linspace(0.05, 1.0, 96):
            lo, hi = lo0 * a, hi0 * a
            scale = (hi - lo) / levels
            if scale <= 0:
                continue
            zp = np.round(-lo / scale)
            q = np.clip(np.round(centers / scale) + zp, 0, levels)
            err = float(np.sum(weights * ((q - zp) * scale - centers) ** 2))
            if err < best:
                best, best_range = err, (lo, hi)
        return best_range


CALIBRATORS = {c.name: c for c in (MinMax, Percentile, Entropy, MSE)}


def make(method: str, **options):
    if method not in CALIBRATORS:
        raise PassError(f"unknown calibrator {method!r} (choose one of: {', '.join(CALIBRATORS)})")
    return CALIBRATORS[method](**options)


def calibrate(model, names: list[str], data, method: str = "minmax", provider: str = "cpu",
              chunk: int = 2000, **options) -> dict[str, tuple[float, float]]:
    """Run the model over `data`, streaming the named tensors into one calibrator.

    Tensors are captured in chunks of `chunk` names per ORT session so that a large model's
    intermediate outputs never all sit in memory at once. Returns {name: (rmin, rmax)}.
    """
    from onnxcomp.calibration import capture

    calibrator = make(method, **options)
    proto = model.to_proto() if hasattr(model, "to_proto") else model
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        for _feed, values in capture(proto, part, data, provider=provider, threads=None):
            for name, value in values.items():
                if isinstance(value, np.ndarray) and value.dtype == np.float32:
                    calibrator.update(name, value)
    return calibrator.ranges()
