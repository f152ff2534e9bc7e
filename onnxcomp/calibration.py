"""Activation capture through ONNX Runtime: expose intermediate tensors as extra graph outputs
and yield them batch by batch, so a caller can stream statistics without holding every
activation in memory. The data sources (.npz, folders, readers, images) live in onnxcomp.feeds
and are re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx

from onnxcomp.feeds import IMAGE_SUFFIXES, CalibrationData, ImagePreprocess  # noqa: F401  (re-exported)


def tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every tensor ONNX shape inference can type (inputs, outputs, value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # inference is best-effort: a model ORT runs may still defeat it
        inferred = proto
    graph = inferred.graph
    return {vi.name: vi.type for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}


def with_extra_outputs(proto: onnx.ModelProto, names: Iterable[str], typed: bool = True) -> onnx.ModelProto:
    """A copy of the model whose graph also outputs the named intermediate tensors.

    `typed=False` skips shape inference (ORT accepts untyped outputs): much faster on big models.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    types = tensor_types(proto) if typed else {}
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name in existing:
            continue
        vi = out.graph.output.add(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
    return out


def capture(model, names: list[str], data: Iterable[dict[str, np.ndarray]], provider: str = "cpu",
            threads: int | None = None, typed: bool = True
            ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {tensor name: value}) for every calibration feed, one batch at a time.

    `typed=False`: the extra outputs are left untyped (no shape inference), see with_extra_outputs.
    """
    from onnxcomp.model import Model
    from onnxcomp.runtime import make_session, run

    proto = model.to_proto() if isinstance(model, Model) else model
    session = make_session(with_extra_outputs(proto, names, typed), provider, threads=threads)
    for feed in data:
        yield feed, run(session, feed, list(names))
