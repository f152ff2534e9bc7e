"""A self-contained HTML report: the written file's size and ratio first, the gate and the one
verdict with its figures (as the CLI prints them), a per-pass waterfall, per-layer bits per
weight and share of weights that decode to zero (onnxcomp.layers), weight histograms before and
after, and latency per execution provider.
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
.warn{color:#8a5a00}.headline{font-size:1.25rem}
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
    if isinstance(value, bool):
        return "yes" if value else "no"
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
    # entropy coding does not change the weights in memory, only the file: its bar is the packed size
    sizes = [report.input.get("param_bytes", 0)] + [p.stats.get("packed_bytes", p.after["param_bytes"])
                                                    for p in report.passes]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(sizes)), sizes, color=["#888"] + ["#3b7dd8"] * (len(sizes) - 1))
    ax.set_xticks(range(len(sizes)), [label[:28] for label in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bytes")
    ax.set_title("weight bytes after each pass (after entropy coding: the packed file)")
    return _png(fig)


def _bit_allocation(report: Report) -> str:
    """Per-layer bits and sparsity a low-bit pass chose (gptq's `per_layer`), plotted and listed."""
    import matplotlib.pyplot as plt

    chosen = next((p for p in reversed(report.passes) if isinstance(p.stats.get("per_layer"), dict)
                   and all("bits" in v for v in p.stats["per_layer"].values())), None)
    if chosen is None or not chosen.stats["per_layer"]:
        return ""
    layers = chosen.stats["per_layer"]
    names = list(layers)
    bits = [layers[n]["bits"] for n in names]
    sparsity = [layers[n].get("sparsity", 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.18), 3))
    ax.bar(range(len(names)), bits, color="#3b7dd8", label="bits")
    ax.set_ylabel("bits per weight")
    ax.set_xticks(range(len(names)), [n[-24:] for n in names], rotation=90, fontsize=6)
    if any(sparsity):
        twin = ax.twinx()
        twin.plot(range(len(names)), sparsity, "o", color="#b00020", label="sparsity")
        twin.set_ylabel("sparsity")
        twin.set_ylim(0, 1)
    ax.set_title(f"{chosen.spec[:80]}: bits (bars) and sparsity (dots) per layer")
    measured = chosen.stats.get("measured", {})
    rows = [[n, layers[n].get("op", ""), layers[n]["bits"], layers[n].get("sparsity", 0.0), layers[n].get("form", ""),
             layers[n].get("bytes", 0), measured.get(n, {}).get(f"{layers[n]['bits']}b/{layers[n].get('sparsity', 0.0):g}",
                                                             {}).get("error", "-")] for n in names]
    return ("<h2>Bits and sparsity per layer</h2>" + _png(fig)
            + _table(["layer", "op", "bits", "sparsity", "form", "packed bytes", "measured output error"], rows))


def _layers_table(after: Model, found=None) -> str:
    """The largest 40 layers as they decode: stored form, real bits per weight, share of zeros."""
    from onnxcomp.layers import layers

    rows = []
    found = sorted(found if found is not None else layers(after), key=lambda x: -x.size)
    for layer in found[:40]:
        distinct = "-" if layer.values is None or layer.size > 2_000_000 else len(np.unique(layer.values))
        bits = f"{layer.bits:g}"
        rows.append([layer.node or layer.output, layer.op, "x".join(map(str, layer.shape)), layer.encoding, bits,
                     f"{layer.zeros:.1%}", distinct])
    if not rows:
        return "<p>No layer with constant weights.</p>"
    total = sum(layer.size for layer in found)
    rows.append([f"all {len(found)} layers", "", f"{total:,}", "",
                 f"{sum(layer.bits * layer.size for layer in found) / total:.2f}",
                 f"{sum(layer.zeros * layer.size for layer in found) / total:.1%}", ""])
    return _table(["layer", "op", "weights", "stored as", "bits per weight", "decode to zero", "distinct values"],
                  rows)


def _match(layer, candidates):
    """The layer of the input model that `layer` (of the output) came from: the same output
    tensor, else the same node name, else the only one with the same number of weights."""
    for key in ("output", "node"):
        same = [c for c in candidates if getattr(c, key) and getattr(c, key) == getattr(layer, key)]
        if len(same) == 1:
            return same[0]
    same = [c for c in candidates if c.size == layer.size]
    return same[0] if len(same) == 1 else None


