"""Packed (.onnxc) size and speed vs generic compressors and order-0 entropy.

For each model (ultraface, mnist, digits_cnn, minilm) and variant (fp32; int8 = our quantize
pass, per-tensor and per-channel; pruned 50 % + int8; codebook when the pass works), in one run:
packed size (coder auto) vs zstd -19, xz -9e and brotli 11 (the bench extra installs brotli) of
the same .onnx file (ZipNN is not installed: its figures come from shared/docs/anchors/compress.md), order-0 entropy of the weights per tensor and per channel,
encode / decode MB/s (one thread), and time to a first inference from the packed file vs the
plain .onnx (interleaved, median of several rounds).
"""

from __future__ import annotations

import argparse
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import available_entries, md_table, write_results

ZIPNN = {("ultraface", "fp32"): 1_085_855, ("minilm", "fp32"): 74_706_776, ("digits_cnn", "fp32"): 148_745}
VARIANTS = {
    "int8": "quantize",
    "int8_pc": "quantize(per_channel=true)",
    "pruned_int8": "prune(sparsity=0.5), quantize",
    "codebook": "codebook",
}


def order0(proto: onnx.ModelProto) -> dict[str, float]:
    """Order-0 entropy (bytes, no table cost) of the packed tensors: per tensor and per channel.
    Floats are measured per byte plane (the best an order-0 byte model can do)."""
    from onnxcomp.io import coding
    from onnxcomp.io import format as container_format
    from onnxcomp.io.coding import models, planes

    per_tensor = per_channel = 0.0
    for tensor in container_format.all_tensors(proto):
        payload = container_format._payload(tensor)
        if payload is None:
            continue
        values = payload[1]
        kind, size = coding.layout(tensor.data_type, values.dtype)
        u = np.ascontiguousarray(values).view(container_format.UNSIGNED[values.dtype.itemsize])
        rows = int(tensor.dims[0]) if len(tensor.dims) >= 2 and u.size % max(1, tensor.dims[0]) == 0 else 1
        for plane in planes.to_planes(u, kind, size):
            per_tensor += models.entropy_bits(np.bincount(plane, minlength=256)) / 8
            h = planes.row_hists(plane, np.full(rows, plane.size // rows))
            per_channel += sum(models.entropy_bits(r) for r in h) / 8
    return {"h0_tensor": per_tensor, "h0_channel": per_channel}


def first_inference_ms(plain: Path, packed: Path, feed, rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    from onnxcomp.io import container

    def run_plain():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        s = ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
        s.run(None, {k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}})

    def run_packed():
        s = container.session(packed, threads=1)
        s.run(None, {k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}})

    times = {"plain": [], "packed": []}
    for _ in range(rounds):
        for label, fn in (("plain", run_plain), ("packed", run_packed)):
            t0 = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure(name: str, variant: str, path: Path, feed, rounds: int) -> dict:
    import zstandard

    from onnxcomp.io import container
    from onnxcomp.io.coding import fastrans
    from onnxcomp.model import load_proto

    raw = path.read_bytes()
    proto = load_proto(path)
    # CPU time of this process (one thread does all the coding): "MB/s on one core", and
    # unaffected by other work on the machine.
    warm = np.arange(64, dtype=np.uint8)  # load the numba kernels before timing
    fastrans.decode(fastrans.encode(warm, [64], [0], np.ones((1, 256), np.int64)), [64], [0],
                    np.ones((1, 256), np.int64), "warm-up")
    t0 = time.process_time()
    data, stats = container.pack_proto(proto, "auto")
    encode_s = time.process_time() - t0
    decode_s = []  # best of at least 5 runs and 0.3 s: a small model decodes in a fraction of a ms
    while len(decode_s) < 5 or sum(decode_s) < 0.3:
        t0 = time.process_time()
        back = container.unpack_bytes(data)
        decode_s.append(time.process_time() - t0)
    exact = [t.SerializeToString() for t in container.all_tensors(back)] == \
        [t.SerializeToString() for t in container.all_tensors(proto)]
    zstd = len(zstandard.ZstdCompressor(level=19).compress(raw))
    xz = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    try:
        import brotli  # type: ignore

        br = len(brotli.compress(raw, quality=11))
    except ImportError:
        br = None
    best = min(v for v in (zstd, xz, br) if v)
    row = {
        "model": name, "variant": variant, "onnx_bytes": len(raw), "packed_bytes": len(data),
        "zstd19": zstd, "xz9e": xz, "brotli11": br, "zipnn_anchor": ZIPNN.get((name, variant)),
        "vs_best_generic": 1 - len(data) / best, "tensor_bytes": stats["tensor_bytes"],
        "coded_tensor_bytes": stats["coded_tensor_bytes"], **order0(proto),
        "encode_MBps": stats["tensor_bytes"] / encode_s / 1e6,
        "decode_MBps": stats["tensor_bytes"] / min(decode_s) / 1e6, "bit_exact": exact,
        "choices": stats["choices"],
    }
    if feed is not None:
        with tempfile.TemporaryDirectory() as tmp:
            packed = Path(tmp) / "m.onnxc"
            packed.write_bytes(data)
            row["first_inference_ms"] = first_inference_ms(path, packed, feed, rounds)
            if variant in ("fp32", "int8"):
                row["cold_start_ms"] = cold_start_ms(path, packed)
    return row


COLD = """
import sys, time
t0 = time.perf_counter()
import onnxruntime as ort
if sys.argv[1].endswith(".onnxc"):
    import onnxcomp
    s = onnxcomp.session(sys.argv[1])
else:
    s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print((time.perf_counter() - t0) * 1000)
"""


def cold_start_ms(plain: Path, packed: Path, rounds: int = 3) -> dict[str, float]:
    """A new process until its session is ready (imports included: numba's are part of the price
    of the packed file), median of a few rounds, plain and packed interleaved."""
    import subprocess
    import sys

    times = {"plain": [], "packed": []}
    for _ in range(rounds):
        for label, target in (("plain", plain), ("packed", packed)):
            out = subprocess.run([sys.executable, "-c", COLD, str(target)], capture_output=True, text=True,
                                 check=True)
            times[label].append(float(out.stdout.strip().splitlines()[-1]))
    return {k: float(np.median(v)) for k, v in times.items()}


def variants_of(entry, name: str, out_dir: Path, quick: bool):
    import onnxcomp

    yield "fp32", entry.path
    calibration = entry.calibration(8 if quick else 32)
    for variant, spec in VARIANTS.items():
        if quick and variant not in ("int8", "pruned_int8"):
            continue
        target = out_dir / f"{name}_{variant}.onnx"
        try:
            result = onnxcomp.optimize(entry.path, spec, calibration=calibration, check=False, gate=False)
            onnxcomp.save(result.model, target)
        except Exception as exc:  # a pass that cannot handle this model is reported, not fatal
            print(f"  {name} {variant}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        yield variant, target


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run entropy")
    parser.add_argument("--models", default="mnist,ultraface" if quick else "mnist,ultraface,digits_cnn,minilm")
    args = parser.parse_args(argv or [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in available_entries(args.models):
            feed = entry.latency_feed()
            for variant, path in variants_of(entry, name, Path(tmp), quick):
                row = measure(name, variant, Path(path), feed, 3 if quick else 7)
                rows.append(row)
                print(f"{name:10s} {variant:12s} onnx {row['onnx_bytes']:>11,} packed {row['packed_bytes']:>11,} "
                      f"zstd {row['zstd19']:>11,} xz {row['xz9e']:>11,} ({row['vs_best_generic']:+.1%}) "
                      f"br {row['brotli11'] or 0:>11,} dec {row['decode_MBps']:.0f} MB/s exact={row['bit_exact']}", flush=True)
    headers = ["model", "variant", ".onnx", "packed", "zstd -19", "xz -9e", "brotli 11", "ZipNN (anchor)", "vs best generic",
               "H0/tensor", "H0/channel", "tensor bytes", "coded", "enc MB/s", "dec MB/s", "1st inf plain ms",
               "1st inf packed ms", "cold start plain ms", "cold start packed ms", "exact"]
    table = [[r["model"], r["variant"], r["onnx_bytes"], r["packed_bytes"], r["zstd19"], r["xz9e"],
              r["brotli11"] or "-", r["zipnn_anchor"] or "-", f"{-r['vs_best_generic']:+.1%}", int(r["h0_tensor"]), int(r["h0_channel"]),
              r["tensor_bytes"], r["coded_tensor_bytes"], r["encode_MBps"], r["decode_MBps"],
              r.get("first_inference_ms", {}).get("plain", "-"), r.get("first_inference_ms", {}).get("packed", "-"),
              r.get("cold_start_ms", {}).get("plain", "-"), r.get("cold_start_ms", {}).get("packed", "-"),
              r["bit_exact"]] for r in rows]
    md = ("# entropy: packed .onnxc vs generic compressors\n\n"
          "`vs best generic`: packed size relative to the smallest of zstd -19, xz -9e and brotli 11 of the same "
          ".onnx. H0 = order-0 entropy of the packed tensors without table cost (floats per "
          "byte plane; per channel = rows along axis 0). MB/s = decoded tensor bytes per CPU second of the one thread that codes (numba kernels already loaded). "
          "First inference = session creation + one run, median (in a warm process). Cold start = a new Python process until the session is ready, imports included (onnxruntime; for packed also onnxcomp and numba with its cached kernels), median of 3.\n\n" + md_table(headers, table))
    write_results("entropy", {"rows": rows, "quick": quick}, md)
    print(md)
    return 0
