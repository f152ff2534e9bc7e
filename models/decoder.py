"""A Llama-shaped decoder of any size with random weights, written straight to external data (issue 19).

    python -m models.decoder OUT.onnx --size 30G     (or 300M, 4G, ...; decimal units)

    input_ids [batch, seq] -> Gather(embedding) -> N x (RMSNorm -> q/k/v MatMuls -> causal softmax
    attention -> o MatMul -> residual; RMSNorm -> gate/up MatMuls -> SiLU(gate) * up -> down MatMul
    -> residual) -> RMSNorm -> lm_head MatMul -> logits [batch, seq, vocab]

The shapes are Llama's (head size 128, MLP width ~2.7x, vocabulary 32000); the hidden size is the
largest of 512/1024/2048/4096 that leaves at least 8 blocks, and the block count fills `--size`
(30G: hidden 4096, 36 blocks, the Llama-2-7B shape four blocks longer: 30.2 GB). No rotary
embedding: it has no weights and changes nothing for the passes. Weights are float32, drawn one
tensor at a time and appended to `OUT.onnx.data`, so building never holds more than one tensor
(the 524 MB lm_head at 30G). The residual projections (o, down) are scaled by 1/sqrt(2 * blocks),
as GPT-2 initialises them, so the random model's residual stream stays dominated by the
embedding and 4-bit rounding errors do not compound through the blocks.

A few small nodes give the lossless passes something to do: each block carries its own copy of
the reshape shapes and of the attention scale, computed as 1 / Sqrt(head size) from constants
(cleanup merges the copies, fold computes the scale), and an Identity sits before the output.

`reference_logits` computes the logits of a one-token input in numpy, reading one weight at a
time, so a model larger than memory can be checked without running it in ORT.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from models.large import _external

VOCAB = 32000
HEAD = 128
EPS = 1e-5
MIN_BLOCKS = 8


@dataclass(frozen=True)
class Shape:
    hidden: int
    mlp: int
    blocks: int
    vocab: int = VOCAB

    @property
    def heads(self) -> int:
        return self.hidden // HEAD

    def weight_bytes(self) -> int:
        per_block = 4 * self.hidden * self.hidden + 3 * self.hidden * self.mlp
        return 4 * (2 * self.vocab * self.hidden + self.blocks * per_block)


def mlp_width(hidden: int) -> int:
    """Llama's 8/3 x hidden rounded up to a multiple of 256 (4096 -> 11008)."""
    return -(-(8 * hidden // 3) // 256) * 256


def shape_for(size: int) -> Shape:
    """The widest Llama-like shape with at least MIN_BLOCKS blocks whose weights reach `size`
    bytes (blocks rounded up: --size 30G is at least 30 GB)."""
    for hidden in (4096, 2048, 1024, 512):
        base = Shape(hidden, mlp_width(hidden), 0)
        per_block = Shape(hidden, base.mlp, 1).weight_bytes() - base.weight_bytes()
        blocks = -(-(size - base.weight_bytes()) // per_block)
        if blocks >= MIN_BLOCKS or hidden == 512:
            return Shape(hidden, base.mlp, max(1, int(blocks)))
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'30G', '300M', '1.5G', or a byte count (decimal units)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 300M or 30G)")
    return int(float(match.group(1)) * 10 ** (3 * " KMGT".index(match.group(2) or " ")))


def _weight_names(shape: Shape) -> list[tuple[str, tuple[int, int], float]]:
    """(name, shape, standard deviation) of every large weight, in file order."""
    h, m = shape.hidden, shape.mlp
    residual = 1 / np.sqrt(2 * shape.blocks)
    out = [("embed", (shape.vocab, h), 1.0)]
    for b in range(shape.blocks):
        out += [(f"b{b}.q", (h, h), h ** -0.5), (f"b{b}.k", (h, h), h ** -0.5), (f"b{b}.v", (h, h), h ** -0.5),
                (f"b{b}.o", (h, h), h ** -0.5 * residual),
                (f"b{b}.gate", (h, m), h ** -0.5), (f"b{b}.up", (h, m), h ** -0.5),
                (f"b{b}.down", (m, h), m ** -0.5 * residual)]
    return out + [("lm_head", (h, shape.vocab), h ** -0.5)]


def _norm_weight(rng, hidden: int) -> np.ndarray:
    return (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)


class _Graph:
    """Nodes and small initializers, with names made unique."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self.count += 1
        out = name or f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.count}", **attrs))
        return out

    def rmsnorm(self, x: str, weight: str, eps: str) -> str:
        mean_square = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inverse = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [mean_square, eps])])])
        return self.op("Mul", [self.op("Mul", [x, inverse]), weight])


def build(path: str | Path, size: int | str = "300M", seed: int = 0) -> Path:
    """Write the decoder to `path` and its weights to `path`.data; returns `path`."""
    shape = shape_for(parse_size(size) if isinstance(size, str) else size)
    path = Path(path)
    location = path.name + ".data"
    rng = np.random.default_rng(seed)
    g = _Graph()
    weights, offset = [], 0
    with open(path.parent / location, "wb") as data:
        for name, dims, std in _weight_names(shape):
            tensor = np.empty(dims, np.float32)
            for rows in range(0, dims[0], 1024):  # drawn in slices: no float64 copy of the whole tensor
                block = rng.standard_normal((min(1024, dims[0] - rows), dims[1]), dtype=np.float32)
                block *= np.float32(std)
                tensor[rows:rows + len(block)] = block
            weights.append(_external(name, tensor, location, offset))
            data.write(tensor.data)
            offset += tensor.nbytes
            del tensor

    h, heads = shape.hidden, shape.heads
    eps = g.const("eps", np.array(EPS, np.float32))
    # The causal mask: 0 on and below the diagonal, -1e9 above, from the sequence length.
    seq = g.op("Slice", ["input_ids_shape", g.const("one_i", np.array([1])), g.const("two_i", np.array([2]))])
    g.nodes.insert(0, helper.make_node("Shape", ["input_ids"], ["input_ids_shape"], name="Shape_0"))
    ones = g.op("ConstantOfShape", [g.op("Concat", [seq, seq], axis=0)],
                value=numpy_helper.from_array(np.array([1], np.float32)))
    lower = g.op("Trilu", [ones], upper=0)
    mask = g.op("Mul", [g.op("Sub", [lower, g.const("one_f", np.array(1, np.float32))]),
                        g.const("big", np.array(1e9, np.float32))])
    x = g.op("Gather", ["embed", "input_ids"], axis=0)
    for b in range(shape.blocks):
        split = g.const(f"b{b}.split_shape", np.array([0, 0, heads, HEAD]))
        join = g.const(f"b{b}.join_shape", np.array([0, 0, h]))
        scale = g.op("Reciprocal", [g.op("Sqrt", [g.const(f"b{b}.head_size", np.array(HEAD, np.float32))])])
        n1 = g.rmsnorm(x, g.const(f"b{b}.attn_norm", _norm_weight(rng, h)), eps)
        q, k, v = (g.op("Reshape", [g.op("MatMul", [n1, f"b{b}.{w}"]), split]) for w in "qkv")
        scores = g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1, 3]), g.op("Transpose", [k], perm=[0, 2, 3, 1])])
        probs = g.op("Softmax", [g.op("Add", [g.op("Mul", [scores, scale]), mask])], axis=-1)
        attended = g.op("MatMul", [probs, g.op("Transpose", [v], perm=[0, 2, 1, 3])])
        joined = g.op("Reshape", [g.op("Transpose", [attended], perm=[0, 2, 1, 3]), join])
        x = g.op("Add", [x, g.op("MatMul", [joined, f"b{b}.o"])])
        n2 = g.rmsnorm(x, g.const(f"b{b}.mlp_norm", _norm_weight(rng, h)), eps)
        gate = g.op("MatMul", [n2, f"b{b}.gate"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), g.op("MatMul", [n2, f"b{b}.up"])])
        x = g.op("Add", [x, g.op("MatMul", [act, f"b{b}.down"])])
    final = g.rmsnorm(x, g.const("final_norm", _norm_weight(rng, h)), eps)
    g.op("Identity", [g.op("MatMul", [final, "lm_head"])], name="logits")
    graph = helper.make_graph(
        g.nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", shape.vocab])],
        initializer=weights + g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="models.decoder")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def reference_logits(path: str | Path, token: int) -> np.ndarray:
    """The logits [vocab] of the one-token input `token` (a single token attends only to itself:
    the attention output is its value row), in float64 numpy, one weight read at a time through
    onnxcomp's memory maps. Works on the decoder as built and after lossless passes (the weight
    and norm names stay), not on a quantized one."""
    from onnxcomp.model import load, peek_values

    model = load(path)
    consts = model.initializers()

    def w(name: str) -> np.ndarray:
        return np.asarray(peek_values(consts[name]), np.float64)

    def rmsnorm(x, name):
        return x / np.sqrt(np.mean(x * x) + EPS) * w(name)

    x = np.asarray(peek_values(consts["embed"])[token], np.float64)
    blocks = sum(1 for name in consts if name.endswith(".q"))
    for b in range(blocks):
        x = x + (rmsnorm(x, f"b{b}.attn_norm") @ w(f"b{b}.v")) @ w(f"b{b}.o")
        n2 = rmsnorm(x, f"b{b}.mlp_norm")
        gate = n2 @ w(f"b{b}.gate")
        x = x + (gate / (1 + np.exp(-gate)) * (n2 @ w(f"b{b}.up"))) @ w(f"b{b}.down")
    return rmsnorm(x, "final_norm") @ w("lm_head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--size", default="300M", help="about this many bytes of weights (decimal: 300M, 30G)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = shape_for(parse_size(args.size))
    path = build(args.out, args.size, args.seed)
    print(f"{path}: {shape}, {shape.weight_bytes() / 1e9:.2f} GB of weights in {path.name}.data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
