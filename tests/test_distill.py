"""Distillation on the digits CNN: accuracy recovered, compression structure kept, deterministic, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch", reason="distillation trains with PyTorch (the models extra)")
pytest.importorskip("sklearn", reason="the digits CNN is trained on scikit-learn's digits (the models extra)")

import onnxcomp
from onnxcomp.distill import DistillConfig, distill
from tests.helpers import assert_one_line_error, run_cli

PRUNE = "fold, cleanup, fuse, prune(sparsity=0.93, scope=global)"


@pytest.fixture(scope="module")
def digits():
    from models import zoo

    entry = zoo.get("digits_cnn")
    return entry, entry.calibration(10**6)  # the whole training split, without labels


@pytest.fixture(scope="module")
def pruned(digits):
    entry, train = digits
    return onnxcomp.optimize(entry.path, PRUNE, calibration=train, check=False, gate=False).model


def initializers(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.values).copy() for k, v in model.initializers().items()}


def test_distillation_after_heavy_pruning_raises_test_accuracy(digits, pruned):
    entry, train = digits
    before = entry.evaluate(pruned.to_proto())["test_acc"]
    result = onnxcomp.optimize(entry.path, PRUNE + ", distill(epochs=8)", calibration=train, check=False, gate=False)
    after = entry.evaluate(result.model.to_proto())["test_acc"]
    stats = result.report.passes[-1].stats
    assert stats["loss_last"] < stats["loss_first"]
    assert after >= before + 0.03, (before, after)


def test_pruned_weights_stay_zero(digits, pruned):
    entry, train = digits
    student = pruned.copy()
    weights = initializers(student)
    distill(student, entry.path, train, DistillConfig(epochs=2))
    trained = initializers(student)
    changed = 0
    for name, w in weights.items():
        if w.dtype == np.float32 and np.mean(w == 0) > 0.5:  # the pruned weight tensors
            assert np.all(trained[name][w == 0] == 0), name
            changed += int(not np.array_equal(trained[name], w))
    assert changed >= 2  # the kept weights did train


def test_codebook_layers_keep_their_indices_and_number_of_shared_values(digits, pruned):
    entry, train = digits
    student = onnxcomp.optimize(pruned.copy(), "codebook(bits=3)", check=False, gate=False).model
    before = initializers(student)
    distill(student, entry.path, train, DistillConfig(epochs=2))
    after = initializers(student)
    books = [k for k in before if k.endswith("_codebook")]
    assert books
    for name in books:
        assert len(np.unique(after[name])) == len(np.unique(before[name]))
        assert np.count_nonzero(after[name] == 0) == np.count_nonzero(before[name] == 0)  # pinned zero kept
        assert not np.array_equal(after[name], before[name])  # the centroids moved
        assert np.array_equal(after[name + "_indices"], before[name + "_indices"])


def test_int8_qdq_weights_stay_int8_with_their_scales(digits):
    entry, train = digits
    student = onnxcomp.optimize(entry.path, "fold, cleanup, fuse, quantize(per_channel=true)", calibration=train[:64],
                                check=False, gate=False).model
    before = initializers(student)
    result = distill(student, entry.path, train[:256], DistillConfig(epochs=2))
    after = initializers(student)
    ints = [k for k, v in before.items() if v.dtype == np.int8 and v.size > 16]
    assert ints and result.trained_tensors > 0
    for name in ints:
        assert after[name].dtype == np.int8
    assert any(not np.array_equal(after[k], before[k]) for k in ints)
    assert all(np.array_equal(after[k], v) for k, v in before.items() if v.dtype == np.float32 and v.size == 1)


def test_same_seed_gives_the_same_losses(digits, pruned):
    entry, train = digits
    runs = []
    for _ in range(2):
        student = pruned.copy()
        runs.append(distill(student, entry.path, train[:256], DistillConfig(epochs=2, seed=3)).losses)
    assert runs[0] == runs[1]
    other = distill(pruned.copy(), entry.path, train[:256], DistillConfig(epochs=2, seed=4)).losses
    assert other != runs[0]


def test_feature_distillation_matches_a_named_hidden_tensor_and_refuses_unknown_names(digits, pruned):
    from onnxcomp.errors import InputError

    entry, train = digits
    hidden = next(n.outputs[0].name for n in pruned.graph.nodes if n.op == "Relu" and n.outputs[0].name != "logits")
    plain = distill(pruned.copy(), entry.path, train[:256], DistillConfig(epochs=2))
    with_feature = distill(pruned.copy(), entry.path, train[:256], DistillConfig(epochs=2, features=(hidden,)))
    assert with_feature.loss_first > plain.loss_first  # the feature term adds to the loss
    with pytest.raises(InputError, match="no tensor named"):
        distill(pruned.copy(), entry.path, train[:64], DistillConfig(epochs=1, features=("nowhere",)))


def test_distill_pass_on_an_in_memory_model_is_taught_by_that_model(digits, tmp_path):
    entry, train = digits
    in_memory = entry.load()  # a ModelProto: no file behind it
    spec = PRUNE + ", distill(epochs=2{})"
    taught = onnxcomp.optimize(in_memory, spec.format(""), calibration=train[:256], check=False, gate=False)
    stats = taught.report.passes[-1].stats
    assert stats["loss_last"] < stats["loss_first"]
    teacher = tmp_path / "teacher.onnx"
    onnx.save(in_memory, teacher)
    named = onnxcomp.optimize(in_memory, spec.format(f", teacher={teacher}"), calibration=train[:256], check=False, gate=False)
    assert named.report.passes[-1].stats["loss_last"] == stats["loss_last"]  # the same teacher, the same run
    assert all(np.array_equal(w, initializers(named.model)[k]) for k, w in initializers(taught.model).items())


def test_distill_pass_outside_a_pipeline_asks_for_a_teacher(digits, pruned):
    from onnxcomp.context import PassContext
    from onnxcomp.errors import PassError
    from onnxcomp.registry import get

    _, train = digits
    with pytest.raises(PassError, match=r"give distill\(teacher=PATH\)"):
        get("distill")(epochs=1).run(pruned.copy(), PassContext(calibration=train[:8]))


def test_cli_distill_writes_a_packed_model_and_reports_before_and_after(digits, pruned, tmp_path):
    entry, train = digits
    teacher, student, out = tmp_path / "teacher.onnx", tmp_path / "student.onnx", tmp_path / "out.onnxc"
    onnx.save(entry.load(), teacher)
    onnx.save(pruned.to_proto(), student)
    data, evaluation = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(data, input=np.concatenate([f["input"] for f in train]))
    np.savez(evaluation, input=np.concatenate([f["input"] for f in entry.evaluation()]), labels=entry.labels())
    student_bytes = student.read_bytes()
    proc = run_cli("distill", teacher, student, "--data", data, "--evaluation", evaluation, "-o", out,
                   "--epochs", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    summary = json.loads(proc.stdout)
    assert summary["after"]["accuracy"] > summary["before"]["accuracy"]
    assert student.read_bytes() == student_bytes  # the input is never modified
    got = entry.evaluate(onnxcomp.load(out).to_proto())["test_acc"]
    assert got == pytest.approx(summary["after"]["accuracy"])


def test_cli_distill_refuses_a_student_with_other_inputs_in_one_line(tmp_path, digits):
    entry, _ = digits
    teacher = tmp_path / "teacher.onnx"
    onnx.save(entry.load(), teacher)
    other = tmp_path / "other.onnx"
    from tests.helpers import model_from_text

    onnx.save(model_from_text("<ir_version: 8, opset_import: [\"\" : 17]> g (float[N, 4] x) => (float[N, 4] y) "
                              "{ y = Relu(x) }"), other)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 4), np.float32))
    proc = run_cli("distill", teacher, other, "--data", data, "-o", tmp_path / "out.onnx")
    assert_one_line_error(proc, "different inputs")
    assert not (tmp_path / "out.onnx").exists()
