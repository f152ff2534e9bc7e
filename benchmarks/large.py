"""Large models (issue 19): a Llama-shaped decoder, up to 30 GB on this 24 GB machine, through
`fold, cleanup`, `prune`, 4-bit weight-only quantization, `pack`, `unpack` and an ORT forward pass,
with each step's peak resident memory.

    python -m benchmarks.run large [--size 30G] [--quick] [--workdir DIR] [--keep]

The model comes from models/decoder.py (random float32 weights written one tensor at a time;
default --size 4G, --quick 300M). Every step runs in its own Python process, which reports its
wall time and its peak resident set (VmHWM from /proc/self/status: every page the process ever
had resident, including pages of memory-mapped weight files). Steps, each on an earlier output:

    fold, cleanup        original  -> folded     (lossless)
    prune                folded    -> pruned     (sparsity 0.5 per tensor; the float weights rewritten)
    quantize 4-bit       folded    -> q4         (quantize_dynamic weight_only bits=4: MatMulNBits)
    pack                 q4        -> q4.onnxc   (default coder)
    unpack               q4.onnxc  -> unpacked   (external data)
    forward              unpacked: an ORT session and one token
    forward from packed  q4.onnxc: container.session (no unpacked file) and one token

Checks, each in its own process after its step:
- fold: every weight is bit-identical (SHA-256) and, where ORT can hold the float model (ORT copies
  external weights into its own memory: at most a quarter of this machine's RAM), ORT's logits of
  a 3-token input are bit-identical;
- prune: every MatMul weight at the asked sparsity;
- quantize: the 4-bit model's ORT logits for one token against models/decoder.py's float64 numpy
  reference computed from the folded model (cosine at least QUANT_MIN_COSINE; top token reported). This also checks fold's graph
  on models too large for ORT in float;
- unpack: every tensor bit-identical to q4's (SHA-256) and ORT's logits bit-identical to q4's;
- forward / forward from packed: logits bit-identical to q4's.
Files no later step needs are deleted as soon as they are checked (30G needs ~61 GB of disk at
most: the original and the folded copy). prune needs twice the model free beside its input (its
spill file, then its output) and is skipped, with the reason, where the disk lacks it. The work folder is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRUNE_SPARSITY = 0.5
QUANT_MIN_COSINE = 0.99
TOKEN = 17  # the one-token input of the forward passes
PROMPT = [17, 5, 9]  # the 3-token input of the lossless check
ORT_FLOAT_MAX = 0.25  # share of RAM up to which the float model is also run in ORT
QUANTIZE = "quantize_dynamic(mode=weight_only, bits=4)"
STEPS = [  # (label, kind, spec, input, output)
    ("fold, cleanup", "pass", "fold, cleanup", "original.onnx", "folded.onnx"),
    ("prune", "pass", f"prune(sparsity={PRUNE_SPARSITY})", "folded.onnx", "pruned.onnx"),
    ("quantize 4-bit", "pass", QUANTIZE, "folded.onnx", "q4.onnx"),
    ("pack", "pack", "auto", "q4.onnx", "q4.onnxc"),
    ("unpack", "unpack", "", "q4.onnxc", "unpacked.onnx"),
    ("forward (ORT, 1 token)", "forward", "", "unpacked.onnx", "forward.npy"),
    ("forward from packed", "forward_packed", "", "q4.onnxc", "forward_packed.npy"),
]


# ---- what one step does (in the process that measures it) -----------------------------
def run_step(kind: str, spec: str, src: Path, dst: Path) -> dict:
    """Run one step on `src`, writing `dst`; returns its stats."""
    from onnxcomp.io import container

    if kind == "pack":
        stats = container.pack(src, dst, coder=spec)
        return {k: stats[k] for k in ("packed_bytes", "tensor_bytes", "tensors", "encode_seconds")}
    if kind == "unpack":
        container.unpack(src, dst, external_data=True)
        return {}
    if kind in ("forward", "forward_packed"):
        t0 = time.perf_counter()
        session = container.session(src) if kind == "forward_packed" else ort_session(src)
        ready = time.perf_counter() - t0
        logits = session.run(None, {"input_ids": np.array([[TOKEN]], np.int64)})[0]
        np.save(dst, logits)
        return {"session_seconds": round(ready, 3), "run_seconds": round(time.perf_counter() - t0 - ready, 3)}
    from onnxcomp.context import PassContext
    from onnxcomp.model import load, save
    from onnxcomp.pipeline import Pipeline

    model = load(src)
    result = Pipeline.parse(spec).run(model, PassContext())
    save(result.model, dst, external_data=True)
    return {p.spec: {"status": p.status, "seconds": p.seconds,
                     **{k: v for k, v in p.stats.items() if k != "per_tensor"}} for p in result.report.passes}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(argv: list[str]) -> int:
    """`--child KIND SPEC SRC DST` (or `--child baseline`): run one step, print one JSON line."""
    t0 = time.perf_counter()
    if argv[0] == "baseline":  # what importing onnxcomp and onnxruntime alone costs
        import onnxruntime  # noqa: F401

        import onnxcomp.pipeline  # noqa: F401
        stats: dict = {}
    else:
        stats = run_step(argv[0], argv[1], Path(argv[2]), Path(argv[3]))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "stats": stats},
                     default=str))
    return 0


def _python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.large", *map(str, args)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], check=False)


def measure(args: list) -> dict:
    """Run `--child args` in a fresh Python process; returns its JSON report."""
    done = _python(["--child", *args])
    if done.returncode:
        raise RuntimeError(f"step {args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- checks ------------------------------------------------------------------------------
def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, tokens: list[int]) -> np.ndarray:
    return ort_session(path).run(None, {"input_ids": np.array([tokens], np.int64)})[0]


def tensor_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every initializer's bytes, one tensor at a time (external data mapped)."""
    from onnxcomp.model import load, peek_values

    out = {}
    for name, const in load(path).initializers().items():
        values = np.ascontiguousarray(peek_values(const))
        out[name] = hashlib.sha256(values.reshape(-1).view(np.uint8)).hexdigest()
        del values
    return out


