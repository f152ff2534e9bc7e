"""fp16: run the model in float16, keeping its inputs and outputs float32. Lossy (gated).

Every standard op whose float inputs and outputs can be float16 (by its ONNX schema) runs in
float16, except the ops of `keep` (by default those whose float16 results drift: normalizations,
softmax, reductions, exp/log/pow): a float32 initializer read only by float16 ops becomes float16
(values beyond float16's range are clipped to +-65504 and counted), and a Cast sits wherever a
tensor crosses between the two regions, so graph inputs and outputs keep their names and float32
type. An input whose schema fixes it to float32 (Resize's scales) stays float32. Nodes with
subgraphs and custom-domain ops stay float32; a model with If/Loop/Scan is left as it is (said
in the report). ONNX Runtime's CPU EP runs float16 MatMul, Gemm, Conv, activations and
elementwise ops; the CUDA EP is where it pays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.registry import register
from onnxcomp.subgraphs import NameSpace

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
             "GroupNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
             "ReduceL2", "ReduceLogSumExp", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Range", "CumSum", "Einsum",
             "TopK", "NonMaxSuppression", "RoiAlign")
NEUTRAL = {"Shape", "Size"}  # read any float type: never cast for them
FP16_MAX = float(np.finfo(np.float16).max)


def _schema(node: gs.Node, opset: int):
    try:
        return onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return None


def _allows_fp16(schema, type_str: str) -> bool:
    if type_str.startswith("tensor("):
        return type_str == "tensor(float16)"
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == type_str), [])
    return "tensor(float16)" in allowed


def _formal(params, index: int):
    """The schema parameter of input/output `index` (a variadic last one covers the rest)."""
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    return last if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None


@register
class Fp16(Pass):
    """Run the model in float16 (inputs and outputs stay float32), with normalizations kept in float32."""

    name = "fp16"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        keep: tuple[str, ...] = param(KEEP_FP32, "op types kept in float32")

    def run(self, model, ctx) -> PassResult:
        graph = model.graph
        if any(gu.has_subgraph(n) for n in graph.nodes):
            return PassResult(changed=False, stats={"skipped": "the model has If/Loop/Scan subgraphs"})
        facts = gu.infer_types(model.to_proto(weights=False))

        def is_float(tensor) -> bool:
            if isinstance(tensor, gs.Constant):
                return np.dtype(tensor.dtype) == np.float32 if tensor.dtype is not None else False
            return gu.elem_type(facts, tensor) == FLOAT

        half = {id(n) for n in graph.nodes if self._eligible(n, model.opset, is_float)}
        names = NameSpace(graph)
        casts: dict[tuple[int, int], gs.Variable] = {}
        halves: dict[tuple[int, int], gs.Constant] = {}
        stats: Counter = Counter()
        consumers = gu.consumers_map(graph)
        made_half = {id(t) for n in graph.nodes if id(n) in half for t in n.outputs if is_float(t)}
        own: set[int] = set()  # the Casts this pass adds
        for out in list(graph.outputs):  # graph outputs stay float32 under their names: the float16
            if id(out) not in made_half:  # value gets a new name, and a Cast writes the output
                continue
            inner = gs.Variable(names.unique(out.name + "_fp16"), shape=out.shape)
            producer = out.inputs[0]
            producer.outputs[producer.outputs.index(out)] = inner
            for reader in consumers.get(id(out), []):  # readers inside the graph read the float16 value
                for k, t in enumerate(list(reader.inputs)):
                    if t is out:
                        reader.inputs[k] = inner
            graph.nodes.append(gs.Node("Cast", names.unique(out.name + "_to_fp32"), {"to": FLOAT},
                                       inputs=[inner], outputs=[out]))
            own.add(id(graph.nodes[-1]))
            made_half.discard(id(out))
            made_half.add(id(inner))
            stats["casts"] += 1
        for node in graph.nodes:  # tensors made by float16 nodes are float16 from here on
            for tensor in node.outputs:
                if id(tensor) in made_half:
                    tensor.dtype = np.float16
        for node in [n for n in graph.nodes if id(n) not in own]:
            schema = _schema(node, model.opset)
            for i, tensor in enumerate(node.inputs):
                if not tensor.name or not is_float(tensor) and id(tensor) not in made_half or node.op in NEUTRAL:
                    continue
                want = self._wanted(node, i, schema, half)
                have = FLOAT16 if id(tensor) in made_half else FLOAT
                if want is None or want == have:
                    continue
                if isinstance(tensor, gs.Constant) and want == FLOAT16:
                    if (id(tensor), FLOAT16) not in halves:  # one float16 copy per weight
                        halves[(id(tensor), FLOAT16)] = self._half_constant(tensor, names, stats)
                    node.inputs[i] = halves[(id(tensor), FLOAT16)]
                    continue
                node.inputs[i] = self._cast(graph, tensor, want, names, casts)
        stats["casts"] += len(casts)
        stats["nodes_fp16"] = len(half)
        stats["nodes_fp32"] = sum(1 for n in graph.nodes if id(n) not in half and n.op != "Cast")
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed=bool(half), stats=dict(stats))

    def _eligible(self, node: gs.Node, opset: int, is_float) -> bool:
        """A standard op outside `keep`, with a float32 output, all of whose float outputs may be float16."""
        if not gu.is_standard(node) or node.op in self.config.keep or node.op in NEUTRAL or gu.has_subgraph(node):
            return False
        if any(k in node.attrs for k in ("to", "dtype", "value", "output_datatype")):
            return False  # ops that name their own type (Cast, ConstantOfShape, Random*, Constant...)
        floats = [i for i, t in enumerate(node.outputs) if t.name and is_float(t)]
        schema = _schema(node, opset)
        if not floats or schema is None:
            return False
        return all((p := _formal(schema.outputs, i)) is not None and _allows_fp16(schema, p.type_str) for i in floats)

    @staticmethod
    def _wanted(node: gs.Node, index: int, schema, half: set[int]) -> int | None:
        """The float type input `index` must have: float32 outside the float16 region; inside it,
        float16 where the schema types it with an output's type variable, float32 where the schema
        fixes float32, and either (None) otherwise."""
        if id(node) not in half:
            return FLOAT
        param_in = _formal(schema.inputs, index) if schema is not None else None
        if param_in is None:
            return FLOAT
        if param_in.type_str.startswith("tensor("):
            return FLOAT16 if param_in.type_str == "tensor(float16)" else FLOAT
        if any(p.type_str == param_in.type_str for p in schema.outputs):
            return FLOAT16
        return None if _allows_fp16(schema, param_in.type_str) else FLOAT

    @staticmethod
    def _half_constant(tensor: gs.Constant, names: NameSpace, stats: Counter) -> gs.Constant:
        values = np.asarray(tensor.values, np.float32)
        over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
        stats["values_clipped"] += int(over.sum())
        halved = np.where(over, np.sign(values) * FP16_MAX, values).astype(np.float16)
        stats["weights_fp16"] += 1
        return gs.Constant(names.unique(tensor.name + "_fp16"), halved)

    @staticmethod
    def _cast(graph: gs.Graph, tensor: gs.Tensor, to: int, names: NameSpace, casts: dict) -> gs.Variable:
        key = (id(tensor), to)
        if key not in casts:
            suffix = "_fp16" if to == FLOAT16 else "_fp32"
            out = gs.Variable(names.unique(tensor.name + suffix), dtype=np.float16 if to == FLOAT16 else np.float32)
            graph.nodes.append(gs.Node("Cast", names.unique(tensor.name + "_cast" + suffix), {"to": to},
                                       inputs=[tensor], outputs=[out]))
            casts[key] = out
        return casts[key]
