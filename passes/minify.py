"""minify: leave out of the file what ONNX Runtime does not read, for the smallest packed model.

Once the weights are a few bits each, the graph itself is a large share of a small model's packed
file (MNIST's compact .onnxc: 1,155 of 3,487 bytes were the brotli-coded graph skeleton, most of
it names and intermediate type annotations). This pass, run just before `entropy`, removes:

- the value_info of intermediate tensors (ORT infers every type and shape itself at load);
- node names and the model's and graphs' doc strings;
- the graph-input listing of each initializer (IR version 3 requires it; the model is raised to
  IR 4, where an initializer is a constant: a feed can no longer override a weight);
- long tensor names: every tensor except the main graph's inputs and outputs gets a short name
  (`_0`, `_1`, ... in base 36), unique in the whole model.

Outputs are bit-identical (no node is changed). What is lost is for people, not for ORT: the
names a profile or an error message would show. So it is for the lossy presets that write
packed files, whose tensors were renamed by quantization already; never a default of a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.registry import register
from onnxcomp.subgraphs import scopes


@register
class Minify(Pass):
    """Drop intermediate type annotations, node names and doc strings; shorten tensor names (exact)."""

    name = "minify"
    lossless = True
    exact = True

    @dataclass(frozen=True)
    class Config:
        rename: bool = param(True, "give every tensor but the main graph's inputs and outputs a short name")

    def run(self, model, ctx) -> PassResult:
        graph = model.graph
        kept = set(model.kept_types) | set(model.initializer_inputs)  # names other code looks up
        interface = {t.name for t in graph.inputs + graph.outputs} | kept
        stats = {"value_info_dropped": 0, "node_names_dropped": 0, "tensors_renamed": 0, "ir_version_raised": 0}
        if model.ir_version < 4:
            model.ir_version = 4  # initializers need not be listed as inputs from IR 4 on
            stats["ir_version_raised"] = 1
        model.doc_string = ""
        boundary = set()  # every graph's own inputs and outputs keep their types (If/Loop need them)
        existing = set(interface)  # a new name never repeats one a tensor left unvisited still has
        for scope in scopes(graph):
            scope.graph.doc_string = ""
            boundary.update(id(t) for t in scope.graph.inputs + scope.graph.outputs)
            existing.update(t.name for t in scope.graph.tensors().values())
        names = _short_names(existing)
        seen: set[int] = set()
        for scope in scopes(graph):
            for node in scope.graph.nodes:
                if node.name:
                    node.name = ""
                    stats["node_names_dropped"] += 1
                for tensor in list(node.inputs) + list(node.outputs) + scope.graph.inputs + scope.graph.outputs:
                    if tensor is None or id(tensor) in seen or not tensor.name:
                        continue
                    seen.add(id(tensor))
                    if (isinstance(tensor, gs.Variable) and id(tensor) not in boundary and tensor.name not in kept
                            and (tensor.dtype is not None or tensor.shape is not None)):
                        tensor.dtype, tensor.shape = None, None  # graphsurgeon then writes no value_info
                        stats["value_info_dropped"] += 1
                    if self.config.rename and tensor.name not in interface:
                        tensor.name = next(names)
                        stats["tensors_renamed"] += 1
        return PassResult(changed=any(stats.values()), stats=stats)


def _short_names(taken: set[str]):
    """`_0`, `_1`, ... `_z`, `_10`, ...: base 36, skipping any name the model keeps."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    count = 0
    while True:
        n, text = count, ""
        while True:
            n, r = divmod(n, 36)
            text = digits[r] + text
            if not n:
                break
        count += 1
        if "_" + text not in taken:
            yield "_" + text

