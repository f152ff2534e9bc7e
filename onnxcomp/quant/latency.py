"""Latency gate: time a quantized model against its float original, interleaved, on one EP.

Both sessions run in alternating rounds so that machine drift (other jobs, frequency changes)
hits both alike; the figure is the median of the per-round medians. The gate reports the ratio
quantized / float: above 1 the quantized model is slower, which on CPUs without VNNI is common
for convolutions, and the user must hear about it.
"""

from __future__ import annotations

import time

import numpy as np


def interleaved_ms(models: dict[str, object], feed: dict[str, np.ndarray], provider: str = "cpu",
                   threads: int | None = 1, rounds: int = 5, round_seconds: float = 0.15,
                   min_runs: int = 5, warmup: int = 3) -> dict[str, float]:
    """Median latency (ms) per labelled model, timed in interleaved rounds."""
    from onnxcomp.runtime import make_session

    sessions = {label: make_session(m, provider, threads=threads) for label, m in models.items()}
    feeds = {}
    for label, session in sessions.items():
        names = {i.name for i in session.get_inputs()}
        feeds[label] = {k: v for k, v in feed.items() if k in names}
        for _ in range(warmup):
            session.run(None, feeds[label])
    medians: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - start < round_seconds:
                t0 = time.perf_counter()
                session.run(None, feeds[label])
                times.append((time.perf_counter() - t0) * 1000)
            medians[label].append(float(np.median(times)))
    return {label: float(np.median(v)) for label, v in medians.items()}


def gate(float_model, quant_model, feed: dict[str, np.ndarray], provider: str = "cpu",
         threads: int | None = 1, **timing) -> dict[str, float]:
    """{'float_ms', 'quantized_ms', 'speedup'} (speedup = float / quantized; < 1 is slower)."""
    times = interleaved_ms({"float": float_model, "quantized": quant_model}, feed, provider, threads, **timing)
    return {"float_ms": times["float"], "quantized_ms": times["quantized"],
            "speedup": times["float"] / times["quantized"] if times["quantized"] > 0 else float("inf")}
