"""Keep the types graphsurgeon cannot write back: sequence, optional, map and opaque types, and
type-valued node attributes (`Optional(type=...)`).

onnx-graphsurgeon reads these types but its exporter only writes plain tensors, and sequences
without their element shape (an `optional(tensor)` input ends in an UnboundLocalError inside it;
`sequence(tensor[N])` comes back as `sequence(tensor)`); its importer skips TYPE_PROTO attributes.
So the exact TypeProto of every such value is kept from the loaded file, the value is exported
untyped, and the kept type is written back into the exported proto by name (no pass changes the
type of such a value). A type attribute travels through graphsurgeon as a tagged string attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph_utils import iter_nodes, subgraphs


def _graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph in it, at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_protos(sub)


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in _graph_protos(graph):
        yield from g.input
        yield from g.output
        yield from g.value_info


def _is_plain(tp: onnx.TypeProto) -> bool:
    """A type graphsurgeon writes back exactly: a tensor or a sparse tensor."""
    return tp.WhichOneof("value") in ("tensor_type", "sparse_tensor_type", None)


def types_to_keep(proto: onnx.ModelProto) -> dict[str, bytes]:
    """Serialized TypeProto of every value whose type graphsurgeon cannot write, by name."""
    return {vi.name: vi.type.SerializeToString() for vi in _value_infos(proto.graph) if not _is_plain(vi.type)}


def _tensors(graph: gs.Graph) -> Iterator[gs.Tensor]:
    yield from graph.inputs
    yield from graph.outputs
    for node in iter_nodes(graph):
        yield from node.inputs
        yield from node.outputs
        for sub in subgraphs(node):
            yield from sub.inputs
            yield from sub.outputs


@contextmanager
def untyped_for_export(graph: gs.Graph, types: dict[str, bytes]):
    """Export the kept-type values without a type (restored after), so graphsurgeon can write them."""
    changed = []
    if types:
        for tensor in _tensors(graph):
            if tensor.name in types and isinstance(tensor, gs.Variable) and tensor.dtype is not None:
                changed.append((tensor, tensor.dtype, tensor.shape))
                tensor.dtype, tensor.shape = None, None
    try:
        yield
    finally:
        for tensor, dtype, shape in changed:
            tensor.dtype, tensor.shape = dtype, shape


def restore_types(proto: onnx.ModelProto, types: dict[str, bytes]) -> None:
    """Write the kept types back into the exported proto."""
    if not types:
        return
    for vi in _value_infos(proto.graph):
        if vi.name in types:
            vi.type.CopyFrom(onnx.TypeProto.FromString(types[vi.name]))


TYPE_TAG = "onnxcomp-type-proto:"  # a string attribute carrying a TYPE_PROTO attribute's value, in hex


def _type_attributes(graph: onnx.GraphProto) -> Iterator[onnx.AttributeProto]:
    for g in _graph_protos(graph):
        for node in g.node:
            yield from (a for a in node.attribute if a.type == onnx.AttributeProto.TYPE_PROTO)


@contextmanager
def type_attributes_as_strings(proto: onnx.ModelProto):
    """While graphsurgeon imports the proto, its TYPE_PROTO attributes are tagged strings (then put
    back, so the caller's proto is unchanged)."""
    changed = []
    for attr in list(_type_attributes(proto.graph)):
        original = onnx.AttributeProto()
        original.CopyFrom(attr)
        changed.append((attr, original))
        attr.Clear()
        attr.name, attr.type = original.name, onnx.AttributeProto.STRING
        attr.s = (TYPE_TAG + original.tp.SerializeToString().hex()).encode()
    try:
        yield
    finally:
        for attr, original in changed:
            attr.CopyFrom(original)


def restore_type_attributes(proto: onnx.ModelProto) -> None:
    """Turn the tagged string attributes of an exported proto back into TYPE_PROTO attributes."""
    tag = TYPE_TAG.encode()
    for g in _graph_protos(proto.graph):
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.STRING and attr.s.startswith(tag):
                    tp = onnx.TypeProto.FromString(bytes.fromhex(attr.s[len(tag):].decode()))
                    name = attr.name
                    attr.Clear()
                    attr.name, attr.type = name, onnx.AttributeProto.TYPE_PROTO
                    attr.tp.CopyFrom(tp)
