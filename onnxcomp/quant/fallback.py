"""Accuracy-aware fallback: keep the most sensitive quantized nodes in float until the error holds.

1. Error of the fully quantized model against the float one on held-out feeds, by `metric`:
   cosine -> 1 - mean cosine (per sample, worst output); top1 -> 1 - argmax agreement;
   mse -> mean squared error.
2. Sensitivity of each anchor node (Conv/MatMul/Gemm): the node alone, in float and quantized
   (same scales, same weights), runs on its real float inputs captured from the model, giving
   its quantization error e = y_q - y. That error is then injected at the node's output in an
   otherwise float model (one session with an extra zero-by-default input per node), which is
   exactly "only this node quantized": its sensitivity is the model output error that follows.
   One float session serves every node, so this costs N cheap runs, not N model builds.
3. Keep the k most sensitive nodes in float for k = 1, 2, 4, ... until the error holds, then
   bisect k down to the smallest count that still holds.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.runtime import make_session, run


def output_error(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], metric: str) -> float:
    """The error of candidate outputs against reference outputs (higher is worse)."""
    per_sample = []
    for ref, cand in zip(reference, candidate):
        worst = 0.0
        for name, r in ref.items():
            c = cand[name]
            if r.dtype.kind != "f":
                continue
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            if metric == "cosine":
                # cosine per row of the last axis (per token / per box / per class vector)
                rr = r64.reshape(-1, r64.shape[-1]) if r64.ndim > 1 else r64[None]
                cc = c64.reshape(rr.shape)
                num = np.sum(rr * cc, -1)
                den = np.linalg.norm(rr, axis=-1) * np.linalg.norm(cc, axis=-1)
                cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
                err = 1.0 - float(np.mean(cos))
            elif metric == "top1":
                if r64.ndim == 0 or r64.shape[-1] < 2:
                    continue
                err = 1.0 - float(np.mean(np.argmax(r64, -1) == np.argmax(c64, -1)))
            else:
                err = float(np.mean((r64 - c64) ** 2))
            worst = max(worst, err)
        per_sample.append(worst)
    return float(np.mean(per_sample)) if per_sample else 0.0


def outputs(model, feeds: list[dict[str, np.ndarray]], provider: str = "cpu") -> list[dict[str, np.ndarray]]:
    session = make_session(model, provider, threads=None)
    return [run(session, feed) for feed in feeds]


def sensitivity(float_model, anchors: list[gs.Node], feeds: list[dict[str, np.ndarray]],
                quantize_one: Callable[[gs.Graph, dict[str, tuple[float, float]]], None],
                ranges: dict[str, tuple[float, float]], metric: str = "cosine",
                provider: str = "cpu") -> tuple[dict[str, float], dict[str, float]]:
    """({node: model output error with only that node quantized}, {node: its local relative error})."""
    from onnxcomp.calibration import capture
    from onnxcomp.model import Model

    minis: dict[str, tuple[object, object, list[str], str]] = {}
    wanted: set[str] = set()
    opset = float_model.opset
    for node in anchors:
        acts = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if not acts:
            continue
        out_name = node.outputs[0].name
        f_graph = _single_node_graph(node, opset)
        q_graph = _single_node_graph(node, opset)
        quantize_one(q_graph, ranges)
        minis[node.name] = (make_session(Model(f_graph, 10 if opset >= 21 else 8, {"": opset}), provider),
                            make_session(Model(q_graph, 10 if opset >= 21 else 8, {"": opset}), provider),
                            [t.name for t in acts], out_name)
        wanted.update(t.name for t in acts)
    noisy, noise_inputs = _noise_model(float_model, {name: m[3] for name, m in minis.items()})
    noisy_session = make_session(noisy, provider, threads=None)
    out_names = [o.name for o in float_model.graph.outputs]
    err = {name: 0.0 for name in minis}
    ref = {name: 0.0 for name in minis}
    effect = {name: 0.0 for name in minis}
    for feed, values in capture(float_model, sorted(wanted | set(out_names)), feeds, provider=provider,
                                threads=None):
        reference = {k: values[k] for k in out_names}
        zeros = {noise: np.zeros((1,), np.float32) for noise in noise_inputs.values()}  # read only where run
        errors = {}
        for name, (fs, qs, inputs, out_name) in minis.items():
            if any(i not in values for i in inputs):
                continue  # inside an If branch that did not run on this feed: no error to inject
            mini_feed = {i: values[i] for i in inputs}
            y = run(fs, mini_feed)[out_name]
            e = run(qs, mini_feed)[out_name] - y
            errors[name] = e
            zeros[noise_inputs[name]] = np.zeros_like(y)
            err[name] += float(np.sum(e.astype(np.float64) ** 2))
            ref[name] += float(np.sum(y.astype(np.float64) ** 2))
        for name, e in errors.items():
            noisy_feed = {**feed, **zeros, noise_inputs[name]: e}
            result = run(noisy_session, noisy_feed, out_names)
            effect[name] += output_error([reference], [result], metric) / len(feeds)
    local = {name: err[name] / ref[name] if ref[name] > 0 else 0.0 for name in minis}
    return effect, local


def _noise_model(float_model, outputs: dict[str, str]):
    """A copy of the float model with `Y = Y_pre + noise_<node>` at every named node output."""
    from onnxcomp.subgraphs import scopes

    model = float_model.copy()
    where = {t.name: (scope.graph, t) for scope in scopes(model.graph) for n in scope.graph.nodes for t in n.outputs}
    names = {}
    for i, (node_name, out_name) in enumerate(outputs.items()):
        graph, y = where[out_name]  # the noise is a main-graph input; a subgraph reads it from outer scope
        producer = y.inputs[0]
        pre = gs.Variable(f"{out_name}__pre_noise", dtype=y.dtype)
        producer.outputs[producer.outputs.index(y)] = pre
        noise = gs.Variable(f"__noise_{i}", dtype=np.float32, shape=None)
        model.graph.inputs.append(noise)
        graph.nodes.append(gs.Node("Add", f"__add_noise_{i}", inputs=[pre, noise], outputs=[y]))
        names[node_name] = noise.name
    model.graph.toposort()
    return model, names


def _single_node_graph(node: gs.Node, opset: int) -> gs.Graph:
    inputs, copies = [], {}
    for t in node.inputs:
        if t is None or not t.name:
            copies[id(t)] = t
            continue
        if isinstance(t, gs.Constant):
            copies[id(t)] = gs.Constant(t.name, t.values)
        else:
            v = gs.Variable(t.name, dtype=t.dtype or np.float32, shape=t.shape)
            copies[id(t)] = v
            inputs.append(v)
    outs = [gs.Variable(o.name, dtype=o.dtype or np.float32, shape=o.shape) for o in node.outputs]
    mini = gs.Node(node.op, node.name, attrs=dict(node.attrs), inputs=[copies[id(t)] for t in node.inputs],
                   outputs=outs, domain=node.domain)
    return gs.Graph(nodes=[mini], inputs=inputs, outputs=outs[:1], opset=opset)


def search(order: list[str], error_of: Callable[[list[str]], float], max_error: float,
           full_error: float) -> tuple[list[str], float, list[tuple[int, float]]]:
    """Smallest prefix of `order` (most sensitive first) kept in float whose error holds.

    Returns (kept names, error, trials [(k, error)]). Keeps everything if nothing holds.
    """
    trials = [(0, full_error)]
    if full_error <= max_error:
        return [], full_error, trials
    lo, hi, hi_err = 0, None, None
    k = 1
    while k <= len(order):
        e = error_of(order[:k])
        trials.append((k, e))
        if e <= max_error:
            hi, hi_err = k, e
            break
        lo = k
        if k == len(order):
            break
        k = min(2 * k, len(order))
    if hi is None:
        return list(order), trials[-1][1], trials
    while hi - lo > 1:
        mid = (lo + hi) // 2
        e = error_of(order[:mid])
        trials.append((mid, e))
        if e <= max_error:
            hi, hi_err = mid, e
        else:
            lo = mid
    return list(order[:hi]), float(hi_err), trials
