"""int8 embedding tables: the float table a Gather reads rows from, stored as int8 rows with one
scale per row (weight-only; the activations stay float).

    Y = Gather(E float32 [V, D], ids)
      => Y = Cast(Gather(E_q int8 [V, D], ids), float) * Gather(scale float32 [V, 1], ids)

Only the looked-up rows are converted at run time (a DequantizeLinear of the whole table would
convert all V x D values per inference), and one scale per row keeps rare tokens with small
vectors as exact as frequent ones. In a transformer the word-embedding table is usually the
largest tensor (MiniLM: 47 MB of 90), which QDQ placement around Conv/MatMul/Gemm never reaches.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.quant.qdq import NodeBuilder


def quantize_embeddings(graph: gs.Graph, exclude: tuple[str, ...] = (), min_size: int = 4096) -> dict[str, int]:
    """Rewrite every Gather(float table of >= min_size values, ids) on axis 0; returns counts."""
    build = NodeBuilder(graph, "embedding")
    done: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    stats = {"embeddings_quantized": 0, "embedding_bytes_before": 0, "embedding_bytes_after": 0}
    for node in list(graph.nodes):
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or len(node.inputs) != 2:
            continue
        table, ids = node.inputs
        if not isinstance(table, gs.Constant) or isinstance(ids, gs.Constant):
            continue
        values = table.values
        if np.dtype(values.dtype) != np.float32 or values.ndim != 2 or values.size < min_size:
            continue
        if any(fnmatch.fnmatchcase(node.name or "", p) or fnmatch.fnmatchcase(table.name, p) for p in exclude):
            continue
        if table.name not in done:
            values = np.asarray(values, np.float32)
            if not np.isfinite(values).all():  # no int8 row can stand for NaN/Inf
                continue
            peak = np.abs(values).max(axis=1, keepdims=True)
            scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
            done[table.name] = (build.const(f"{table.name}_int8", q), build.const(f"{table.name}_row_scale", scale))
            stats["embeddings_quantized"] += 1
            stats["embedding_bytes_before"] += int(values.nbytes)
            stats["embedding_bytes_after"] += int(q.nbytes + scale.nbytes)
        q_table, scale_table = done[table.name]
        out = node.outputs[0]
        rows = gs.Variable(build.unique(f"{out.name}_int8_rows"), dtype=np.int8)
        rows_float = gs.Variable(build.unique(f"{out.name}_rows"), dtype=np.float32)
        scales = gs.Variable(build.unique(f"{out.name}_row_scales"), dtype=np.float32)
        node.inputs[0] = q_table
        node.outputs[0] = rows
        build.node("Gather", [scale_table, ids], [scales], {"axis": 0}, base=f"{node.name}_scales")
        build.node("Cast", [rows], [rows_float], {"to": onnx.TensorProto.FLOAT}, base=f"{node.name}_Cast")
        build.node("Mul", [rows_float, scales], [out], base=f"{node.name}_rescale")
    if done:
        graph.cleanup().toposort()
    return stats
