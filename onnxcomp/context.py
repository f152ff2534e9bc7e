"""PassContext: what passes share besides the model — data, providers, tolerances, analyses.

Expensive analyses (activation ranges, layer Hessians, sensitivities) are cached here under a
key. A pass that changes what an analysis depends on calls `invalidate()` (LLVM's "preserved
analyses", in small): the pipeline does it for every pass that changed the model unless the
pass lists the analyses it preserves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from onnxcomp.calibration import CalibrationData


LASTING = "analyses of exact models"  # the _cache entry that invalidate() keeps (analysis_of)
# Past this many bytes of weights nothing hashes the whole model (analysis_of, the pipeline's
# weight digests): it would read every external weight into memory and cost seconds per pass.
HASH_LIMIT = 512 * 2**20


@dataclass
class Tolerance:
    """Agreement required between a reference and a candidate output.

    An output passes when its max abs error <= atol + rtol * |reference| everywhere, or (with
    `scale_rtol`) <= atol + scale_rtol * the output's largest |reference| (NaN only where the
    reference has NaN), its cosine >= min_cosine and its top-1 agreement >= min_top1.
    """

    atol: float = 1e-5
    rtol: float = 1e-4
    min_cosine: float | None = None
    min_top1: float | None = None
    scale_rtol: float | None = None

    @classmethod
    def exact(cls) -> Tolerance:
        return cls(atol=0.0, rtol=0.0)


@dataclass
class PassContext:
    calibration: CalibrationData | None = None
    evaluation: CalibrationData | None = None  # held-out inputs for validation (never calibration)
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    tolerance: Tolerance = field(default_factory=Tolerance)
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)  # sizes of symbolic input dims for generated inputs
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # whole input shapes for generated inputs
    progress: Callable[[str, float], None] | None = None
    input_model: Any = None  # the Model before the pipeline's first pass, kept for passes that need it
    notes: list[str] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict)

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        """The cached value of an analysis, computed on first use."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def analysis_of(self, model, key: str, compute: Callable[[], Any]) -> Any:
        """An analysis of this exact model (graph and weights), kept across invalidations: the
        accuracy gate re-runs a pipeline after each back-off, and a pass late in it (prune's layer
        Hessians) then sees the very model it saw before. Keyed by a digest of the serialized
        model, so any edit makes a new key; past HASH_LIMIT of weights it is not kept."""
        import hashlib

        if model.summary()["param_bytes"] > HASH_LIMIT:
            return self.analysis(key, compute)
        digest = hashlib.blake2b(model.to_proto().SerializeToString(), digest_size=16).hexdigest()
        lasting = self._cache.setdefault(LASTING, {})
        if (digest, key) not in lasting:
            lasting[(digest, key)] = compute()
        return lasting[(digest, key)]

    def invalidate(self, keep: tuple[str, ...] = ()) -> None:
        """Drop every cached analysis except those named in `keep`."""
        self._cache = {k: v for k, v in self._cache.items() if k in keep or k == LASTING}

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def note(self, message: str) -> None:
        """Something the user should read in the report (e.g. an opset upgrade)."""
        self.notes.append(message)

    def require_calibration(self, pass_name: str) -> CalibrationData:
        from onnxcomp.errors import PassError

        if self.calibration is None:
            raise PassError(f"{pass_name} needs calibration data (--calibration FILE.npz or an image folder)")
        return self.calibration