def histogram_pairs(before: Model, after: Model, count: int = 4, found=None) -> list[tuple[Any, Any]]:
    """(layer of the output, the input layer it came from or None) for the `count` largest layers."""
    from onnxcomp.layers import layers

    old = [layer for layer in layers(before) if layer.values is not None]
    new = sorted((layer for layer in (found if found is not None else layers(after)) if layer.values is not None),
                 key=lambda x: -x.size)[:count]
    return [(layer, _match(layer, old)) for layer in new]


def _histograms(before: Model, after: Model, count: int = 4, found=None) -> str:
    """Before and after, on the same axes, for the largest layers: the weights each decodes to."""
    import matplotlib.pyplot as plt

    pairs = histogram_pairs(before, after, count, found)
    if not pairs:
        return "<p>No weight tensors.</p>"
    fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 2.8), squeeze=False)
    for ax, (layer, origin) in zip(axes[0], pairs):
        after_values = layer.values.ravel().astype(np.float64)
        before_values = origin.values.ravel().astype(np.float64) if origin is not None else None
        lo = min(after_values.min(), before_values.min()) if before_values is not None else after_values.min()
        hi = max(after_values.max(), before_values.max()) if before_values is not None else after_values.max()
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 81)
        if before_values is not None:
            ax.hist(before_values, bins=bins, alpha=0.55, label="before", color="#888")
        else:
            ax.text(0.5, 0.9, "no matching input layer", transform=ax.transAxes, ha="center", fontsize=7)
        ax.hist(after_values, bins=bins, alpha=0.55, label=f"after ({layer.bits:g}-bit, {layer.zeros:.0%} zero)",
                color="#3b7dd8")
        ax.set_title((layer.node or layer.output)[-30:], fontsize=8)
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


def _file_bytes(model: Model) -> int | None:
    """Bytes of the file a model was loaded from, its external data files included."""
    from onnxcomp.model import ExternalValues, _walk_constants

    if model.source_path is None or not Path(model.source_path).is_file():
        return None
    files = {Path(model.source_path).resolve()}
    files |= {c._values.path for c in _walk_constants(model.graph, set()) if isinstance(c._values, ExternalValues)}
    return sum(f.stat().st_size for f in files if f.is_file())


def _written_bytes(report: Report, after: Model, written: str | Path | None) -> tuple[str, int | None]:
    """(what, bytes) of the written result: the file itself when known, else what saving the
    model writes: packed (.onnxc) when a pass set it to pack, else the plain .onnx. Not the
    entropy pass's own figure: metadata set after it (the gate's verdict) is in the file too."""
    if written is not None and Path(written).is_file():
        return str(Path(written).name), Path(written).stat().st_size
    if report.output.get("file_bytes"):
        return "the written file", int(report.output["file_bytes"])
    from onnxcomp.model import PROTOBUF_LIMIT, serialize

    if after.summary()["param_bytes"] > PROTOBUF_LIMIT:
        return "the model", None
    packing = getattr(after, "packing", None)
    if packing:
        from onnxcomp.io.container import pack_proto

        return "the packed model (.onnxc)", len(pack_proto(after.to_proto(), packing.get("coder", "auto"))[0])
    return "the model as .onnx", len(serialize(after))


def _headline(report: Report, before: Model, after: Model, written: str | Path | None) -> str:
    what, out_bytes = _written_bytes(report, after, written)
    in_bytes = _file_bytes(before)
    if in_bytes is None:
        from onnxcomp.model import PROTOBUF_LIMIT, serialize

        in_bytes = len(serialize(before)) if before.summary()["param_bytes"] <= PROTOBUF_LIMIT else None
    if out_bytes is None:
        return "<p class=headline>written size unknown (over 2 GB)</p>"
    ratio = f" — {in_bytes / out_bytes:.1f}× smaller than the input's {in_bytes:,} bytes" if in_bytes and out_bytes else ""
    return f"<p class=headline>{html.escape(what)}: <b>{out_bytes:,} bytes</b>{ratio}</p>"


