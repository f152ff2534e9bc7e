"""What loading repairs or flags in a model before any pass sees it.

- Duplicate node names (ONNX Runtime refuses such a model: "two nodes with same node name"):
  repaired on load, every repeat renamed with a suffix, and said in one line (Model.load_notes).
- Non-finite weights (NaN or +-Inf): flagged, not changed (`nonfinite_initializers`); the caller
  warns and the accuracy gate decides whether the result is usable.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def _graphs(graph: gs.Graph):
    """`graph` and every subgraph in it (If/Loop/Scan bodies, nested too)."""
    from onnxcomp.graph_utils import subgraphs

    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from _graphs(sub)


def unique_node_names(graph: gs.Graph) -> str | None:
    """Rename the repeats of every node name used more than once (in the graph and its
    subgraphs): the first keeps its name, the others get `_1`, `_2`... (a suffix no node uses).
    Returns the one-line note saying what was renamed, or None when every name was unique.
    Unnamed nodes stay unnamed (ONNX Runtime allows any number of those)."""
    nodes = [node for g in _graphs(graph) for node in g.nodes]
    used = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    renamed: dict[str, int] = {}
    count = 0
    for node in nodes:
        name = node.name
        if not name:
            continue
        if name not in seen:
            seen.add(name)
            continue
        suffix = renamed.get(name, 0)
        while True:
            suffix += 1
            candidate = f"{name}_{suffix}"
            if candidate not in used:
                break
        renamed[name] = suffix
        node.name = candidate
        used.add(candidate)
        count += 1
    if not renamed:
        return None
    shown = ", ".join(repr(n) for n in list(renamed)[:3]) + (f" and {len(renamed) - 3} more" if len(renamed) > 3 else "")
    return (f"renamed {count} node{'s' if count != 1 else ''} whose name another node already had ({shown}): "
            "ONNX Runtime refuses duplicate node names")


FLOAT_KINDS = "fc"


# ops that take ±Inf as a bound, not as a value: Clip(x, 0, inf) is a ReLU, Max(-inf, x) is x
INF_AS_A_BOUND = {"Clip", "Max", "Min", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Where"}


def nonfinite_initializers(model) -> list[str]:
    """Names of the weights (constants of the graph and its subgraphs, float or complex) that
    hold a NaN, or an Inf that some node uses as a value (not only as a bound: INF_AS_A_BOUND;
    openwakeword's Clip(x, min, inf) and Magika's Max(-inf, x) have finite outputs), in the order
    a walk of the graph meets them. Reads each weight once without keeping it loaded (external
    data stays in its file)."""
    from onnxcomp.model import _walk_constants, peek_values

    names = []
    for const in _walk_constants(model.graph, set()):
        dtype = getattr(const._values, "dtype", None)
        try:
            if dtype is None or np.dtype(dtype).kind not in FLOAT_KINDS:
                continue
        except TypeError:  # an ONNX-only type numpy does not know (float8...): not checked
            continue
        values = np.asarray(peek_values(const))
        if values.dtype.kind in FLOAT_KINDS and values.size and not np.isfinite(values).all():
            if np.isnan(values).any() or not all(n.op in INF_AS_A_BOUND for n in const.outputs):
                names.append(const.name)
    return names


def describe_nonfinite(names: list[str], shown: int = 3) -> str | None:
    """The one warning line for `nonfinite_initializers`' answer (None when it is empty), e.g.
    "2 weights hold NaN or Inf values ('w2', 'b2'): outputs that depend on them are not finite
    before or after optimization; the gate decides whether the result is usable"."""
    if not names:
        return None
    listed = ", ".join(repr(n) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    noun = "weight holds" if len(names) == 1 else "weights hold"
    return (f"{len(names)} {noun} NaN or Inf values ({listed}): outputs that depend on them are not finite "
            "before or after optimization; the gate decides whether the result is usable")
