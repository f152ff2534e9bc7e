"""4-bit weight-only quantization of transformers: our `gptq` pass beside ONNX Runtime's own
`matmul_nbits_quantizer` (`python -m benchmarks.run weight_only`).

Models: MiniLM (the real all-MiniLM-L6-v2; metric: sentence-embedding cosine vs fp32 on held-out
sentences) and a GPT-2-shaped decoder built offline from a transformers config (random weights,
so for size and speed; metric: logits cosine vs fp32 on held-out random token sequences).
Every configuration quantizes the MatMul weights only (ORT's scope; GPT-2's Gemms are rewritten as MatMul+Add first), 4 bits, and is written
as a plain .onnx with MatMulNBits; ORT's configs are whichever the installed onnxruntime has:
DEFAULT (its round-to-nearest), HQQ, RTN and GPTQ (ORT's bundled neural-compressor code; GPTQ
with the same calibration feeds as ours). Columns: file bytes, metric on held-out data, latency
ratio vs fp32 (CPU EP, one thread, interleaved rounds), seconds to quantize.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import md_table, write_results

BLOCKS = (32, 128)


class _Reader:
    """ORT's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)

    def __iter__(self):  # ORT's GPTQ path (its bundled neural-compressor code) iterates the reader
        return iter(self.feeds)


def _gemm_to_matmul(path: Path) -> None:
    """Rewrite Gemm(A, constant B, C) as MatMul + Add in place: ORT's quantizer takes only MatMul, and
    transformers' GPT-2 Conv1D layers export as Gemm; both tools then see the same MatMuls."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = inits[node.input[1]]
            w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w).T.copy(), w.name))
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", node.input[:2], [product], name=node.name + "_MatMul"))
        if len(node.input) > 2:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], node.output, name=node.name + "_Add"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(path))


def _ort_quantize(path: Path, config_name: str, block: int, cal) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    configs = {
        "DEFAULT": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False),
        "HQQ": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=block),
        "RTN": lambda: mnq.RTNWeightOnlyQuantConfig(),
        "GPTQ": lambda: mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(cal), block_size=block),
    }
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(path)), block_size=block, is_symmetric=False,
                                         algo_config=configs[config_name]())
    quantizer.process()
    return quantizer.model.model


def _ours(path: Path, block: int, cal) -> onnx.ModelProto:
    import onnxcomp

    spec = f"gptq(bits=4, group_size={block}, ops=[MatMul])"  # the model as given, like ORT's quantizer
    return onnxcomp.optimize(str(path), spec, calibration=cal, check=False, gate=False).model.to_proto()


# ---- models -------------------------------------------------------------------------------
def _minilm(_folder: Path):
    from models import zoo

    entry = zoo.get("minilm")
    cal, ev = entry.calibration(), entry.evaluation()

    def metric(proto) -> float:
        return entry.evaluate(proto)["cos_mean"]

    return entry.path, cal, ev, metric, entry.latency_feed()


def _gpt2(folder: Path):
    import torch
    import transformers

    from models import zoo
    from onnxcomp.frontends.hf import export_hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192, n_positions=256)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = folder / "gpt2.onnx"
    done = export_hf(model, path, task="causal-lm")
    if getattr(done, "error", None):
        raise RuntimeError(done.error)
    _gemm_to_matmul(path)
    rng = np.random.default_rng(0)

    def feed(n):
        ids = rng.integers(0, config.vocab_size, (1, n))
        return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, n), np.int64)}

    cal = [feed(int(rng.integers(16, 64))) for _ in range(32)]
    ev = [feed(int(rng.integers(16, 64))) for _ in range(16)]
    reference = zoo.run_all(path, ev)

    def metric(proto) -> float:
        out = zoo.run_all(proto, ev)
        return float(np.mean([zoo.cosine(next(iter(r.values())), next(iter(o.values())))
                              for r, o in zip(reference, out)]))

    return path, cal, ev, metric, feed(128)


MODELS = {"minilm": _minilm, "gpt2": _gpt2}


def bench(name: str, folder: Path, configs: list[str]) -> dict:
    from onnxcomp.runtime import interleaved_latency_ms

    path, cal, ev, metric, latency_feed = MODELS[name](folder)
    rows = {"fp32": {"bytes": Path(path).stat().st_size, "metric": metric(onnx.load(str(path))), "seconds": 0.0}}
    protos = {"fp32": onnx.load(str(path))}
    for block in BLOCKS:
        variants = {f"ours gptq b{block}": lambda b=block: _ours(path, b, cal)}
        for config in configs:
            if config == "RTN" and block != 32:
                continue  # ORT's RTN config has no block size (neural-compressor's default, 32)
            variants[f"ORT {config} b{block}"] = lambda c=config, b=block: _ort_quantize(path, c, b, cal)
        for label, make in variants.items():
            print(f"weight_only: {name} {label} ...", flush=True)
            t0 = time.perf_counter()
            try:
                proto = make()
            except Exception as exc:  # noqa: BLE001 - a peer config that fails is a row, not a crash
                rows[label] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
                continue
            seconds = time.perf_counter() - t0
            out = folder / f"{name}.{label.replace(' ', '_')}.onnx"
            onnx.save(proto, str(out))
            nbits = sum(1 for n in proto.graph.node if n.op_type == "MatMulNBits")
            rows[label] = {"bytes": out.stat().st_size, "metric": metric(proto), "seconds": seconds, "nbits_nodes": nbits}
            protos[label] = proto
    times = interleaved_latency_ms(protos, latency_feed, threads=1, rounds=5, round_seconds=0.3)
    for label, ms in times.items():
        rows[label]["latency_vs_fp32"] = ms / times["fp32"]
    return rows


def table(data: dict) -> str:
    headers = ["model", "config", "bytes (× fp32)", "metric", "latency vs fp32", "quantize s", "MatMulNBits nodes"]
    out = []
    for name, rows in data.items():
        fp32 = rows["fp32"]["bytes"]
        for label, r in rows.items():
            if "error" in r:
                out.append([name, label, "FAIL", r["error"], "-", "-", "-"])
                continue
            out.append([name, label, f"{r['bytes']:,} ({fp32 / r['bytes']:.1f}×)", f"{r['metric']:.4f}",
                        f"{r.get('latency_vs_fp32', float('nan')):.2f}", f"{r['seconds']:.1f}", r.get("nbits_nodes", "-")])
    return md_table(headers, out)


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer

    for name in ("onnxruntime.quantization", matmul_nbits_quantizer.__name__):  # it logs every node at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="benchmarks.run weight_only")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default="DEFAULT,HQQ,RTN,GPTQ")
    args = parser.parse_args(argv or [])
    started = time.perf_counter()
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            data[name] = bench(name, Path(tmp), args.configs.split(","))
    md = ("# Weight-only 4-bit: onnxcomp gptq vs ONNX Runtime's matmul_nbits_quantizer\n\n" + table(data) + "\n\n"
          "All rows quantize the MatMul weights to 4 bits (asymmetric, blocks of 32 or 128 along K) into "
          "MatMulNBits; bytes are the plain .onnx file. metric: MiniLM sentence-embedding cosine vs fp32 on its 32 "
          "held-out sentences (calibration: the 32 others); gpt2 (4 layers, 512 wide, random weights): logits cosine "
          "vs fp32 on 16 held-out random sequences (calibration: 32 others). Latency: CPU EP, one thread, "
          "interleaved rounds, median, input of 128 tokens; a shared 2-core AMD EPYC without VNNI.\n")
    write_results("weight_only", {"models": data, "seconds": time.perf_counter() - started}, md)
    print(md)
    return 0