def _verdict(validation: dict[str, Any]) -> str:
    """The one verdict line, worded as the CLI prints it."""
    judged = f" ({validation['gate']})" if validation.get("gate") else ""
    summary = f" — {validation['summary']}" if validation.get("summary") else ""
    css = {True: "ok", False: "bad"}.get(validation.get("passed"), "warn")
    return (f"<p class={css}><b>{html.escape(str(validation.get('verdict', '')))}</b>{html.escape(judged)} on "
            f"{html.escape(str(validation.get('data', '')))}{html.escape(summary)}</p>")


def _outputs(validation: dict[str, Any]) -> str:
    rows = []
    verdict = str(validation.get("verdict", ""))
    for provider in validation.get("providers", []):
        if provider.get("skipped"):
            rows.append([provider["provider"], "-", "-", "-", "-", provider["skipped"]])
        for o in provider.get("outputs", []):
            agreement = "; ".join(f"{label} {o[key]:.4f}" for key, label in (("score_agreement", "score Dice"),
                                                                            ("top1", "top-1"))
                                  if o.get(key) is not None)
            rows.append([provider["provider"], o["name"], o["max_abs"], o["cosine"], agreement or "-",
                         (verdict if validation.get("passed") is not None else "figures only")
                         if o.get("passed", True) else o.get("reason") or "OUTSIDE tolerance"])
    table = _table(["provider", "output", "max abs", "cosine", "decision agreement", "verdict"], rows) if rows else ""
    return "<h2>Outputs vs the input model</h2>" + _verdict(validation) + table


def write_html(path: str | Path, report: Report, before: Model, after: Model,
               providers: list[str] | None = None, feed: dict[str, np.ndarray] | None = None,
               written: str | Path | None = None) -> Path:
    """Render the report page and write it atomically. `written`: the file the result was saved
    to, whose size heads the page (else the packed size the entropy pass measured, or the
    model's size as .onnx)."""
    import matplotlib

    matplotlib.use("Agg")
    from onnxcomp.files import atomic_write_text
    from onnxcomp.layers import layers
    from onnxcomp.validate import generate_inputs

    feed = feed or generate_inputs(before, 1)[0]
    found = layers(after)
    parts = [f"<h1>onnxcomp report</h1>{_headline(report, before, after, written)}"
             f"<p><code>{html.escape(report.pipeline)}</code></p>"]
    size_in, size_out = report.input.get("param_bytes", 0), report.output.get("param_bytes", 0)
    parts.append(f"<p>weights in memory {size_in:,} → {size_out:,} bytes; "
                 f"nodes {report.input.get('nodes', 0):,} → {report.output.get('nodes', 0):,}; {report.seconds:.2f} s</p>")
    if report.gate:
        ok = report.gate.get("passed")
        parts.append(f"<h2>Gate</h2><p class=\"{'ok' if ok else 'bad'}\">{html.escape(report.gate['gate'])}: "
                     f"{'PASSED' if ok else 'FAILED'}</p>")
        parts.append(_table(["attempt", "pipeline", "passed", "culprit", "action"],
                            [[s.get("attempt"), s.get("pipeline"), s.get("passed"), s.get("culprit", ""),
                              s.get("action", "")] for s in report.gate.get("path", [])]))
    if report.validation:
        parts.append(_outputs(report.validation))
    parts.append("<h2>Passes</h2>" + _waterfall(report))
    parts.append(_table(["pass", "status", "nodes", "param bytes", "seconds", "stats"],
                        [[p.spec, p.status, p.after["nodes"], p.after["param_bytes"], p.seconds,
                          ", ".join(f"{k}={_fmt(v)}" for k, v in p.stats.items() if not isinstance(v, (dict, list)))]
                         for p in report.passes]))
    for note in report.notes:
        parts.append(f"<p class=note>{html.escape(note)}</p>")
    parts.append(_bit_allocation(report))
    parts.append("<h2>Latency</h2>" + _latency(before, after, providers or ["cpu"], feed))
    parts.append("<h2>Layers (largest 40), as their weights decode</h2>" + _layers_table(after, found))
    parts.append("<h2>Weight histograms, largest layers: before and after</h2>" + _histograms(before, after, found=found))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>onnxcomp report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(Path(path), page)
