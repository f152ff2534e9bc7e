"""Issue 15's VAD acceptance: a silero-VAD-shaped model (If branches holding the weights, 0-d `sr`,
a state whose batch is axis 1) takes calibration data from .npz and from Python, and `--preset
int8` quantizes the weights inside its branches under the default gate; the printed figure is
what an independent ORT run on the held-out samples measures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxcomp
from models.vad import vad_feeds, vad_model
from onnxcomp.context import Tolerance
from onnxcomp.runtime import make_session, run
from onnxcomp.validate import compare_arrays

from .helpers import run_cli_here

SAMPLES = 24  # the default gate holds out the last 12


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    onnx.save(vad_model(), folder / "vad.onnx")
    feeds = vad_feeds(SAMPLES)  # sample rates alternate: both branches are calibrated and judged
    np.savez(folder / "cal.npz", **{f"sample_{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    return folder, feeds


def _independent_cosines(original, written, feeds):
    ref, cand = make_session(original), make_session(written)
    outs = [o.name for o in ref.get_outputs()]
    ref_out, cand_out = [run(ref, f) for f in feeds], [run(cand, f) for f in feeds]
    return {name: compare_arrays(name, [r[name] for r in ref_out], [c[name] for c in cand_out],
                                 Tolerance(atol=float("inf"))).cosine for name in outs}


def test_int8_from_an_npz_quantizes_the_branch_weights_and_the_gate_figure_is_true(vad):
    folder, feeds = vad
    out = folder / "int8.onnx"
    done = run_cli_here("optimize", folder / "vad.onnx", "-o", out, "--preset", "int8",
                        "--calibration", folder / "cal.npz", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    stats = next(p["stats"] for p in report["passes"] if p["spec"].startswith("quantize"))
    assert stats["subgraph_weights_quantized"] >= 8, stats  # the weights live in the If branches
    assert report["validation"]["passed"] is True and report["validation"]["samples"] == SAMPLES // 2
    measured = _independent_cosines(folder / "vad.onnx", out, feeds[SAMPLES // 2:])
    for name, figures in report["gate"]["per_output"].items():
        assert figures["cosine"] >= 0.99
        assert round(figures["cosine"], 3) == round(measured[name], 3)
    branch_ops = {n.op_type for node in onnx.load(out).graph.node if node.op_type == "If"
                  for attr in node.attribute for n in attr.g.node}
    assert "DequantizeLinear" in branch_ops  # QDQ placed inside the branches themselves


def test_int8_from_a_python_reader_gives_the_same_gated_quantization(vad):
    from onnxruntime.quantization import CalibrationDataReader

    folder, feeds = vad

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(vad_feeds(SAMPLES))

        def get_next(self):
            return next(self.items, None)

    result = onnxcomp.optimize(folder / "vad.onnx", "fold, cleanup, fuse, quantize(per_channel=true)",
                               calibration=Reader())
    stats = next(p.stats for p in result.report.passes if p.spec.startswith("quantize"))
    assert stats["subgraph_weights_quantized"] >= 8
    assert result.report.validation["passed"] is True
    assert result.report.gate["cosine"] >= 0.99


def test_distill_refuses_a_model_with_a_0d_input_in_one_line(vad):
    from .helpers import assert_one_line_error

    folder, _ = vad
    out = folder / "distilled.onnx"
    done = run_cli_here("distill", folder / "vad.onnx", folder / "vad.onnx", "-o", out, "--data", folder / "cal.npz")
    assert_one_line_error(done, "input 'sr' is 0-d")
    assert done.returncode == 2 and not out.exists()
