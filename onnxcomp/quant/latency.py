"""Latency gate: time a quantized model against its float original, interleaved, on one EP.

Both sessions run in alternating rounds so that machine drift (other jobs, frequency changes)
hits both alike; the figure is the median of the per-round medians. The gate reports the ratio
quantized / float: above 1 the quantized model is slower, which on CPUs without VNNI is common
for convolutions, and the user must hear about it.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.runtime import interleaved_latency_ms


def gate(float_model, quant_model, feed: dict[str, np.ndarray], provider: str = "cpu",
         threads: int | None = 1, **timing) -> dict[str, float]:
    """{'float_ms', 'quantized_ms', 'speedup'} (speedup = float / quantized; < 1 is slower)."""
    timing = {"rounds": 5, "round_seconds": 0.15, "min_runs": 5, "warmup": 3, **timing}
    times = interleaved_latency_ms({"float": float_model, "quantized": quant_model}, feed, threads,
                                   provider=provider, **timing)
    return {"float_ms": times["float"], "quantized_ms": times["quantized"],
            "speedup": times["float"] / times["quantized"] if times["quantized"] > 0 else float("inf")}
