"""Quantization: onnxcomp's quantize / quantize_dynamic / codebook vs onnxruntime.quantization.

For each model (digits CNN, Ultraface, MiniLM), in one run, with the same calibration feeds:
file size, CPU EP latency (1 thread and ORT's default, interleaved), task accuracy, time taken
to quantize, and the failure message of any variant that fails.
"""

from __future__ import annotations

import contextlib
import os

import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import interleaved_latency_ms, md_table, write_results

MODELS = ("digits_cnn", "ultraface", "minilm")


def _ours(spec: str):
    def make(entry, cal, ev):
        import onnxcomp

        result = onnxcomp.optimize(entry.path, spec, calibration=cal, evaluation=ev, check=False, gate=False)
        stats = {k: v for r in result.report.passes for k, v in r.stats.items()
                 if k in ("kept_float", "error", "speedup", "slower_than_float", "opset_upgraded_from")}
        if "kept_float" in stats:
            stats["kept_float"] = len(stats["kept_float"])
        if "error" in stats:
            stats["fallback_error"] = stats.pop("error")
        return result.model.to_proto(), stats
    return make


@contextlib.contextmanager
def _in_folder(folder):
    """ORT's quantizer writes temporary files (sym_shape_infer_temp.onnx, <uuid>.data) into the
    current folder: run it inside a temporary one so nothing lands in the repository."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


class _Reader:
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _ort_static(per_channel: bool, method: str = "MinMax"):
    def make(entry, cal, ev):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with tempfile.TemporaryDirectory() as tmp, _in_folder(tmp):
            pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
            try:
                quant_pre_process(str(entry.path), str(pre))
            except Exception:
                quant_pre_process(str(entry.path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), _Reader(cal), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method))
            return onnx.load(str(out)), {}
    return make


def _ort_dynamic(entry, cal, ev):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _in_folder(tmp):
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(str(entry.path), str(out), per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(str(out)), {}


def variants(name: str, quick: bool) -> dict:
    v = {
        "ours quantize per-tensor": _ours("quantize(latency_check=false)"),
        "ours quantize per-channel": _ours("quantize(per_channel=true, latency_check=false)"),
        "ort quantize_static QDQ per-tensor": _ort_static(False),
        "ort quantize_static QDQ per-channel": _ort_static(True),
        "ours quantize_dynamic": _ours("quantize_dynamic"),
        "ort quantize_dynamic per-channel": _ort_dynamic,
    }
    if name == "minilm":
        v["ours quantize per-channel + fallback(max_error=0.005)"] = _ours(
            "quantize(per_channel=true, max_error=0.005, latency_check=false)")
        for cal in ("percentile", "entropy", "mse"):
            v[f"ours quantize per-channel {cal}"] = _ours(f"quantize(per_channel=true, calibrator={cal}, latency_check=false)")
        v["ort quantize_static QDQ per-channel Entropy"] = _ort_static(True, "Entropy")
        v["ort quantize_static QDQ per-channel Percentile"] = _ort_static(True, "Percentile")
        v["ours quantize_dynamic weight_only int4"] = _ours("quantize_dynamic(mode=weight_only, bits=4)")
    if not quick:
        for bits in (4, 5, 6):
            v[f"ours codebook(bits={bits})"] = _ours(f"codebook(bits={bits})")
    return v


def spearman_pairwise(entry, proto, ref_embeddings) -> float:
    from scipy.stats import spearmanr

    emb = _embeddings(entry, proto)
    iu = np.triu_indices(len(emb), 1)
    return float(spearmanr(_pairwise(ref_embeddings)[iu], _pairwise(emb)[iu]).statistic)


def _embeddings(entry, proto) -> np.ndarray:
    from models.zoo import run_all

    out = []
    for feed, result in zip(entry.evaluation(), run_all(proto, entry.evaluation())):
        hidden = next(iter(result.values()))
        mask = feed["attention_mask"][..., None].astype(np.float32)
        out.append(((hidden * mask).sum(1) / mask.sum(1))[0])
    return np.array(out)


def _pairwise(e: np.ndarray) -> np.ndarray:
    n = e / np.linalg.norm(e, axis=1, keepdims=True)
    return n @ n.T


def bench_model(name: str, quick: bool) -> dict:
    from models import zoo

    entry = zoo.get(name)
    ok, why = entry.available()
    if not ok:
        return {"skipped": why}
    cal = entry.calibration(16 if name != "digits_cnn" else 128)
    ev = entry.evaluation()
    fp32 = onnx.load(str(entry.path))
    rows = {"fp32": {"status": "ok", "bytes": fp32.ByteSize(), "quantize_s": 0.0, **entry.evaluate(fp32)}}
    protos = {"fp32": fp32}
    ref_emb = _embeddings(entry, fp32) if name == "minilm" else None
    for label, make in variants(name, quick).items():
        t0 = time.perf_counter()
        try:
            proto, extra = make(entry, cal, ev)
            seconds = time.perf_counter() - t0
            metrics = entry.evaluate(proto)
            if ref_emb is not None:
                metrics["spearman_pairwise"] = spearman_pairwise(entry, proto, ref_emb)
            rows[label] = {"status": "ok", "bytes": proto.ByteSize(), "quantize_s": seconds, **metrics, **extra}
            protos[label] = proto
        except Exception as exc:  # record the failure of either tool with its message
            rows[label] = {"status": "FAIL", "quantize_s": time.perf_counter() - t0,
                           "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            if not str(exc):
                rows[label]["error"] += " " + traceback.format_exc(limit=1)[-200:]
            continue
        try:  # a model that quantizes but does not load is a failure too
            from onnxcomp.runtime import make_session

            make_session(proto)
        except Exception as exc:
            rows[label].update(status="FAIL (load)", error=" ".join(str(exc).split())[:300])
            protos.pop(label)
    feed = entry.latency_feed()
    timing = dict(rounds=3 if quick else 5, round_seconds=0.15 if quick else 0.3)
    for threads, key in ((1, "ms_1t"), (None, "ms_default")):
        times = interleaved_latency_ms(protos, feed, threads=threads, **timing)
        for label, ms in times.items():
            rows[label][key] = ms
            rows[label][key.replace("ms", "x_vs_fp32")] = times["fp32"] / ms
    for a, b in (("ours quantize per-tensor", "ort quantize_static QDQ per-tensor"),
                 ("ours quantize per-channel", "ort quantize_static QDQ per-channel"),
                 ("ours quantize_dynamic", "ort quantize_dynamic per-channel")):
        if "ms_1t" in rows.get(a, {}) and "ms_1t" in rows.get(b, {}):
            rows[a]["latency_ratio_vs_ort_1t"] = rows[a]["ms_1t"] / rows[b]["ms_1t"]
    return {"latency_feed": {k: list(v.shape) for k, v in feed.items()}, "variants": rows}


ACCURACY = {"digits_cnn": ["test_acc"], "ultraface": ["cos_min", "cos_mean", "max_abs_scores", "max_abs_boxes"],
            "minilm": ["cos_mean", "cos_min", "spearman_pairwise"]}


def main(quick: bool, argv: list) -> int:
    names = [a for a in argv if a in MODELS] or list(MODELS)
    data, parts = {}, []
    for name in names:
        print(f"quantization: {name} ...", flush=True)
        data[name] = result = bench_model(name, quick)
        if "skipped" in result:
            parts.append(f"## {name}\n\nskipped: {result['skipped']}\n")
            continue
        metrics = ACCURACY[name]
        headers = ["variant", "status", "bytes", "quantize s", "ms 1T", "x fp32 1T", "ms default", "x fp32 default",
                   "vs ORT 1T", *metrics, "notes"]
        table = []
        for label, r in result["variants"].items():
            notes = r.get("error", "")
            if "kept_float" in r:
                notes += f"kept {r['kept_float']} nodes float (error {r.get('fallback_error', 0):.4g})"
            if "opset_upgraded_from" in r:
                notes += f" upgraded from opset {r['opset_upgraded_from']}"
            table.append([label, r["status"], r.get("bytes", "-"), r.get("quantize_s", "-"), r.get("ms_1t", "-"),
                          r.get("x_vs_fp32_1t", "-"), r.get("ms_default", "-"), r.get("x_vs_fp32_default", "-"),
                          r.get("latency_ratio_vs_ort_1t", "-"), *[r.get(m, "-") for m in metrics], notes.strip()])
        parts.append(f"## {name}\n\nlatency input {result['latency_feed']}\n\n" + md_table(headers, table) + "\n")
    intro = ("# Quantization: onnxcomp vs onnxruntime.quantization\n\nSame calibration feeds for both tools; "
             "latency interleaved in one run (median of round medians), CPU EP. `x fp32` > 1 is faster than fp32; "
             "`vs ORT 1T` < 1 means ours is faster than ORT's quantizer output of the same kind.\n\n")
    write_results("quantization", {"quick": quick, "models": data}, intro + "\n".join(parts))
    return 0
