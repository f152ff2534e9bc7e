"""The CLI end to end: optimize real models, and bad input ending as one clear line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcomp

from .helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("name", ["ultraface-rfb-320.onnx", "mnist.onnx"])
def test_fold_cleanup_fuse_shrinks_real_models_and_validate_agrees(name, tmp_path):
    from .conftest import real_model

    source = real_model(name)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    done = run_cli("optimize", source, "-o", out, "--pipeline", "fold, cleanup, fuse", "--report", report)
    assert done.returncode == 0, done.stderr
    assert len(onnx.load(out).graph.node) < len(onnx.load(source).graph.node)
    check = onnxcomp.validate(source, out, tolerance=onnxcomp.Tolerance(atol=1e-5, rtol=0))
    assert check.passed, check.worst()
    assert run_cli("validate", source, out).returncode == 0
    assert '"pipeline": "fold, cleanup, fuse"' in report.read_text()


def test_python_m_onnxcomp_prints_help():
    done = run_cli("--help")
    assert done.returncode == 0 and "optimize" in done.stdout


def test_inspect_reports_opsets_ops_and_parameter_bytes(mnist_path):
    done = run_cli("inspect", mnist_path, "--json")
    assert done.returncode == 0, done.stderr
    import json

    info = json.loads(done.stdout)
    assert info["opsets"] == {"": 8} and info["ops"]["Conv"] == 2
    proto = onnx.load(mnist_path)
    assert info["parameters"] == sum(onnx.numpy_helper.to_array(t).size for t in proto.graph.initializer)


def _truncated(tmp_path, mnist_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(mnist_path.read_bytes()[:5000])
    return path


def _text(tmp_path, mnist_path):
    path = tmp_path / "notes.onnx"
    path.write_text("name,value\nweights,1\n")
    return path


def _missing_external(tmp_path, mnist_path):
    model = onnxcomp.load(mnist_path)
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnxcomp.save(model, path, external_data=True)
    (path.parent / "model.onnx.data").unlink()
    return path


@pytest.mark.parametrize("make_input, message", [
    (_truncated, "not an ONNX model"),
    (_text, "not an ONNX model"),
    (_missing_external, "is missing"),
])
def test_bad_input_files_end_as_one_line_with_no_output_left(make_input, message, tmp_path, mnist_path):
    source = make_input(tmp_path, mnist_path)
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    done = run_cli("optimize", source, "-o", out, "--pipeline", "cleanup")
    assert_one_line_error(done, message)
    assert not out.exists()
    assert source.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]


@pytest.mark.parametrize("spec, message", [
    ("fold, clenaup", "did you mean 'cleanup'"),
    ("fold(max_growth_mb=banana)", "fold: parameter max_growth_mb = 'banana' is not a number"),
    ("fold(no_such_parameter=1)", "unknown parameter"),
])
def test_bad_pipelines_end_as_one_line_with_no_output(spec, message, mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert_one_line_error(run_cli("optimize", mnist_path, "-o", out, "--pipeline", spec), message)
    assert not out.exists()


def test_without_a_preset_or_pipeline_optimize_runs_the_lossless_preset(mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli("optimize", mnist_path, "-o", out, "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads((tmp_path / "r.json").read_text())["pipeline"] == "fold, cleanup, fuse"
    both = run_cli("optimize", mnist_path, "-o", tmp_path / "b.onnx", "--preset", "lossless", "--pipeline", "fold")
    assert_one_line_error(both, "not both")


def test_writing_over_the_input_needs_force(mnist_path, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(mnist_path.read_bytes())
    assert_one_line_error(run_cli("optimize", path, "-o", path, "--pipeline", "cleanup"), "--force")
    assert path.read_bytes() == mnist_path.read_bytes()
    assert run_cli("optimize", path, "-o", path, "--pipeline", "cleanup", "--force").returncode == 0


def test_nan_in_outputs_where_the_input_had_nan_still_validates(tmp_path):
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) { y = Div(x, x) }
    """)
    path = tmp_path / "div.onnx"
    onnx.save(proto, path)
    feeds = [{"x": np.array([0, 1, 2, 3], np.float32)}]
    assert onnxcomp.validate(path, path, feeds, tolerance=onnxcomp.Tolerance.exact()).passed
