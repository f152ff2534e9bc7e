"""Shared benchmark helpers: interleaved latency timing and result files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version()}


def interleaved_latency_ms(models: dict[str, Any], feed: dict[str, np.ndarray], threads: int | None = 1,
                           rounds: int = 5, min_runs: int = 10, round_seconds: float = 0.3,
                           warmup: int = 10, provider: str = "cpu") -> dict[str, float]:
    """Median latency (ms) per model, timed in interleaved rounds so drift hits all alike.

    `models`: label -> Model / ModelProto / bytes / path. Value = median of the round medians.
    `threads=None` uses ORT's default thread count.
    """
    from onnxcomp.runtime import make_session

    sessions = {label: make_session(m, provider, threads=threads) for label, m in models.items()}
    feeds = {}
    for label, session in sessions.items():
        names = {i.name for i in session.get_inputs()}
        feeds[label] = {k: v for k, v in feed.items() if k in names}
        for _ in range(warmup):
            session.run(None, feeds[label])
    medians: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no model is always timed first in a round
        for label in order:
            session = sessions[label]
            times = []
            start = time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - start < round_seconds:
                t0 = time.perf_counter()
                session.run(None, feeds[label])
                times.append((time.perf_counter() - t0) * 1000)
            medians[label].append(float(np.median(times)))
    return {label: float(np.median(values)) for label, values in medians.items()}


def write_results(suite: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write results/SUITE.json (with the machine description) and results/SUITE.md."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"suite": suite, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **data}
    json_path, md_path = RESULTS / f"{suite}.json", RESULTS / f"{suite}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    m = payload["machine"]
    header = f"<!-- made by `python -m benchmarks.run {suite}` on {payload['date']}; {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} -->\n"
    md_path.write_text(header + markdown.rstrip() + "\n")
    return json_path, md_path


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
