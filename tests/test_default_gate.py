"""The accuracy gate is on by default for every lossy pipeline (onnxcomp.checking): judged on a
held-out part of the user's calibration data, one verdict and one figure, refused without data
unless --no-gate, nothing written below the gate unless --keep-failed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxcomp.gate import is_score_map, score_agreement
from onnxcomp.runtime import make_session, run
from onnxcomp.validate import compare_arrays
from onnxcomp.context import Tolerance

from .helpers import assert_one_line_error, run_cli_here


@pytest.fixture
def mnist_calibration(mnist_path, tmp_path):
    from models.real import _mnist_data

    images = _mnist_data()[0][:16].reshape(16, 1, 1, 28, 28).astype(np.float32)  # [samples, 1, 1, 28, 28]
    path = tmp_path / "cal.npz"
    np.savez(path, Input3=images)
    return path, [{"Input3": x} for x in images]


def _held_out_cosine(original, written, feeds):
    ref, cand = make_session(original), make_session(written)
    name = ref.get_outputs()[0].name
    result = compare_arrays(name, [run(ref, f)[name] for f in feeds], [run(cand, f)[name] for f in feeds],
                            Tolerance(atol=float("inf")))
    return result.cosine


def test_a_lossy_preset_with_only_calibration_is_gated_on_held_out_samples_and_the_figure_is_true(
        mnist_path, mnist_calibration, tmp_path):
    calibration, feeds = mnist_calibration
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.9)",
                        "--calibration", calibration, "--json")
    report = json.loads(done.stdout) if done.returncode == 0 else None
    assert done.returncode == 0, done.stderr
    validation = report["validation"]
    assert validation["passed"] is True and validation["verdict"] == "passed the gate"
    assert validation["samples"] == 8 and "[held-out part]" in validation["data"]
    assert any("held out 8 of the 16 calibration samples" in note for note in report["notes"])
    assert any(note.startswith("the gate judges on 8 samples") for note in report["notes"])  # and says how few
    printed = report["gate"]["per_output"]["Plus214_Output_0"]["cosine"]
    assert printed >= 0.99
    # the figure is what an independent ORT run measures on those held-out samples (the last 8)
    assert round(printed, 3) == round(_held_out_cosine(mnist_path, out, feeds[8:]), 3)
    assert report["gate"]["path"][0]["passed"] is False  # 90 % pruning broke it; the gate backed off


def test_a_lossy_pipeline_without_data_is_refused_in_one_line_and_writes_nothing(mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    before = mnist_path.read_bytes()
    assert_one_line_error(run_cli_here("optimize", mnist_path, "-o", out, "--preset", "int8"),
                          "the pipeline is lossy", "--no-gate")
    assert not out.exists() and mnist_path.read_bytes() == before


def test_no_gate_writes_the_model_but_says_not_validated_loudly(mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.5)", "--no-gate")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "validation on ORT: NOT VALIDATED (--no-gate) on GENERATED inputs" in text
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["onnxcomp.validation"] == "NOT VALIDATED (--no-gate)"


def test_a_gate_that_cannot_be_met_exits_1_with_one_line_and_keep_failed_writes_the_nearest_attempt(
        mnist_path, mnist_calibration, tmp_path):
    calibration, _ = mnist_calibration
    out, kept = tmp_path / "out.onnx", tmp_path / "kept.onnx"
    args = ("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.9)", "--calibration", calibration,
            "--min-cosine", "0.99999999", "--budget", "1")
    failed = run_cli_here(*args)
    assert failed.returncode == 1
    assert_one_line_error(failed, "at pass prune(sparsity=", "output 'Plus214_Output_0' cosine")
    assert not out.exists() and not kept.exists()
    done = run_cli_here(*args, "--keep-failed", kept)
    assert done.returncode == 1 and "written to" in done.stderr
    assert not out.exists() and kept.exists()
    metadata = {p.key: p.value for p in onnx.load(kept).metadata_props}
    assert metadata["onnxcomp.validation"].startswith("FAILED the accuracy gate")


def test_the_score_map_check_catches_a_detector_that_finds_nothing_though_its_cosine_stays_high(
        ultraface_path, images_dir):
    from models.real import _ultraface_feeds

    session = make_session(ultraface_path)
    outputs = [run(session, feed) for feed in _ultraface_feeds()[0][:4]]
    scores, boxes = [o["scores"] for o in outputs], [o["boxes"] for o in outputs]
    assert is_score_map(scores) and not is_score_map(boxes)  # box coordinates spread over [0, 1]
    no_faces = [np.stack([np.maximum(s[..., 0], 0.51), np.minimum(s[..., 1], 0.49)], -1) for s in scores]
    cosine = compare_arrays("scores", scores, no_faces, Tolerance(atol=float("inf"))).cosine
    assert cosine > 0.99  # the raw cosine cannot see it...
    assert score_agreement(scores, no_faces) == 0.0  # ...the face decisions can
    assert score_agreement(scores, scores) == 1.0


def test_a_lossy_run_that_changed_no_weight_exits_0_and_says_why_in_one_line(mnist_path, mnist_calibration, tmp_path):
    calibration, _ = mnist_calibration
    done = run_cli_here("optimize", mnist_path, "-o", tmp_path / "out.onnx", "--pipeline",
                        "quantize_dynamic(min_size=100000000)", "--calibration", calibration)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note: no weight was changed")]
    assert len(notes) == 1 and "quantize_dynamic(min_size=100000000): " in notes[0], done.stdout


def test_the_dynamic_preset_on_a_conv_model_quantizes_its_convs_under_the_gate(mnist_path, mnist_calibration, tmp_path):
    calibration, _ = mnist_calibration
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--preset", "dynamic", "--calibration", calibration, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["validation"]["passed"] is True
    assert not any(note.startswith("no weight was changed") for note in report["notes"])
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(out).graph.initializer)


def test_verify_each_holds_a_lossy_pass_to_the_gates_agreement_not_to_float_rounding(mnist_path, mnist_calibration,
                                                                                     tmp_path):
    calibration, _ = mnist_calibration
    done = run_cli_here("optimize", mnist_path, "-o", tmp_path / "out.onnx", "--preset", "int8",
                        "--calibration", calibration, "--verify-each", "--json")
    assert done.returncode == 0, done.stderr
    record = next(p for p in json.loads(done.stdout)["passes"] if p["spec"].startswith("quantize"))
    assert record["status"] == "ok" and record["verification"] == "verified"


def test_a_gate_that_removes_every_lossy_pass_says_no_weight_changed(mnist_path, mnist_calibration, tmp_path):
    calibration, _ = mnist_calibration
    done = run_cli_here("optimize", mnist_path, "-o", tmp_path / "out.onnx", "--pipeline", "fold, quantize_dynamic(min_size=0)",
                        "--calibration", calibration, "--min-cosine", "0.99999999")
    assert done.returncode == 0, done.stderr
    assert "note: no weight was changed: the gate removed every lossy pass" in done.stdout


def _softmax_mnist(mnist_path, bias_shift: np.ndarray | None = None) -> onnx.ModelProto:
    """The real MNIST model with a Softmax on its logits (a class-distribution output), optionally
    with its last bias shifted (a compression that moves the decisions)."""
    proto = onnx.load(str(mnist_path))
    logits = proto.graph.output[0].name
    if bias_shift is not None:
        add = next(n for n in proto.graph.node if logits in n.output)
        bias = next(t for t in proto.graph.initializer if t.name in add.input)
        bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + bias_shift, bias.name))
    proto.graph.node.append(onnx.helper.make_node("Softmax", [logits], ["probs"], axis=-1))
    proto.graph.output[0].name = "probs"
    return proto


def test_the_top1_check_counts_every_flipped_class_decision_on_a_real_classifier(mnist_path, mnist_calibration):
    from onnxcomp.gate import Gate, GateChecker, is_class_distribution, top1_agreement

    _, feeds = mnist_calibration
    reference = _softmax_mnist(mnist_path)
    probs = [run(make_session(reference), f)["probs"] for f in feeds[:8]]
    assert is_class_distribution(probs) and not is_class_distribution([p * 2 for p in probs])
    # swap the top two classes of the least sure sample: one decision in eight flips
    flipped = [p.copy() for p in probs]
    row = int(np.argmin([np.sort(p.ravel())[-1] for p in probs]))
    top2 = np.argsort(flipped[row].ravel())[-2:]
    flipped[row][0, top2] = flipped[row][0, top2[::-1]]
    assert top1_agreement(probs, flipped) == 7 / 8 and top1_agreement(probs, probs) == 1.0

    checker = GateChecker(Gate.default(), reference, feeds[:8])
    assert checker.check(reference).passed and checker.check(reference).figures["top1_agreement"] == 1.0
    logits = run(make_session(str(mnist_path)), feeds[row])  # favour that sample's runner-up just enough
    logits = np.sort(next(iter(logits.values())).ravel())
    shifted = np.zeros(10, np.float32)
    shifted[int(np.argsort(probs[row].ravel())[-2])] = logits[-1] - logits[-2] + 0.5
    verdict = checker.check(_softmax_mnist(mnist_path, shifted))
    assert not verdict.passed and "top-1 classes agree" in verdict.reason
    assert verdict.figures["top1_agreement"] < 0.95
    # a back-off is told how far off the cosine is; a flipped decision alone asks for the smallest step
    cosine = min(verdict.figures["cosine"], verdict.figures["per_output"]["probs"]["cosine_low"])
    assert checker.shortfall(verdict) == pytest.approx(max(1.0, (1 - cosine) / 0.01))
    assert checker.shortfall(checker.check(reference)) == 1.0


def test_the_cosine_must_hold_at_its_95_percent_lower_bound_over_the_samples(mnist_path, mnist_calibration):
    """One sample far off among eight can leave the pooled cosine above 0.99: the jackknife lower
    bound over samples sees the spread; agreement spread evenly keeps a tight bound."""
    from onnxcomp.gate import cosine_lower_bound

    _, feeds = mnist_calibration
    session = make_session(str(mnist_path))
    ref = [next(iter(run(session, f).values())).astype(np.float64) for f in feeds[:8]]
    rng = np.random.default_rng(0)
    even = [r + 0.02 * np.abs(r).mean() * rng.standard_normal(r.shape) for r in ref]
    one_off = [r.copy() for r in ref]
    loud = int(np.argmax([np.linalg.norm(r) for r in ref]))
    one_off[loud] = ref[loud] + 0.25 * np.linalg.norm(ref[loud]) * rng.standard_normal(ref[loud].shape) / 3
    for cand, low_passes in ((even, True), (one_off, False)):
        cosine = compare_arrays("y", ref, cand, Tolerance(atol=float("inf"))).cosine
        low = cosine_lower_bound(ref, cand, cosine)
        assert cosine >= 0.99 and low <= cosine
        assert (low >= 0.99) is low_passes, (cosine, low)


def test_outputs_named_logits_get_the_top1_check_and_other_raw_scores_do_not():
    from onnxcomp.gate import top1_agreement

    rng = np.random.default_rng(2)
    logits = [rng.standard_normal((1, 5, 50)).astype(np.float32) for _ in range(4)]  # a decoder's [b, seq, vocab]
    moved = [x.copy() for x in logits]
    moved[0][0, 0] = -moved[0][0, 0]  # the first position's next token changes
    assert top1_agreement(logits, moved, "logits") == 19 / 20
    assert top1_agreement(logits, moved, "model/output/logits") == 19 / 20
    assert top1_agreement(logits, moved, "Plus214_Output_0") is None  # raw scores by another name: cosine only


def _offset_mnist(mnist_path, offset: np.ndarray) -> onnx.ModelProto:
    """The real MNIST model with `offset` (per class) added to its logits: a large common offset
    makes an output like a log-mel spectrogram; a small varying part, a compression's error."""
    proto = onnx.load(str(mnist_path))
    logits = proto.graph.output[0].name
    proto.graph.initializer.append(onnx.numpy_helper.from_array(offset.astype(np.float32).reshape(1, 10), "offset"))
    proto.graph.node.append(onnx.helper.make_node("Add", [logits, "offset"], ["level"]))
    proto.graph.output[0].name = "level"
    return proto


