"""Per-channel weight scales only where they buy accuracy.

One scale per output channel keeps every channel's resolution, but spreads each channel over the
whole int8 range, and the entropy coder pays for that: on Ultraface the packed int8 file is 43 %
larger per channel than per tensor, at the same face-probability cosine. So each weight asked
per channel is tried per tensor too, alone, in the float model (weight rounding only, one ORT
session for all: onnxcomp.override), and keeps one scale when that moves the model's outputs by
less than `bound` (relative squared error on calibration samples). A depthwise conv whose
channels differ widely fails it and stays per channel.
"""

from __future__ import annotations

import time

import numpy as np

from onnxcomp import hessian as hs
from onnxcomp.override import OverrideRunner
from onnxcomp.quant.placement import weight_axis
from onnxcomp.quant.qdq import dequantize_array, quantize_array, weight_params

SAMPLES = 8
BUDGET_S = 30.0  # seconds of trials; past it, the remaining (smaller) weights keep per-channel scales


def per_tensor_enough(model, feeds, bound: float, weight_type: str = "int8", reduce_range: bool = False
                      ) -> tuple[set[str], dict[str, float]]:
    """(weights that may keep one scale, the measured output error of each tried)."""
    layers = [layer for layer in hs.find_weight_layers(model, ("Conv", "Gemm", "MatMul"))
              if weight_axis(layer.nodes[0], 1, len(layer.weight.shape), True) is not None]
    if not layers:
        return set(), {}
    runner = OverrideRunner(model, [layer.name for layer in layers], feeds, SAMPLES, budget=(len(layers), BUDGET_S))
    errors = {}
    started = time.perf_counter()
    for layer in sorted(layers, key=lambda item: -int(np.prod(item.weight.shape))):  # the largest weights first
        if time.perf_counter() - started > BUDGET_S:
            break  # the rest stay per channel: the accurate choice, only less compact
        w = np.asarray(layer.weight.values, np.float32)
        wp = weight_params(w, None, weight_type, reduce_range)
        errors[layer.name] = runner.error({layer.name: dequantize_array(quantize_array(w, wp, reduce_range), wp)})
    return {name for name, e in errors.items() if e <= bound}, errors
