"""Pruning: quality after unstructured pruning, and speed after structured channel pruning.

Part 1, per model (digits CNN: test accuracy; MiniLM: sentence-embedding cosine vs fp32;
Ultraface: face-probability cosine vs fp32, as in the anchors) and sparsity 0.5 / 0.7 / 0.9, no fine-tuning:
  baseline      the plain anchor: zero the smallest |w| of every Conv/Gemm/MatMul weight,
                written here with numpy on the protobuf (no onnxcomp code)
  magnitude     prune(sparsity=s)                      one threshold per tensor
  global        prune(sparsity=s, scope=global)        one ranking for the model, per-layer cap
  hessian       prune(sparsity=s, saliency=hessian)    SparseGPT: OBS choice + weight update
  hessian_global prune(sparsity=s, scope=global, saliency=hessian)   OBS-cost ranking across layers
  auto          prune(sparsity=s, scope=auto)          per-layer sparsities from measured sensitivity
Part 2: prune_channels at 25 % / 50 % on the digits CNN and resnet18 (224x224): FLOPs,
parameters, quality, and CPU EP latency ratio (dense / pruned) in one interleaved run, with
one thread and with ORT's default threads.

`--quick`: fewer models/sparsities (a smoke run of a minute or two).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

import onnxcomp
from benchmarks.common import RESULTS, interleaved_latency_ms, md_table, write_results
from onnxcomp.context import PassContext
from onnxcomp.pipeline import Pipeline

METRIC = {"digits_cnn": "test_acc", "minilm": "cos_mean", "ultraface": "face_prob_cos", "resnet18": "cos_mean"}
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def baseline(path: Path, sparsity: float) -> onnx.ModelProto:
    """The anchor: per-tensor magnitude pruning of every weight initializer (slot 1 of the ops)."""
    proto = onnx.load(str(path))
    weights = {n.input[1] for n in proto.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1}
    for init in proto.graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.FLOAT:
            w = onnx.numpy_helper.to_array(init).copy()
            k = round(sparsity * w.size)
            if k:
                flat = w.ravel()
                flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
                init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    return proto


def measured_sparsity(proto: onnx.ModelProto, names: set[str] | None = None) -> float:
    """Zero fraction over the weights of the ops (or over the named initializers), from the file."""
    weights = names or {n.input[1] for n in proto.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1}
    zeros = total = 0
    for init in proto.graph.initializer:
        if init.name in weights:
            w = onnx.numpy_helper.to_array(init)
            zeros += int(np.sum(w == 0))
            total += w.size
    return zeros / total if total else 0.0


def run_spec(path: Path, spec: str, calibration, ctx: PassContext | None = None):
    """(model proto, pass stats, seconds) for one spec; `ctx` lets runs share cached analyses."""
    t0 = time.perf_counter()
    if ctx is None:
        result = onnxcomp.optimize(path, spec, calibration=calibration, check=False, gate=False)
        model, stats = result.model, result.report.passes[-1].stats
    else:
        out = Pipeline.parse(spec).run(onnxcomp.load(path), ctx)
        model, stats = out.model, out.report.passes[-1].stats
    return model.to_proto(), stats, time.perf_counter() - t0


def quality_rows(quick: bool) -> list[dict]:
    from models import zoo

    plan = {"digits_cnn": (0.5, 0.7, 0.9), "minilm": (0.5, 0.7, 0.9), "ultraface": (0.5, 0.7, 0.9)}
    if quick:
        plan = {"digits_cnn": (0.5, 0.7, 0.9), "minilm": (0.7,)}
    rows = []
    for name, sparsities in plan.items():
        entry = zoo.get(name)
        ok, reason = entry.available()
        if not ok:
            print(f"skip {name}: {reason}")
            continue
        metric = METRIC[name]
        calibration = entry.calibration(128 if name == "digits_cnn" else None)
        dense = entry.evaluate(entry.path)[metric]
        rows.append({"model": name, "method": "dense", "sparsity": 0.0, "measured": 0.0, "metric": metric, "value": dense, "seconds": 0.0})
        # one context for scope=auto: the sensitivity table is measured once per model
        auto_ctx = PassContext(calibration=onnxcomp.CalibrationData(calibration, name))
        for s in sparsities:
            t0 = time.perf_counter()
            proto = baseline(entry.path, s)
            rows.append({"model": name, "method": "baseline", "sparsity": s, "measured": measured_sparsity(proto), "metric": metric,
                             "value": entry.evaluate(proto)[metric], "seconds": time.perf_counter() - t0})
            methods = {"magnitude": f"prune(sparsity={s})", "global": f"prune(sparsity={s}, scope=global)",
                       "hessian": f"prune(sparsity={s}, saliency=hessian)", "auto": f"prune(sparsity={s}, scope=auto)",
                       "hessian_global": f"prune(sparsity={s}, scope=global, saliency=hessian)"}
            if name == "minilm":  # keep the run short: one capture pass instead of one per stage
                methods["hessian_global"] = f"prune(sparsity={s}, scope=global, saliency=hessian, sequential=false)"
                if quick:
                    methods["hessian"] = f"prune(sparsity={s}, saliency=hessian, sequential=false)"
            for method, spec in methods.items():
                ctx = auto_ctx if method == "auto" else None
                if ctx is not None:
                    ctx._cache = {k: v for k, v in ctx._cache.items() if k.startswith("sensitivity:")}
                proto, stats, seconds = run_spec(entry.path, spec, calibration, ctx)
                measured = measured_sparsity(proto, set(stats["per_tensor"]))
                if abs(measured - stats["sparsity"]) > 1e-12:
                    raise AssertionError(f"{spec}: reported sparsity {stats['sparsity']} but measured {measured}")
                row = {"model": name, "method": method, "sparsity": s, "reported": stats["sparsity"], "measured": measured,
                           "metric": metric,
                           "value": entry.evaluate(proto)[metric], "seconds": seconds, "spec": spec}
                rows.append(row)
                print(f"{name:10s} {method:9s} {s:.1f}  {metric}={row['value']:.4f}  ({seconds:.1f}s)", flush=True)
    return rows


def channel_rows(quick: bool) -> list[dict]:
    from models import zoo

    rows = []
    cases = [("digits_cnn", {}), ("resnet18", {"image_size": 224})]
    for name, options in cases:
        entry = zoo.get(name, **options)
        metric = "test_acc" if name == "digits_cnn" else "cos_mean"
        calibration = entry.calibration(64 if name == "digits_cnn" else None)
        specs = {"25% l1": "prune_channels(sparsity=0.25)", "50% l1": "prune_channels(sparsity=0.5)"}
        if name == "digits_cnn" or not quick:
            specs["50% hessian"] = "prune_channels(sparsity=0.5, criterion=hessian)"
        models = {"dense": onnx.load(str(entry.path))}
        info = {}
        for label, spec in specs.items():
            proto, stats, seconds = run_spec(entry.path, spec, calibration)
            models[label] = proto
            convs = [tuple(init.dims) for init in proto.graph.initializer
                     if init.name in {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}]
            info[label] = {"stats": stats, "seconds": seconds, "value": entry.evaluate(proto)[metric],
                               "conv_out_channels": int(sum(c[0] for c in convs))}
        dense_convs = int(sum(init.dims[0] for init in models["dense"].graph.initializer
                              if init.name in {n.input[1] for n in models["dense"].graph.node if n.op_type == "Conv"}))
        feed = entry.latency_feed()
        latency = {t: interleaved_latency_ms(models, feed, threads=t, rounds=3 if quick else 5)
                   for t in (1, None)}
        for label, spec in specs.items():
            st = info[label]["stats"]
            rows.append({"model": name, "spec": spec, "label": label, "metric": metric, "value": info[label]["value"],
                             "dense_value": entry.evaluate(entry.path)[metric],
                             "flops_before": st["flops_before"], "flops_after": st["flops_after"],
                             "params_before": st["params_before"], "params_after": st["params_after"],
                             "conv_channels_before": dense_convs, "conv_channels_after": info[label]["conv_out_channels"],
                             "speedup_1thread": latency[1]["dense"] / latency[1][label],
                             "speedup_default": latency[None]["dense"] / latency[None][label],
                             "ms_dense_1thread": latency[1]["dense"], "ms_pruned_1thread": latency[1][label],
                             "seconds": info[label]["seconds"]})
            print(f"{name:10s} {label:12s} {metric}={rows[-1]['value']:.4f} speedup x{rows[-1]['speedup_1thread']:.2f} "
                  f"(1 thread) x{rows[-1]['speedup_default']:.2f} (default)", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        dense = next(r["value"] for r in rows if r["model"] == name and r["method"] == "dense")
        for method, style in (("baseline", "k--"), ("magnitude", "C0-o"), ("global", "C1-s"),
                              ("hessian", "C2-^"), ("hessian_global", "C4-v"), ("auto", "C3-d")):
            pts = [(r["sparsity"], r["value"]) for r in rows if r["model"] == name and r["method"] == method]
            if pts:
                ax.plot([0.0] + [p[0] for p in pts], [dense] + [p[1] for p in pts], style, label=method)
        ax.set_title(name)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(next(r["metric"] for r in rows if r["model"] == name))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run pruning")
    parser.add_argument("--skip-channels", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv or [])
    started = time.perf_counter()
    quality = [] if args.skip_quality else quality_rows(quick)
    channels = [] if args.skip_channels else channel_rows(quick)
    RESULTS.mkdir(exist_ok=True)
    plotted = bool(quality) and plot(quality, RESULTS / "pruning.png")
    md = ["# Pruning (no fine-tuning)", ""]
    if quality:
        md += ["## Quality after unstructured pruning", "",
               ("baseline = per-tensor magnitude written with numpy (the anchor); magnitude/global/hessian/auto = "
               "`prune(...)` (specs in pruning.json). Metric: digits test accuracy, MiniLM sentence-embedding "
               "cosine vs fp32, Ultraface face-probability cosine vs fp32 (as in the anchors)."), ""]
        header = ["model", "sparsity", "dense", "baseline", "magnitude", "global", "hessian", "hessian_global", "auto"]
        table = []
        for name in dict.fromkeys(r["model"] for r in quality):
            dense = next(r["value"] for r in quality if r["model"] == name and r["method"] == "dense")
            for s in sorted({r["sparsity"] for r in quality if r["model"] == name and r["sparsity"] > 0}):
                cell = {r["method"]: r["value"] for r in quality if r["model"] == name and r["sparsity"] == s}
                table.append([name, s, dense] + [cell.get(m, "") for m in header[3:]])
        md += [md_table(header, table), ""]
        if plotted:
            md += ["![accuracy against sparsity](pruning.png)", ""]
    if channels:
        md += ["## prune_channels: structured pruning, CPU EP", "",
               "speedup = dense latency / pruned latency, interleaved in one run (median of round medians).", ""]
        header = ["model", "pruning", "quality", "dense quality", "conv channels", "GFLOPs", "params",
                  "speedup 1 thread", "speedup default threads"]
        table = [[r["model"], r["label"], r["value"], r["dense_value"],
                  f"{r['conv_channels_before']} -> {r['conv_channels_after']}",
                  f"{r['flops_before'] / 1e9:.3g} -> {r['flops_after'] / 1e9:.3g}",
                  f"{r['params_before']:,.0f} -> {r['params_after']:,.0f}",
                  r["speedup_1thread"], r["speedup_default"]] for r in channels]
        md += [md_table(header, table), ""]
    md += [f"Total benchmark time {time.perf_counter() - started:.0f} s{' (--quick)' if quick else ''}."]
    write_results("pruning", {"quick": quick, "quality": quality, "channels": channels}, "\n".join(md))
    print("\n".join(md))
    return 0
