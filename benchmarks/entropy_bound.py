"""How small can the int8 weights get losslessly? Costs of the int8 weight tensors under models a
context coder could use, beside zstd -19 / xz -9e of the same bytes and our packed streams.

Every cost is what an adaptive coder would really pay (no free per-channel tables): an adaptive
binary bit-tree over each weight's byte (LZMA's literal coder), probabilities learned as it goes,
one tree per context. Contexts tried: none (adaptive order-0); the output channel's mean |w| (side
information, one byte per channel, counted); a rank-1 scale out x in channel (side information
counted); the two previous weights of the row (causal neighbours); neighbours + channel scale; and
rank-1 scale + kernel position. `H0 tensor` is the static order-0 entropy per tensor (no table
cost) for reference. If no context beats order-0 by much, no entropy coder will beat the generic
compressors by much on these tensors either: they already sit near order-0.
"""

from __future__ import annotations

import argparse
import lzma
import math
import tempfile
from pathlib import Path

import numba
import numpy as np
import onnx
import zstandard
from onnx import numpy_helper

from benchmarks.common import available_entries, md_table, write_results

CONTEXTS = {"adaptive order-0": "", "channel scale": "o", "rank-1 scale": "r", "neighbours": "n",
            "neighbours + channel": "on", "rank-1 + position": "rp"}


@numba.njit(cache=True)
def _bittree_bits(symbols, contexts, n_contexts):
    """Bits an adaptive binary bit-tree coder (12-bit probabilities, shift-5 update) spends."""
    probs = np.full((n_contexts, 256), 2048, np.int32)
    bits = 0.0
    for j in range(symbols.size):
        s = symbols[j]
        c = contexts[j]
        node = 1
        for b in range(7, -1, -1):
            bit = (s >> b) & 1
            p = probs[c, node]
            if bit == 0:
                bits -= math.log2(p / 4096.0)
                probs[c, node] = p + ((4096 - p) >> 5)
            else:
                bits -= math.log2(1.0 - p / 4096.0)
                probs[c, node] = p - (p >> 5)
            node = node * 2 + bit
    return bits


def _log_bucket(x: np.ndarray, steps: int = 3, lo: int = -4, hi: int = 30) -> np.ndarray:
    return np.clip(np.floor(np.log2(x + 0.25) * steps).astype(np.int64) - lo, 0, hi - lo)


def _contexts(w: np.ndarray, mode: str) -> tuple[np.ndarray, int]:
    """Context id per weight (raster order) and the side-information bytes it needs."""
    out_ch, n = w.shape[0], w.size
    row = n // out_ch
    in_ch = w.shape[1] if w.ndim > 1 else 1
    kernel = n // (out_ch * in_ch)
    a = np.abs(w.ravel()).astype(np.float64)
    ctx, side = np.zeros(n, np.int64), 0
    if "o" in mode:
        ctx, side = np.repeat(_log_bucket(a.reshape(out_ch, -1).mean(1)), row), out_ch
    if "r" in mode:
        so = a.reshape(out_ch, -1).mean(1) + 0.1
        si = a.reshape(out_ch, in_ch, kernel).mean(axis=(0, 2)) + 0.1
        ctx = np.repeat(_log_bucket(so[:, None] * si[None, :] / (a.mean() + 0.1)).ravel(), kernel)
        side = out_ch + in_ch
    if "n" in mode:
        at = np.arange(n) % row
        prev1 = np.where(at >= 1, np.concatenate([[0.0], a[:-1]]), 0.0)
        prev2 = np.where(at >= 2, np.concatenate([[0.0, 0.0], a[:-2]]), 0.0)
        ctx = ctx * 17 + np.minimum(_log_bucket((prev1 + prev2) / 2, 2, -4, 12), 16)
    if "p" in mode and kernel > 1:
        ctx = ctx * 9 + np.minimum(np.arange(n) % kernel, 8)
    return ctx, side


def _entropy_bytes(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols, minlength=256)
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def weight_costs(path: Path) -> dict:
    """Costs (bytes) of the int8 weight tensors (rank >= 2) of one model."""
    from onnxcomp.io import container

    proto = onnx.load(str(path))
    weights = [numpy_helper.to_array(t).astype(np.int64) for t in proto.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    raw = b"".join(w.astype(np.int8).tobytes() for w in weights)
    names = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2}
    _, stats = container.pack_proto(proto, "auto")
    row = {"weights": len(raw), "zstd19": len(zstandard.ZstdCompressor(level=19).compress(raw)),
           "xz9e": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
           "packed": sum(v["coded"] for k, v in stats["per_tensor"].items() if k in names),
           "h0_tensor": sum(_entropy_bytes((w.ravel() + 128).astype(np.int64)) for w in weights)}
    for label, mode in CONTEXTS.items():
        total = 0.0
        for w in weights:
            ctx, side = _contexts(w, mode)
            symbols = np.where(w.ravel() >= 0, 2 * w.ravel(), -2 * w.ravel() - 1)  # zigzag: small |w| first
            total += _bittree_bits(symbols, ctx, int(ctx.max()) + 1) / 8 + side
        row[label] = total
    return row


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    from benchmarks.entropy import variants_of

    parser = argparse.ArgumentParser(prog="benchmarks.run entropy_bound")
    parser.add_argument("--models", default="mnist,ultraface" if quick else "mnist,ultraface,digits_cnn")
    args = parser.parse_args(argv or [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in available_entries(args.models):
            for variant, path in variants_of(entry, name, Path(tmp), quick):
                if variant in ("fp32", "codebook"):
                    continue
                row = {"model": name, "variant": variant, **weight_costs(Path(path))}
                rows.append(row)
                best_generic = min(row["zstd19"], row["xz9e"])
                best_context = min(row[k] for k in CONTEXTS)
                print(f"{name:10s} {variant:12s} weights {row['weights']:>9,} xz {row['xz9e']:>9,} "
                      f"packed {row['packed']:>9,} best context model {best_context:>11,.0f} "
                      f"({best_context / best_generic - 1:+.1%} vs best generic)", flush=True)
    headers = ["model", "variant", "int8 weight bytes", "zstd -19", "xz -9e", "packed (ours)", "H0 tensor",
               *CONTEXTS, "best context vs best generic"]
    table = [[r["model"], r["variant"], r["weights"], r["zstd19"], r["xz9e"], r["packed"], int(r["h0_tensor"]),
              *(int(r[k]) for k in CONTEXTS),
              f"{min(r[k] for k in CONTEXTS) / min(r['zstd19'], r['xz9e']) - 1:+.1%}"] for r in rows]
    md = ("# entropy_bound: what context models could save on int8 weights\n\n" + __doc__.split("\n\n", 1)[1]
          + "\nAll figures in bytes, for the int8 weight tensors (rank >= 2) only. Tensors under 16 KB are "
             "packed in bundles of several tensors; `packed (ours)` counts each its share of its bundle "
             "(in proportion to its size).\n\n" + md_table(headers, table))
    write_results("entropy_bound", {"rows": rows, "quick": quick}, md)
    print(md)
    return 0
