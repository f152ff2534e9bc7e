"""A small voice-activity-detector-shaped model, built here: the shape of silero-VAD's ONNX export
without its weights. What makes such models hard for tools is kept: an `If` on the sample rate
whose branches hold the weights (and read outer-scope values), a 0-d int64 input `sr`, and a
recurrent `state` input whose batch axis is not axis 0, fed back from output `stateN`.

    input  float32 [1, 512]   one audio chunk
    state  float32 [2, 1, 64] recurrent state (axis 1 is the batch)
    sr     int64   []         sample rate: 16000 takes the `then` branch, anything else `else`
    output float32 [1, 1]     speech probability
    stateN float32 [2, 1, 64] the next state

Weights are random, scaled to keep activations in range (a shape and data-path test model, not
a detector), and seeded, so every build gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHUNK, HIDDEN = 512, 64


def _weight(rng, name: str, rows: int, cols: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name)


def _branch(rng, name: str, frames: int) -> onnx.GraphProto:
    """x (outer scope) framed into `frames` pieces -> MatMul -> + state summary (outer scope) -> Tanh."""
    nodes = [
        helper.make_node("Reshape", ["input", f"{name}_frames"], [f"{name}_framed"]),
        helper.make_node("MatMul", [f"{name}_framed", f"{name}_w1"], [f"{name}_h1"]),
        helper.make_node("Relu", [f"{name}_h1"], [f"{name}_r1"]),
        helper.make_node("ReduceMean", [f"{name}_r1"], [f"{name}_pooled"], axes=[0], keepdims=0),
        helper.make_node("Reshape", [f"{name}_pooled", "row_shape"], [f"{name}_row"]),
        helper.make_node("MatMul", [f"{name}_row", f"{name}_w2"], [f"{name}_h2"]),
        helper.make_node("Add", [f"{name}_h2", "state_summary"], [f"{name}_sum"]),
        helper.make_node("Tanh", [f"{name}_sum"], [f"{name}_hidden"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([frames, CHUNK // frames], np.int64), f"{name}_frames"),
        _weight(rng, f"{name}_w1", CHUNK // frames, 128),
        _weight(rng, f"{name}_w2", 128, HIDDEN),
    ]
    out = helper.make_tensor_value_info(f"{name}_hidden", TensorProto.FLOAT, [1, HIDDEN])
    return helper.make_graph(nodes, name, [], [out], inits)


def build_vad(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"]),
        helper.make_node("ReduceMean", ["state"], ["state_mean"], axes=[0], keepdims=0),
        helper.make_node("Reshape", ["state_mean", "row_shape"], ["state_summary"]),
        helper.make_node("If", ["is_16k"], ["hidden"], then_branch=_branch(rng, "then16k", 8),
                         else_branch=_branch(rng, "else8k", 4)),
        helper.make_node("MatMul", ["hidden", "head_w"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Unsqueeze", ["hidden", "axis0"], ["hidden3"]),
        helper.make_node("Concat", ["hidden3", "hidden3"], ["stateN"], axis=0),
    ]
    inits = [
        numpy_helper.from_array(np.array(16000, np.int64), "sr_16k"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "row_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        _weight(rng, "head_w", HIDDEN, 1),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, CHUNK]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, HIDDEN]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, HIDDEN])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxcomp-models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def audio_chunks(count: int, seed: int = 0, rate: int = 16000) -> list[np.ndarray]:
    """Speech-like chunks: a few harmonics under a syllable-rate envelope, plus noise."""
    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(count):
        t = np.arange(CHUNK) / rate
        pitch = rng.uniform(90, 250)
        voiced = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 5))
        envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6.3)), 0, None)
        signal = rng.uniform(0, 0.5) * voiced * envelope + rng.normal(0, 0.02, CHUNK)
        chunks.append(signal.astype(np.float32)[None])
    return chunks


def feeds(count: int, seed: int = 0, rate: int = 16000) -> list[dict[str, np.ndarray]]:
    """One feed per chunk, the state zero (callers carry it with --carry-state stateN=state)."""
    return [{"input": chunk, "state": np.zeros((2, 1, HIDDEN), np.float32), "sr": np.array(rate, np.int64)}
            for chunk in audio_chunks(count, seed, rate)]
