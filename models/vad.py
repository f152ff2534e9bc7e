"""A silero-VAD-style model built in code (no weights downloaded): its weights live in If branches.

    input float32 [1, 512], state float32 [2, 1, 64] (batch on axis 1), sr int64 (0-d)
    If(sr == 16000)
      then (16 kHz): Conv -> Relu -> Conv -> Relu -> mean over time -> Concat(state[0]) -> Gemm -> Tanh
                     -> If(sum(input) > 0) { MatMul(Wa) | MatMul(Wb) -> Relu }   (nested, reads hN)
                     -> MatMul -> Sigmoid
      else (8 kHz):  Conv -> Relu -> Conv -> Relu -> mean over time
                     -> Loop x2 { h = Tanh(MatMul(Concat(h, feat), Wl) + bl) }   (reads `feat` from outside)
                     -> MatMul -> Sigmoid
    outputs: output [1, 1], stateN [2, 1, 64]

Every weight is an initializer of the subgraph that uses it; branches read `input` and `state`
from the outer scope. Weights look trained (smooth filters, low-rank structure, heavy tails),
not uniform noise, so quantization errors are of a realistic size.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _conv_filters(rng, out_ch: int, in_ch: int, taps: int) -> np.ndarray:
    raw = rng.standard_normal((out_ch, in_ch, taps + 4))
    kernel = np.array([1, 4, 6, 4, 1], float) / 16  # smooth along the taps like learned filters
    smooth = np.stack([[np.convolve(raw[o, i], kernel, "valid") for i in range(in_ch)] for o in range(out_ch)])
    smooth *= rng.laplace(1.0, 0.3, (out_ch, 1, 1))  # channel gains differ
    return (smooth / np.sqrt(in_ch * taps) * 2.0).astype(np.float32)


def _dense(rng, rows: int, cols: int, rank: int = 6) -> np.ndarray:
    low = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rank)
    noise = rng.laplace(0, 0.5, (rows, cols))  # heavy tails: a few large weights, as after training
    return ((0.6 * low + noise) / np.sqrt(max(rows, cols))).astype(np.float32)


def _bias(rng, n: int) -> np.ndarray:
    return rng.normal(0, 0.05, n).astype(np.float32)


def _init(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _front(prefix: str, rng, taps: int, stride: int) -> tuple[list, list]:
    """Reshape(input) -> Conv -> Relu -> Conv -> Relu -> ReduceMean: nodes, initializers; out f"{prefix}_feat"."""
    p = prefix
    inits = [_init(f"{p}_shape", np.array([1, 1, 512], np.int64)),
             _init(f"{p}_conv1_w", _conv_filters(rng, 16, 1, taps)), _init(f"{p}_conv1_b", _bias(rng, 16)),
             _init(f"{p}_conv2_w", _conv_filters(rng, 32, 16, 3)), _init(f"{p}_conv2_b", _bias(rng, 32))]
    pad = (taps - stride) // 2
    nodes = [
        helper.make_node("Reshape", ["input", f"{p}_shape"], [f"{p}_x"], name=f"{p}_reshape"),
        helper.make_node("Conv", [f"{p}_x", f"{p}_conv1_w", f"{p}_conv1_b"], [f"{p}_c1"], name=f"{p}_conv1",
                         strides=[stride], pads=[pad, taps - stride - pad]),
        helper.make_node("Relu", [f"{p}_c1"], [f"{p}_r1"], name=f"{p}_relu1"),
        helper.make_node("Conv", [f"{p}_r1", f"{p}_conv2_w", f"{p}_conv2_b"], [f"{p}_c2"], name=f"{p}_conv2",
                         pads=[1, 1]),
        helper.make_node("Relu", [f"{p}_c2"], [f"{p}_r2"], name=f"{p}_relu2"),
        helper.make_node("ReduceMean", [f"{p}_r2"], [f"{p}_feat"], name=f"{p}_mean", axes=[2], keepdims=0),
    ]
    return nodes, inits


def _inner_if(rng) -> onnx.NodeProto:
    """If(sum(input) > 0): MatMul(hN, Wa) else Relu(MatMul(hN, Wb)); both read hN from outside."""
    then = helper.make_graph(
        [helper.make_node("MatMul", ["hi_h", "hi_wa"], ["hi_ya"], name="hi_matmul_a")], "inner_then", [],
        [helper.make_tensor_value_info("hi_ya", TensorProto.FLOAT, [1, 32])],
        [_init("hi_wa", _dense(rng, 64, 32))])
    other = helper.make_graph(
        [helper.make_node("MatMul", ["hi_h", "hi_wb"], ["hi_mb"], name="hi_matmul_b"),
         helper.make_node("Relu", ["hi_mb"], ["hi_yb"], name="hi_relu_b")], "inner_else", [],
        [helper.make_tensor_value_info("hi_yb", TensorProto.FLOAT, [1, 32])],
        [_init("hi_wb", _dense(rng, 64, 32))])
    return helper.make_node("If", ["hi_positive"], ["hi_y"], name="hi_inner_if", then_branch=then, else_branch=other)


def _branch_16k(rng) -> onnx.GraphProto:
    nodes, inits = _front("hi", rng, taps=16, stride=8)
    inits += [_init("hi_zero", np.array(0, np.int64)), _init("hi_one", np.array([0], np.int64)),
              _init("hi_axes", np.array([0], np.int64)), _init("hi_fzero", np.array(0, np.float32)),
              _init("hi_gemm_w", _dense(rng, 64, 96)), _init("hi_gemm_b", _bias(rng, 64)),
              _init("hi_out_w", 6 * _dense(rng, 32, 1, rank=1))]
    nodes += [
        helper.make_node("Gather", ["state", "hi_zero"], ["hi_h0"], name="hi_state0", axis=0),
        helper.make_node("Concat", ["hi_feat", "hi_h0"], ["hi_cat"], name="hi_concat", axis=1),
        helper.make_node("Gemm", ["hi_cat", "hi_gemm_w", "hi_gemm_b"], ["hi_g"], name="hi_gemm", transB=1),
        helper.make_node("Tanh", ["hi_g"], ["hi_h"], name="hi_tanh"),
        helper.make_node("ReduceSum", ["input"], ["hi_sum"], name="hi_sum", keepdims=0),
        helper.make_node("Greater", ["hi_sum", "hi_fzero"], ["hi_positive"], name="hi_gt"),
        _inner_if(rng),
        helper.make_node("MatMul", ["hi_y", "hi_out_w"], ["hi_logit"], name="hi_out"),
        helper.make_node("Sigmoid", ["hi_logit"], ["hi_output"], name="hi_sigmoid"),
        helper.make_node("Unsqueeze", ["hi_h", "hi_axes"], ["hi_hu"], name="hi_unsq"),
        helper.make_node("Gather", ["state", "hi_one"], ["hi_keep"], name="hi_state1", axis=0),
        helper.make_node("Concat", ["hi_hu", "hi_keep"], ["hi_stateN"], name="hi_stack", axis=0),
    ]
    return helper.make_graph(nodes, "branch_16k", [], [
        helper.make_tensor_value_info("hi_output", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("hi_stateN", TensorProto.FLOAT, [2, 1, 64])], inits)


def _loop_body(rng) -> onnx.GraphProto:
    nodes = [
        helper.make_node("Identity", ["lb_cond"], ["lb_cond_out"], name="lb_cond"),
        helper.make_node("Concat", ["lb_h", "lo_feat"], ["lb_cat"], name="lb_concat", axis=1),
        helper.make_node("MatMul", ["lb_cat", "lb_w"], ["lb_m"], name="lb_matmul"),
        helper.make_node("Add", ["lb_m", "lb_b"], ["lb_a"], name="lb_add"),
        helper.make_node("Tanh", ["lb_a"], ["lb_h_out"], name="lb_tanh"),
    ]
    return helper.make_graph(nodes, "loop_body", [
        helper.make_tensor_value_info("lb_iter", TensorProto.INT64, []),
        helper.make_tensor_value_info("lb_cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("lb_h", TensorProto.FLOAT, [1, 64])], [
        helper.make_tensor_value_info("lb_cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("lb_h_out", TensorProto.FLOAT, [1, 64])],
        [_init("lb_w", _dense(rng, 96, 64)), _init("lb_b", _bias(rng, 64))])


def _branch_8k(rng) -> onnx.GraphProto:
    nodes, inits = _front("lo", rng, taps=8, stride=8)
    inits += [_init("lo_zero", np.array([0], np.int64)), _init("lo_one", np.array(1, np.int64)),
              _init("lo_axes", np.array([0], np.int64)), _init("lo_trips", np.array(2, np.int64)),
              _init("lo_true", np.array(True)), _init("lo_out_w", 6 * _dense(rng, 64, 1, rank=1))]
    nodes += [
        helper.make_node("Gather", ["state", "lo_one"], ["lo_h0"], name="lo_state1", axis=0),
        helper.make_node("Loop", ["lo_trips", "lo_true", "lo_h0"], ["lo_h"], name="lo_loop", body=_loop_body(rng)),
        helper.make_node("MatMul", ["lo_h", "lo_out_w"], ["lo_logit"], name="lo_out"),
        helper.make_node("Sigmoid", ["lo_logit"], ["lo_output"], name="lo_sigmoid"),
        helper.make_node("Unsqueeze", ["lo_h", "lo_axes"], ["lo_hu"], name="lo_unsq"),
        helper.make_node("Gather", ["state", "lo_zero"], ["lo_keep"], name="lo_state0", axis=0),
        helper.make_node("Concat", ["lo_keep", "lo_hu"], ["lo_stateN"], name="lo_stack", axis=0),
    ]
    return helper.make_graph(nodes, "branch_8k", [], [
        helper.make_tensor_value_info("lo_output", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("lo_stateN", TensorProto.FLOAT, [2, 1, 64])], inits)


def vad_model(seed: int = 0) -> onnx.ModelProto:
    """The VAD-style model (see the module docstring); checked by onnx.checker."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"], name="is_16k"),
         helper.make_node("If", ["is_16k"], ["output", "stateN"], name="sample_rate_if",
                          then_branch=_branch_16k(rng), else_branch=_branch_8k(rng))],
        "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 512]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 64]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 64])],
        [_init("sr_16k", np.array(16000, np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def vad_feeds(count: int, seed: int = 1, rates: tuple[int, ...] = (16000, 8000)) -> list[dict[str, np.ndarray]]:
    """Audio-like feeds (tones + noise, some with a DC offset of either sign), sample rates alternating."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    feeds = []
    for i in range(count):
        tones = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 3000) * t + rng.uniform(0, 6))
                    for _ in range(3))
        audio = tones + rng.normal(0, 0.02, 512) + (0.05 if i % 4 < 2 else -0.05)
        state = np.tanh(rng.normal(0, 0.5, (2, 1, 64)))
        feeds.append({"input": audio[None].astype(np.float32), "state": state.astype(np.float32),
                      "sr": np.array(rates[i % len(rates)], np.int64)})
    return feeds


SUBGRAPH_WEIGHTS = ("hi_conv1_w", "hi_conv2_w", "hi_gemm_w", "hi_wa", "hi_wb", "hi_out_w",
                    "lo_conv1_w", "lo_conv2_w", "lb_w", "lo_out_w")