def test_an_output_on_a_large_offset_is_judged_by_its_cosine_about_the_mean(mnist_path, mnist_calibration):
    from onnxcomp.gate import Gate, GateChecker, dominant_offset

    _, feeds = mnist_calibration
    session = make_session(str(mnist_path))
    logits = [next(iter(run(session, f).values())) for f in feeds[:8]]
    spread = float(np.concatenate([v.ravel() for v in logits]).std())
    base = np.full(10, 20 * spread)  # the offset carries ~99.8 % of the output's energy
    reference = _offset_mnist(mnist_path, base)
    moved = _offset_mnist(mnist_path, base + np.random.default_rng(0).standard_normal(10) * 0.4 * spread)
    levels = [run(make_session(reference), f)["level"] for f in feeds[:8]]
    raw = compare_arrays("level", levels, [run(make_session(moved), f)["level"] for f in feeds[:8]],
                         Tolerance(atol=float("inf"))).cosine
    assert raw > 0.99  # the offset hides an error of 40 % of the spread from a plain cosine
    assert dominant_offset(levels) == pytest.approx(float(np.mean(levels)))
    checker = GateChecker(Gate.default(), reference, feeds[:8])
    verdict = checker.check(moved)
    assert not verdict.passed and "about its mean" in verdict.reason
    assert checker.check(reference).passed
    assert dominant_offset(logits) == 0.0  # logits, probabilities, boxes: judged as before