def check_fold(original: Path, folded: Path, run_float: bool) -> dict:
    a, b = tensor_hashes(original), tensor_hashes(folded)
    weights = [name for name in a if name in b and ("." in name or name in ("embed", "lm_head"))]
    result = {"weights_identical": sum(a[n] == b[n] for n in weights), "weights": len(weights)}
    ok = result["weights_identical"] == len(weights) > 0
    if run_float:
        x, y = ort_logits(original, PROMPT), ort_logits(folded, PROMPT)
        result["logits_max_abs"] = float(np.max(np.abs(x - y)))
        ok &= bool(np.array_equal(x, y))
    return {"ok": ok, **result}


def check_prune(pruned: Path, sparsity: float = PRUNE_SPARSITY) -> dict:
    """Zero fraction of every MatMul weight of the pruned file (read one at a time)."""
    import onnx_graphsurgeon as gs

    from onnxcomp.model import load, peek_values

    model = load(pruned)
    per_tensor = {}
    for node in model.graph.nodes:
        if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant):
            values = peek_values(node.inputs[1])
            per_tensor[node.inputs[1].name] = 1 - np.count_nonzero(values) / values.size
            del values
    worst = max(abs(s - sparsity) for s in per_tensor.values())
    return {"ok": bool(per_tensor) and bool(worst <= 1e-6), "tensors": len(per_tensor),
            "sparsity_min": float(min(per_tensor.values())), "sparsity_max": float(max(per_tensor.values()))}


def check_quantized(folded: Path, quantized: Path, logits_out: Path, min_cosine: float = QUANT_MIN_COSINE) -> dict:
    from models.decoder import reference_logits

    got = ort_logits(quantized, [TOKEN])
    np.save(logits_out, got)
    a = reference_logits(folded, TOKEN)
    b = got.reshape(-1).astype(np.float64)
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    # (random weights give near-ties at the top: the float top token is looked for in the top 5)
    return {"ok": bool(cosine >= min_cosine), "cosine_to_float": cosine,
            "same_top_token": bool(np.argmax(a) == np.argmax(b)),
            "float_top_in_top5": bool(np.argmax(a) in np.argsort(b)[-5:])}


