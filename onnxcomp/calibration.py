"""Activation capture through ONNX Runtime: expose intermediate tensors as extra graph outputs
and yield them batch by batch, so a caller can stream statistics without holding every
activation in memory. The data sources (.npz, folders, readers, images) live in onnxcomp.feeds
and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from onnxcomp.feeds import IMAGE_SUFFIXES, CalibrationData, ImagePreprocess  # noqa: F401  (re-exported)


def tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every tensor ONNX shape inference can type (inputs, outputs, value_info), subgraphs included."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # inference is best-effort: a model ORT runs may still defeat it  # noqa: BLE001
        inferred = proto
    types: dict[str, onnx.TypeProto] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            types.setdefault(vi.name, vi.type)
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(sub)

    walk(inferred.graph)
    return types


def with_extra_outputs(proto: onnx.ModelProto, names: Iterable[str], typed: bool = True) -> onnx.ModelProto:
    """A copy of the model whose graph also outputs the named intermediate tensors.

    `typed=False` skips shape inference (ORT accepts untyped outputs): much faster on big models.
    Tensors inside subgraphs are routed out under other names: use `expose_outputs` for those.
    """
    return expose_outputs(proto, names, typed)[0]


def expose_outputs(proto: onnx.ModelProto, names: Iterable[str], typed: bool = True
                   ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """with_extra_outputs for tensors anywhere, and {name: the main-graph output carrying it}.

    A tensor inside an If branch or a Loop/Scan body (nested too) is routed out through its
    control-flow nodes (onnxcomp.subgraphs.expose); the others are plain extra outputs.
    """
    from onnxcomp.subgraphs import expose

    return expose(proto, names, tensor_types(proto) if typed else None)


def capture(model, names: list[str], data: Iterable[dict[str, np.ndarray]], provider: str = "cpu",
            threads: int | None = None, typed: bool = True
            ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {tensor name: value}) for every calibration feed, one batch at a time.

    Tensors inside subgraphs come out too: an If-branch tensor only for the feeds on which its
    branch ran (absent otherwise), a Loop/Scan-body tensor stacked per iteration on a new axis 0
    (absent when the body never ran). A subgraph tensor that cannot be routed out is absent.
    `typed=False`: the extra outputs are left untyped (no shape inference), see expose_outputs.
    """
    from onnxcomp.model import Model
    from onnxcomp.runtime import make_session, run

    proto = model.to_proto() if isinstance(model, Model) else model
    exposed, aliases = expose_outputs(proto, names, typed)
    session = make_session(exposed, provider, threads=threads)
    wanted = list(dict.fromkeys(aliases.values()))
    for feed in data:
        values = run(session, feed, wanted)
        got = {}
        for name, alias in aliases.items():
            value = values[alias]
            if alias != name and isinstance(value, np.ndarray) and value.size == 0:
                continue  # the branch holding it did not run on this feed
            got[name] = value
        yield feed, got
