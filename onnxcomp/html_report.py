"""A self-contained HTML report: per-pass waterfall, per-layer sparsity and bit widths, weight
histograms before/after, per-output error, latency per execution provider, and the gate verdict.
Plots are drawn with matplotlib and embedded as base64 PNGs, so the page is one file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.model import Model
from onnxcomp.report import Report

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ok{color:#0a7d20}.bad{color:#b00020}
.note{background:#fff8e1;padding:6px 10px;border-left:4px solid #f0b400}img{max-width:100%}
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _waterfall(report: Report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["input"] + [p.spec for p in report.passes]
    sizes = [report.input.get("param_bytes", 0)] + [p.after["param_bytes"] for p in report.passes]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(sizes)), sizes, color=["#888"] + ["#3b7dd8"] * (len(sizes) - 1))
    ax.set_xticks(range(len(sizes)), [label[:28] for label in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("parameter bytes")
    ax.set_title("parameter bytes after each pass")
    return _png(fig)


def _weights(model: Model) -> dict[str, np.ndarray]:
    """Float or integer weight tensors of the model that have at least 2 dims, by name."""
    out = {}
    for name, const in model.initializers().items():
        values = const.values
        if values.ndim >= 2 and values.size >= 16 and np.issubdtype(values.dtype, np.number):
            out[name] = values
    return out


def _layers_table(model: Model) -> str:
    rows = []
    for name, values in sorted(_weights(model).items(), key=lambda kv: -kv[1].size)[:40]:
        sparsity = float(np.mean(values == 0))
        bits = values.dtype.itemsize * 8
        distinct = len(np.unique(values)) if values.size <= 2_000_000 else -1
        rows.append([name, "x".join(map(str, values.shape)), str(values.dtype), bits, f"{sparsity:.1%}", distinct])
    return _table(["weight", "shape", "dtype", "bits", "sparsity", "distinct values"], rows)


def _histograms(before: Model, after: Model, count: int = 4) -> str:
    import matplotlib.pyplot as plt

    old, new = _weights(before), _weights(after)
    largest = sorted(old, key=lambda n: -old[n].size)[:count]
    if not largest:
        return "<p>No weight tensors.</p>"
    fig, axes = plt.subplots(1, len(largest), figsize=(4 * len(largest), 2.8), squeeze=False)
    for ax, name in zip(axes[0], largest):
        ax.hist(old[name].ravel().astype(np.float64), bins=80, alpha=0.6, label="before")
        if name in new:
            ax.hist(new[name].ravel().astype(np.float64), bins=80, alpha=0.6, label="after")
        else:
            ax.text(0.5, 0.9, "replaced (e.g. quantized)", transform=ax.transAxes, ha="center", fontsize=7)
        ax.set_title(name[-30:], fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _png(fig)


def _latency(before: Model, after: Model, providers: list[str], feed: dict[str, np.ndarray]) -> str:
    """Median latency of both models per provider, timed in interleaved rounds."""
    from onnxcomp.runtime import CannotRun, RuntimeUnavailable, interleaved_latency_ms

    rows = []
    for provider in providers:
        try:
            times = interleaved_latency_ms({"input": before, "output": after}, feed, threads=1, rounds=5,
                                           min_runs=5, round_seconds=0.05, warmup=3, provider=provider)
        except (RuntimeUnavailable, CannotRun) as exc:
            rows.append([provider, "-", "-", f"not run: {exc}"])
            continue
        a, b = times["input"], times["output"]
        rows.append([provider, a, b, f"{a / b:.2f}x {'faster' if b < a else 'slower'}"])
    return _table(["provider", "input ms (1 thread)", "output ms", "output vs input"], rows)


def write_html(path: str | Path, report: Report, before: Model, after: Model,
               providers: list[str] | None = None, feed: dict[str, np.ndarray] | None = None) -> Path:
    """Render the report page and write it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from onnxcomp.files import atomic_write_text
    from onnxcomp.validate import generate_inputs

    feed = feed or generate_inputs(before, 1)[0]
    parts = [f"<h1>onnxcomp report</h1><p><code>{html.escape(report.pipeline)}</code></p>"]
    size_in, size_out = report.input.get("param_bytes", 0), report.output.get("param_bytes", 0)
    ratio = size_in / size_out if size_out else float("inf")
    parts.append(f"<p>parameter bytes {size_in:,} → {size_out:,} ({ratio:.2f}× smaller); "
                 f"nodes {report.input.get('nodes', 0):,} → {report.output.get('nodes', 0):,}; {report.seconds:.2f} s</p>")
    if report.gate:
        ok = report.gate.get("passed")
        parts.append(f"<h2>Gate</h2><p class=\"{'ok' if ok else 'bad'}\">{html.escape(report.gate['gate'])}: "
                     f"{'PASSED' if ok else 'FAILED'}</p>")
        parts.append(_table(["attempt", "pipeline", "passed", "culprit", "action"],
                            [[s.get("attempt"), s.get("pipeline"), s.get("passed"), s.get("culprit", ""),
                              s.get("action", "")] for s in report.gate.get("path", [])]))
    parts.append("<h2>Passes</h2>" + _waterfall(report))
    parts.append(_table(["pass", "status", "nodes", "param bytes", "seconds", "stats"],
                        [[p.spec, p.status, p.after["nodes"], p.after["param_bytes"], p.seconds,
                          ", ".join(f"{k}={_fmt(v)}" for k, v in p.stats.items() if not isinstance(v, (dict, list)))]
                         for p in report.passes]))
    for note in report.notes:
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    if report.validation:
        parts.append("<h2>Outputs vs the input model</h2>")
        rows = []
        for provider in report.validation.get("providers", []):
            if provider.get("skipped"):
                rows.append([provider["provider"], "-", "-", "-", "-", provider["skipped"]])
            for o in provider.get("outputs", []):
                rows.append([provider["provider"], o["name"], o["max_abs"], o["cosine"],
                             "-" if o["top1"] is None else o["top1"], "ok" if o["passed"] else o["reason"]])
        parts.append(_table(["provider", "output", "max abs", "cosine", "top-1", "verdict"], rows))
    parts.append("<h2>Latency</h2>" + _latency(before, after, providers or ["cpu"], feed))
    parts.append("<h2>Layers (largest 40)</h2>" + _layers_table(after))
    parts.append("<h2>Weight histograms, largest layers</h2>" + _histograms(before, after))
    page = f"<!doctype html><html><head><meta charset=utf-8><title>onnxcomp report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    return atomic_write_text(Path(path), page)
