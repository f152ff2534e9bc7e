"""The model zoo: named models with their data and their task metric.

    from models import zoo
    entry = zoo.get("digits_cnn")
    entry.path                       # cached .onnx, built on first access
    entry.calibration(n)             # list of {input: array} feeds (never shared with evaluation)
    entry.evaluation(n)              # list of feeds held out for measuring quality
    entry.evaluate(model_or_path)    # task metric on the evaluation feeds, ORT CPU
    entry.latency_feed()             # one representative input for timing
    entry.available()                # (ok, reason) - real models need ../shared/models/real

Built models are cached in $ONNXCOMP_CACHE or <repo>/.cache/zoo, under a name carrying a
builder version, and written atomically (temporary file, then rename), so concurrent builds by
several processes are harmless: they produce the same bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

REPO_ROOT = Path(__file__).resolve().parents[1]


class ZooUnavailable(RuntimeError):
    """The model cannot be built or found here (e.g. ../shared/models/real is absent)."""


def cache_dir() -> Path:
    path = Path(os.environ.get("ONNXCOMP_CACHE") or REPO_ROOT / ".cache" / "zoo")
    path.mkdir(parents=True, exist_ok=True)
    return path


def real_dir() -> Path:
    """../shared/models/real beside the repository root (the real, trained models and photos)."""
    return (REPO_ROOT / ".." / "shared" / "models" / "real").resolve()


def save_atomic(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- metrics -------------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def run_all(model_or_path: Any, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs of the model on every feed, ORT CPU (one thread, deterministic)."""
    from onnxcomp.runtime import make_session, run

    if isinstance(model_or_path, str):
        model_or_path = Path(model_or_path)
    session = make_session(model_or_path, "cpu", threads=1)
    return [run(session, feed) for feed in feeds]


def output_agreement(ref: list[dict[str, np.ndarray]], cand: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per output: mean and min over samples of the cosine vs the reference, and max abs diff."""
    result: dict[str, float] = {}
    names = list(ref[0]) if ref else []
    all_cos = []
    for position, name in enumerate(names):
        # candidates may rename outputs; match by name, else by position
        key = name if name in cand[0] else list(cand[0])[position]
        cos = [cosine(r[name], c[key]) for r, c in zip(ref, cand)]
        diff = max(float(np.max(np.abs(r[name].astype(np.float64) - c[key].astype(np.float64))))
                   if r[name].size else 0.0 for r, c in zip(ref, cand))
        result[f"cos_{name}"] = float(np.mean(cos))
        result[f"cos_min_{name}"] = float(np.min(cos))
        result[f"max_abs_{name}"] = diff
        all_cos += cos
    result["cos_mean"] = float(np.mean(all_cos)) if all_cos else 1.0
    result["cos_min"] = float(np.min(all_cos)) if all_cos else 1.0
    return result


# ---- entries -------------------------------------------------------------------------------
class Entry:
    """One zoo model. Subclasses set `name`, `version`, implement `_build`, `_calibration`,
    `_evaluation` and may override `evaluate`."""

    name: str = ""
    version: str = "1"
    description: str = ""
    default_calibration: int | None = None
    default_evaluation: int | None = None

    def __init__(self) -> None:
        self._reference: dict[int | None, list[dict[str, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"<zoo entry {self.name}>"

    # -- availability and the file
    def available(self) -> tuple[bool, str]:
        return True, ""

    def _require(self) -> None:
        ok, reason = self.available()
        if not ok:
            raise ZooUnavailable(f"{self.name}: {reason}")

    @property
    def cache_path(self) -> Path:
        return cache_dir() / f"{self.name}-v{self.version}.onnx"

    @property
    def path(self) -> Path:
        self._require()
        target = self.cache_path
        if not target.exists():
            import warnings

            with warnings.catch_warnings():  # exporters are chatty (deprecations, tracer warnings)
                warnings.simplefilter("ignore")
                save_atomic(self._build(), target)
        return target

    def load(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))

    def _build(self) -> onnx.ModelProto:
        raise NotImplementedError

    # -- data
    def calibration(self, n: int | None = None) -> list[dict[str, np.ndarray]]:
        self._require()
        feeds = self._calibration()
        return feeds[: n or self.default_calibration or len(feeds)]

    def evaluation(self, n: int | None = None) -> list[dict[str, np.ndarray]]:
        self._require()
        feeds = self._evaluation()
        return feeds[: n or self.default_evaluation or len(feeds)]

    def _calibration(self) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def _evaluation(self) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def latency_feed(self) -> dict[str, np.ndarray]:
        return self.evaluation(1)[0]

    # -- metric
    def reference_outputs(self, n: int | None = None) -> list[dict[str, np.ndarray]]:
        """Outputs of the fp32 model on the evaluation feeds (computed once per process)."""
        if n not in self._reference:
            self._reference[n] = run_all(self.path, self.evaluation(n))
        return self._reference[n]

    def evaluate(self, model_or_path: Any, n: int | None = None) -> dict[str, float]:
        """Default metric: output cosine (mean/min over samples) and max abs diff vs fp32."""
        ref = self.reference_outputs(n)
        cand = run_all(model_or_path, self.evaluation(n))
        return output_agreement(ref, cand)


_REGISTRY: dict[str, Callable[..., Entry]] = {}
_INSTANCES: dict[tuple, Entry] = {}


def register(name: str, factory: Callable[..., Entry]) -> None:
    _REGISTRY[name] = factory


def _load_builtin() -> None:
    # Always import them all (a no-op once imported): a caller that imported models.real first has
    # filled _REGISTRY partly, so "registry not empty" does not mean "every builder is in".
    from models import digits, minilm, real, torch_archs  # noqa: F401  (each registers itself)


def names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get(name: str, **options: Any) -> Entry:
    """The zoo entry `name` (one instance per name and options, so reference outputs are shared).

    Options: resnet18 / mobilenet_v2 take `image_size` (default 224) for smaller test inputs.
    """
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown zoo model {name!r} (known: {', '.join(_REGISTRY)})")
    key = (name, tuple(sorted(options.items())))
    if key not in _INSTANCES:
        _INSTANCES[key] = _REGISTRY[name](**options)
    return _INSTANCES[key]