def check_unpacked(quantized: Path, unpacked: Path) -> dict:
    a, b = tensor_hashes(quantized), tensor_hashes(unpacked)
    x, y = ort_logits(quantized, [TOKEN]), ort_logits(unpacked, [TOKEN])
    return {"ok": a == b and bool(np.array_equal(x, y)), "tensors_identical": sum(a[k] == b.get(k) for k in a),
            "tensors": len(a), "logits_identical": bool(np.array_equal(x, y))}


def _check_child(argv: list[str]) -> int:
    kind, paths = argv[0], [Path(p) for p in argv[1:]]
    t0 = time.perf_counter()
    result = {"fold": lambda: check_fold(paths[0], paths[1], argv[3] == "1"),
              "prune": lambda: check_prune(paths[0]),
              "quantize": lambda: check_quantized(*paths),
              "unpack": lambda: check_unpacked(*paths)}[kind]()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))
    return 0


def check(kind: str, *args) -> dict:
    done = _python(["--check", kind, *args])
    if done.returncode:
        return {"ok": False, "error": done.stderr.strip()[-1000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_logits(expected: Path, got: Path) -> dict:
    a, b = np.load(expected), np.load(got)
    return {"ok": bool(np.array_equal(a, b)), "logits_identical_to_q4": bool(np.array_equal(a, b))}


# ---- the suite ---------------------------------------------------------------------------
def model_bytes(path: Path) -> int:
    """The model file plus its external data file."""
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def remove_model(path: Path) -> None:
    for p in (path, path.parent / (path.name + ".data")):
        p.unlink(missing_ok=True)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    from benchmarks.common import md_table, write_results
    from models import decoder

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run large")
    parser.add_argument("--size", default="300M" if quick else "4G", help="model size, decimal (300M, 4G, 30G)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model files go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv or [])
    shape = decoder.shape_for(decoder.parse_size(args.size))
    need = int(shape.weight_bytes() * 2.05)  # the original and the folded copy, at most
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-large-", dir=args.workdir))
    run_float = shape.weight_bytes() <= ORT_FLOAT_MAX * ram_bytes()
    try:
        free = shutil.disk_usage(work).free
        if free < need:
            print(f"large: needs about {need / 1e9:.1f} GB free in {work}, has {free / 1e9:.1f} GB")
            return 1
        t0 = time.perf_counter()
        decoder.build(work / "original.onnx", args.size)
        build_s = time.perf_counter() - t0
        size = model_bytes(work / "original.onnx")
        print(f"large: built {shape} ({size / 1e9:.2f} GB) in {build_s:.0f} s in {work}", flush=True)
        baseline = measure(["baseline"])
        steps = []
        w = {name: work / name for name in ("original.onnx", "folded.onnx", "pruned.onnx", "q4.onnx", "q4.onnxc",
                                            "unpacked.onnx", "q4_logits.npy")}
        for label, kind, spec, src, dst in STEPS:
            in_size = model_bytes(work / src)
            if spec.startswith("prune") and shutil.disk_usage(work).free < 2 * in_size + 2**30:
                # prune writes its new weights to a spill file, then the output: twice the model
                reason = (f"needs {2 * in_size / 1e9:.0f} GB of free disk (spill file and output), "
                          f"has {shutil.disk_usage(work).free / 1e9:.0f} GB")
                steps.append({"step": label, "spec": spec, "skipped": reason, "check": {"ok": True}})
                print(f"large: {label}: skipped ({reason})", flush=True)
                continue
            report = measure([kind, spec, work / src, work / dst])
            out_size = model_bytes(work / dst) if not dst.endswith(".npy") else 0
            step = {"step": label, "spec": spec or kind, "input_bytes": in_size, "output_bytes": out_size, **report,
                    "mb_per_s": in_size / 1e6 / report["seconds"], "ratio_to_model": report["peak_rss"] / size,
                    "ratio_to_input": report["peak_rss"] / in_size}
            print(f"large: {label}: {report['seconds']:.1f} s, peak {report['peak_rss'] / 2**30:.2f} GiB "
                  f"({step['ratio_to_model']:.3f} x the model)", flush=True)
            if kind == "pass" and spec.startswith("fold"):
                step["check"] = check("fold", w["original.onnx"], w["folded.onnx"], "1" if run_float else "0")
                remove_model(w["original.onnx"])
            elif kind == "pass" and spec.startswith("prune"):
                step["check"] = check("prune", w["pruned.onnx"])
                remove_model(w["pruned.onnx"])
            elif kind == "pass":
                step["check"] = check("quantize", w["folded.onnx"], w["q4.onnx"], w["q4_logits.npy"])
                remove_model(w["folded.onnx"])
            elif kind == "pack":
                step["check"] = {"ok": True, "see": "unpack"}
            elif kind == "unpack":
                step["check"] = check("unpack", w["q4.onnx"], w["unpacked.onnx"])
                packed = next(s for s in steps if s["step"] == "pack")
                packed["check"] = {"ok": step["check"]["ok"], "unpacks_bit_exact": step["check"]["ok"]}
            else:
                step["check"] = same_logits(w["q4_logits.npy"], work / dst)
            print(f"large: check {label}: {step['check']}", flush=True)
            steps.append(step)
    finally:
        if args.keep:
            print(f"large: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for step in steps:
        if "skipped" in step:
            rows.append([step["step"], "", "", "", "", "", "", "skipped: " + step["skipped"]])
            continue
        figure = {k: v for k, v in step["check"].items() if k not in ("ok", "seconds", "error", "see")}
        rows.append([step["step"], round(step["input_bytes"] / 1e9, 3), round(step["output_bytes"] / 1e9, 3),
                     round(step["seconds"], 1), round(step["mb_per_s"]), round(step["peak_rss"] / 2**30, 2),
                     round(step["ratio_to_model"], 3), ("yes " if step["check"]["ok"] else "NO ")
                     + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in figure.items())])
    data = {"size": args.size, "shape": shape.__dict__, "model_bytes": size, "build_seconds": build_s,
            "ram_bytes": ram_bytes(), "float_model_run_in_ort": run_float,
            "baseline_peak_rss": baseline["peak_rss"], "steps": steps}
    worst = max(s["ratio_to_model"] for s in steps if "skipped" not in s)
    pack = next(s for s in steps if s["step"] == "pack")
    markdown = "\n\n".join([
        f"# large: a {size / 1e9:.1f} GB decoder through the passes on a {ram_bytes() / 2**30:.0f} GiB machine",
        (f"Model: models/decoder.py --size {args.size}: Llama-shaped, hidden {shape.hidden}, MLP {shape.mlp}, "
         f"{shape.blocks} blocks, vocabulary {shape.vocab}; {size:,} bytes of float32 in one external data file "
         f"(built in {build_s:.0f} s, {size / 1e6 / build_s:.0f} MB/s). Each step runs in its own process; `peak` is "
         "that process's VmHWM (resident pages, memory-mapped weight pages included), `x model` its ratio to the "
         f"model size, MB/s the step's input bytes per second of its process (imports included). A process that "
         f"only imports onnxcomp and onnxruntime peaks at {baseline['peak_rss'] / 2**20:.0f} MiB. Checks run in "
         "their own processes (see benchmarks/large.py)."),
        md_table(["step", "input GB", "output GB", "seconds", "MB/s", "peak GiB", "x model", "check"], rows),
        (f"Worst step: {worst:.3f} x the model size (goal: at most 0.5, and never above ~12 GB). Pack coded "
         f"{pack['stats']['tensor_bytes'] / 1e6:,.0f} MB of tensors in {pack['stats']['encode_seconds']:.1f} s "
         f"({pack['stats']['tensor_bytes'] / 1e6 / pack['stats']['encode_seconds']:.0f} MB/s on "
         f"{os.cpu_count()} cores) to {pack['stats']['packed_bytes']:,} bytes. "
         + ("The float model ran in ORT for the fold check." if run_float else
            "The float model is too large for ORT here (ORT copies external weights into its own memory): fold "
            "is checked by weight hashes and, through the 4-bit model, against the numpy float reference.")),
    ])
    write_results("large", data, markdown)
    print(markdown)
    return 0 if all(s["check"]["ok"] for s in steps) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child(sys.argv[2:]))
    if sys.argv[1:2] == ["--check"]:
        sys.exit(_check_child(sys.argv[2:]))
    sys.exit(main(argv=sys.argv[1:]))
