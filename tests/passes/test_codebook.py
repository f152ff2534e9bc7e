"""codebook: per-layer k-means weight sharing reconstructed with Gather."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.model import load
from onnxcomp.registry import get
from onnxcomp.runtime import make_session
from onnxcomp.passes.codebook import kmeans_1d

MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2,32] x) => (float[2,16] y) { y = Gemm <transB = 1> (x, w, b) }
"""


def gemm(zero_fraction=0.0):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    w[rng.random(w.shape) < zero_fraction] = 0.0
    proto = onnx.parser.parse_model(MODEL)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w"),
                                    onnx.numpy_helper.from_array(np.zeros(16, np.float32), "b")])
    return proto, w


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_kmeans_uses_at_most_two_to_the_bits_values_and_beats_a_uniform_grid(bits):
    values = np.random.default_rng(1).standard_t(3, 5000).astype(np.float32)
    centroids, indices = kmeans_1d(values, 2**bits)
    assert len(centroids) <= 2**bits and indices.dtype == np.uint8 and indices.max() < len(centroids)
    grid = np.linspace(values.min(), values.max(), 2**bits)
    uniform = grid[np.abs(values[:, None] - grid[None]).argmin(1)]
    assert np.mean((centroids[indices] - values) ** 2) < np.mean((uniform - values) ** 2)


def test_kmeans_error_falls_as_bits_grow():
    values = np.random.default_rng(2).normal(0, 1, 4000).astype(np.float32)
    errors = [np.mean((kmeans_1d(values, 2**b)[0][kmeans_1d(values, 2**b)[1]] - values) ** 2) for b in (2, 4, 6)]
    assert errors[0] > errors[1] > errors[2]


def test_codebook_replaces_the_weight_with_gather_of_uint8_indices_and_ort_agrees():
    proto, w = gemm()
    model = load(proto)
    result = get("codebook")(bits=4, min_size=0).run(model, PassContext())
    assert result.changed and result.stats["layers"] == 1
    gather = next(n for n in model.graph.nodes if n.op == "Gather")
    book = gather.inputs[0].values
    indices = gather.inputs[1].inputs[0].inputs[0].values
    assert indices.dtype == np.uint8 and len(book) <= 16
    out = model.to_proto()
    onnx.checker.check_model(out)
    x = np.random.default_rng(3).normal(0, 1, (2, 32)).astype(np.float32)
    np.testing.assert_allclose(make_session(out).run(None, {"x": x})[0], x @ book[indices].T, rtol=1e-5, atol=1e-5)


def test_codebook_keeps_pruned_zeros_exactly_zero():
    proto, w = gemm(zero_fraction=0.5)
    model = load(proto)
    get("codebook")(bits=3, min_size=0).run(model, PassContext())
    gather = next(n for n in model.graph.nodes if n.op == "Gather")
    recon = gather.inputs[0].values[gather.inputs[1].inputs[0].inputs[0].values]
    assert np.all(recon[w == 0] == 0)


def test_codebook_reports_no_change_when_every_weight_is_below_min_size():
    proto, _ = gemm()
    model = load(proto)
    result = get("codebook")(bits=4).run(model, PassContext())  # 512 weights >= default min_size 256
    small = get("codebook")(bits=4, min_size=10_000).run(load(gemm()[0]), PassContext())
    assert result.changed and not small.changed


def test_codebook_6_bits_keeps_the_digits_cnn_accuracy_within_one_percent():
    zoo = pytest.importorskip("models.zoo")
    e = zoo.get("digits_cnn")
    base = e.evaluate(e.path)["test_acc"]
    result = onnxcomp.optimize(e.path, "codebook(bits=6)", check=False, gate=False)
    assert e.evaluate(result.model.to_proto())["test_acc"] >= base - 0.01


def test_codebook_clusters_embedding_tables_looked_up_by_gather():
    rng = np.random.default_rng(6)
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (int64[1,10] ids) => (float[1,10,32] y) {
  y = Gather <axis = 0> (table, ids)
}
""")
    table = rng.normal(0, 1, (400, 32)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(table, "table"))
    model = load(proto)
    result = get("codebook")(bits=4).run(model, PassContext())
    assert result.changed and result.stats["layers"] == 1
    out = model.to_proto()
    assert not any(t.name == "table" for t in out.graph.initializer)
    ids = rng.integers(0, 400, (1, 10)).astype(np.int64)
    got = make_session(out).run(None, {"ids": ids})[0]
    assert len(np.unique(got)) <= 16
    rel = np.sqrt(np.mean((got - table[ids]) ** 2) / np.mean(table[ids] ** 2))
    assert rel < 0.12  # 16 shared values over a unit normal: about 0.1 (uniform 16 levels: ~0.16)
