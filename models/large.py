"""A large MatMul model with external data (issue 7: models past 2 GB), written straight to disk.

    python -m models.large OUT.onnx [--layers 10] [--width 8192]

    x [batch, width] -> (MatMul(W_i) -> Add(b_i) -> Relu) x layers -> y [batch, width]

Each W_i is float32 [width, width] (width 8192: 256 MiB; 10 layers: 2.5 GiB of weights). The
weights are generated one at a time and appended to `OUT.onnx.data`, so building the model never
holds more than one weight in memory. A few small nodes give the lossless passes something to
do: every bias is `Add(b_i_half, b_i_half)` of two constants (folded by `fold`) and an Identity
sits before the output (removed by `cleanup`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def _external(name: str, array: np.ndarray, location: str, offset: int) -> TensorProto:
    """A TensorProto whose data lies at `offset` in `location` (beside the model)."""
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def build(path: str | Path, layers: int = 10, width: int = 8192, seed: int = 0) -> Path:
    """Write the model to `path` and its weights to `path`.data; returns `path`."""
    path = Path(path)
    location = path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    offset = 0
    current = "x"
    with open(path.parent / location, "wb") as data:
        for i in range(layers):
            # Scaled so activations keep a unit-ish size through the stack.
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / width))
            initializers.append(_external(f"W{i}", w, location, offset))
            data.write(w.data)
            offset += w.nbytes
            del w
            half = (rng.standard_normal(width, dtype=np.float32) * np.float32(0.05))
            initializers.append(onnx.numpy_helper.from_array(half, f"b{i}_half"))
            nodes += [
                helper.make_node("Add", [f"b{i}_half", f"b{i}_half"], [f"b{i}"], name=f"bias{i}"),
                helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}"),
                helper.make_node("Relu", [f"add{i}"], [f"h{i}"], name=f"relu{i}"),
            ]
            current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="identity"))
    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="models.large")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def weight_bytes(layers: int, width: int) -> int:
    return layers * width * width * 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.out, args.layers, args.width, args.seed)
    print(f"{path}: {weight_bytes(args.layers, args.width) / 2**30:.2f} GiB of weights in {path.name}.data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
