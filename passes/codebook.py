"""codebook: k-means weight sharing (Deep Compression, Han et al. 2016), per layer.

    W (float32 [shape])  =>  Gather(codebook float32 [2**bits], Cast(indices uint8 [shape], int32))

Each weight tensor of Conv/Gemm/MatMul (and each embedding table a Gather looks rows up in) gets its own 2**bits centroids, found by 1-D k-means
(Lloyd's algorithm, exact in one dimension by sorting) from a linear initialisation between
the weight's min and max, which keeps the rare large weights represented; a centroid left
without weights is moved to split the worst cluster. The model stays a
plain ONNX model that ORT runs (it folds Cast+Gather of constants at load); the uint8 index
tensors are what the entropy coder compresses afterwards. Zero weights stay exactly zero
(pruned sparsity survives) when `keep_zero` is on. Weights inside If branches and Loop/Scan
bodies (nested too) are clustered as well; their decoding nodes go into the graph that reads them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.quant.qdq import NodeBuilder
from onnxcomp.registry import register
from onnxcomp.subgraphs import NameSpace, node_scopes

WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1, "Gather": 0}  # Gather: embedding tables


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 60, keep_zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float32 [k'], indices uint8 like values) from linear initialisation.

    With keep_zero, one centroid is pinned at exactly 0 when the data contain zeros.
    """
    x = values.astype(np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.array([lo], np.float32), np.zeros(values.shape, np.uint8)
    centroids = np.linspace(lo, hi, k)
    pin_zero = keep_zero and np.any(x == 0)
    if pin_zero:
        centroids[np.argmin(np.abs(centroids))] = 0.0
    order = np.argsort(x, kind="stable")
    xs = x[order]
    for _ in range(iterations):
        centroids = np.sort(centroids)
        bounds = (centroids[1:] + centroids[:-1]) / 2
        assign = np.searchsorted(bounds, xs)
        sums = np.bincount(assign, weights=xs, minlength=k)
        counts = np.bincount(assign, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # an empty cluster (common in the tails after linear initialisation) is moved to split
            # the cluster with the largest squared error, so no centroid is wasted
            sq = np.bincount(assign, weights=xs * xs, minlength=k)
            sse = sq - np.where(counts > 0, sums * sums / np.maximum(counts, 1), 0)
            for e in empty:
                worst = int(np.argmax(sse))
                spread = np.sqrt(max(sse[worst], 0) / max(counts[worst], 1))
                new[e] = new[worst] + (spread if spread > 0 else 1e-12)
                sse[worst] = -1
        if pin_zero:
            new[np.argmin(np.abs(new))] = 0.0
        if np.allclose(new, centroids, rtol=0, atol=1e-12 * max(abs(lo), abs(hi))):
            centroids = new
            break
        centroids = new
    centroids = np.sort(centroids)
    bounds = (centroids[1:] + centroids[:-1]) / 2
    indices = np.searchsorted(bounds, x).astype(np.uint8).reshape(values.shape)
    return centroids.astype(np.float32), indices


@register
class Codebook(Pass):
    """k-means weight sharing: per-layer codebooks of 2**bits values, indices stored as uint8."""

    name = "codebook"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        bits: int = param(5, "index bits per weight (2**bits shared values per layer)", min=2, max=8)
        ops: tuple[str, ...] = param(("Conv", "Gemm", "MatMul", "Gather"), "op types whose weights are clustered")
        exclude: tuple[str, ...] = param((), "node or initializer names (fnmatch) left alone")
        min_size: int = param(256, "weights with fewer elements stay as they are", min=0)
        keep_zero: bool = param(True, "keep exact zeros (pruned weights) at zero")
        iterations: int = param(60, "k-means iterations", min=1, max=1000)

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: one more index bit (twice the shared values), up to 8."""
        return self.with_params(bits=self.config.bits + 1) if self.config.bits < 8 else None

    def run(self, model, ctx) -> PassResult:
        cfg = self.config
        graph = model.graph
        names = NameSpace(graph)
        builders: dict[int, NodeBuilder] = {}
        done: dict[tuple[int, int], gs.Variable] = {}  # (weight, graph) -> decoded tensor in that graph
        stats = {"layers": 0, "weights": 0, "bytes_before": 0, "bytes_after": 0, "relative_error": 0.0}
        per_subgraph: dict[str, int] = {}
        err_num = err_den = 0.0
        for scope, node in node_scopes(graph):
            index = WEIGHT_INPUT.get(node.op)
            if node.op not in cfg.ops or index is None or len(node.inputs) <= index:
                continue
            w = node.inputs[index]
            if not isinstance(w, gs.Constant) or np.dtype(w.values.dtype) != np.float32 or w.values.size < cfg.min_size:
                continue
            if node.op == "Gather" and (w.values.ndim != 2 or isinstance(node.inputs[1], gs.Constant)):
                continue  # only lookup tables (rank 2, looked up by run-time ids), never a codebook itself
            if any(fnmatch.fnmatchcase(node.name or "", p) or fnmatch.fnmatchcase(w.name, p) for p in cfg.exclude):
                continue
            key = (id(w), id(scope.graph))  # the decoding nodes live in the graph that reads the weight
            if key not in done and not np.isfinite(w.values).all():  # no shared value can stand for NaN/Inf
                stats["skipped_nan_inf"] = stats.get("skipped_nan_inf", 0) + 1
                continue
            if key not in done:
                build = builders.setdefault(id(scope.graph), NodeBuilder(scope.graph, "codebook", names.taken))
                values = np.asarray(w.values, np.float32)
                centroids, indices = kmeans_1d(values, 2**cfg.bits, cfg.iterations, cfg.keep_zero)
                idx = build.const(f"{w.name}_codebook_indices", indices)
                book = build.const(f"{w.name}_codebook", centroids)
                idx32 = gs.Variable(build.unique(f"{w.name}_codebook_indices_int32"), dtype=np.int32)
                build.node("Cast", [idx], [idx32], {"to": 6}, base=f"{w.name}_codebook_Cast")
                out = gs.Variable(build.unique(f"{w.name}_shared"), dtype=np.float32, shape=list(values.shape))
                build.node("Gather", [book, idx32], [out], {"axis": 0}, base=f"{w.name}_codebook_Gather")
                done[key] = out
                recon = centroids[indices]
                err_num += float(np.sum((recon.astype(np.float64) - values) ** 2))
                err_den += float(np.sum(values.astype(np.float64) ** 2))
                stats["weights"] += int(values.size)
                stats["bytes_before"] += int(values.nbytes)
                stats["bytes_after"] += int(indices.nbytes + centroids.nbytes)
                stats["layers"] += 1
                if scope.path:
                    per_subgraph[scope.path] = per_subgraph.get(scope.path, 0) + 1
            node.inputs[index] = done[key]
        if not done:
            return PassResult(False, {"layers": 0})
        stats["relative_error"] = err_num / err_den if err_den else 0.0
        stats["index_bits"] = cfg.bits
        if per_subgraph:
            stats["subgraph_layers"] = sum(per_subgraph.values())
            stats["per_subgraph"] = per_subgraph
        graph.cleanup().toposort()
        return PassResult(True, stats)
