"""Streaming activation-range calibrators: minmax, percentile, entropy (KL) and mse.

Each calibrator sees one batch at a time (`update(name, array)`) and never keeps the
activations: minmax keeps two numbers per tensor, the others a fixed log-spaced histogram
(about 2 % relative resolution from 1e-12 to 1e12, each sign apart). Batches may have any
shape, so sequence models whose inputs differ in length calibrate as easily as images
(ONNX Runtime's histogram calibrators stack the batches and fail there).

`ranges()` returns {tensor name: (rmin, rmax)}.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.errors import PassError



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
    """A log-spaced histogram of one tensor's values (each sign apart) plus its exact min and max.

    Bins are 1/32 octave wide (about 2 % relative width) over magnitudes 2**-40 .. 2**40, so the
    bulk of a distribution keeps its resolution even when a rare outlier is 1000x larger (which
    a linear histogram sized by the outlier would squash into a handful of bins). Fixed bins:
    batches of any shape and range merge by addition.
    """

    PER_OCTAVE = 32
    LOW, HIGH = -40, 40

    def __init__(self):
        self.bins = (self.HIGH - self.LOW) * self.PER_OCTAVE
        self.pos = np.zeros(self.bins, np.int64)
        self.neg = np.zeros(self.bins, np.int64)
        self.zero = 0
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        x = _finite(x)
        if x.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        mag = np.abs(x)
        tiny = mag < 2.0**self.LOW
        self.zero += int(tiny.sum())
        with np.errstate(divide="ignore"):
            idx = ((np.log2(np.maximum(mag, 2.0**self.LOW)) - self.LOW) * self.PER_OCTAVE).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        positive = (x > 0) & ~tiny
        negative = (x < 0) & ~tiny
        self.pos += np.bincount(idx[positive], minlength=self.bins)
        self.neg += np.bincount(idx[negative], minlength=self.bins)

    def magnitudes(self) -> np.ndarray:
        """Bin centre magnitudes."""
        return 2.0 ** ((np.arange(self.bins) + 0.5) / self.PER_OCTAVE + self.LOW)

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, counts) of every non-empty bin, ascending; centres clipped to [lo, hi]."""
        mags = self.magnitudes()
        values = np.concatenate([-mags[::-1], [0.0], mags])
        counts = np.concatenate([self.neg[::-1], [self.zero], self.pos]).astype(np.float64)
        keep = counts > 0
        return np.clip(values[keep], self.lo, self.hi), counts[keep]

    def total(self) -> int:
        return int(self.pos.sum() + self.neg.sum() + self.zero)


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
            if h.total() == 0:
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
        p = float(self.options.get("percentile", 99.99)) / 100.0
        values, counts = h.signed()
        cdf = np.cumsum(counts) / counts.sum()
        hi = values[min(int(np.searchsorted(cdf, p)), len(values) - 1)]
        lo = values[min(int(np.searchsorted(cdf, 1 - p)), len(values) - 1)]
        return lo, hi


class Entropy(_HistogramCalibrator):
    """TensorRT's KL-divergence threshold on |x|: for each candidate threshold T, the 2048-bin
    histogram of |x| on [0, T] (outliers in the last bin) against its 128-level quantization."""

    name = "entropy"

    def choose(self, h: Histogram) -> tuple[float, float]:
        mags = h.magnitudes()
        counts = (h.pos + h.neg).astype(np.float64)
        absmax = max(abs(h.lo), abs(h.hi))
        if counts.sum() == 0 or absmax == 0:
            return h.lo, h.hi
        best, best_t = np.inf, absmax
        for t in absmax * 2.0 ** -np.linspace(0, 12, 49):
            pos = np.minimum(mags / t * 2048, 4096).astype(np.int64)
            inside = pos < 2048
            fine = np.bincount(pos[inside], weights=counts[inside], minlength=2048)
            fine[0] += h.zero
            clipped = fine.copy()
            clipped[-1] += counts[~inside].sum()  # P: outliers folded into the last bin
            kl = kl_divergence(clipped, fine, levels=int(self.options.get("levels", 128)))
            if kl < best:
                best, best_t = kl, t
        return -best_t, best_t


def kl_divergence(p: np.ndarray, hist: np.ndarray | None = None, levels: int = 128) -> float:
    """KL(P || Q): Q is `hist` (default P) merged into `levels` groups, each group's mass spread
    over its non-empty bins (TensorRT: P carries the clipped outliers, Q does not)."""
    hist = p if hist is None else hist
    n = len(hist)
    groups = np.minimum((np.arange(n) * levels) // n, levels - 1)
    mass = np.bincount(groups, weights=hist, minlength=levels)
    nonzero = np.bincount(groups, weights=(hist > 0).astype(np.float64), minlength=levels)
    q = np.where(hist > 0, mass[groups] / np.maximum(nonzero[groups], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    pn, qn = p / p_sum, q / q_sum
    mask = pn > 0
    return float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))


class MSE(_HistogramCalibrator):
    """The clipped range [a*min, a*max] that minimises the expected quantize-dequantize MSE."""

    name = "mse"

    def choose(self, h: Histogram) -> tuple[float, float]:
        levels = 255
        centers, weights = h.signed()
        lo0, hi0 = min(h.lo, 0.0), max(h.hi, 0.0)

        def error(lo: float, hi: float) -> float:
            scale = (hi - lo) / levels
            if scale <= 0:
                return np.inf
            zp = np.round(-lo / scale)
            q = np.clip(np.round(centers / scale) + zp, 0, levels)
            return float(np.sum(weights * ((q - zp) * scale - centers) ** 2))

        # each end clipped on its own (coordinate descent): a one-sided outlier must not drag the other
        lo, hi = lo0, hi0
        shrink = 2.0 ** -np.linspace(0, 12, 145)
        for _ in range(2):
            hi = min((hi0 * a for a in shrink), key=lambda c: error(lo, c)) if hi0 > 0 else 0.0
            lo = min((lo0 * a for a in shrink), key=lambda c: error(c, hi)) if lo0 < 0 else 0.0
        return lo, hi


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
