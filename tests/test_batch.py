"""Batch mode: a folder of models optimized in parallel; a bad model is reported, the others go on.

The folder holds ten models: the trained digits CNN, mnist (when ../shared/models/real is there),
small models built with onnx.helper, and one corrupt file. Every output is checked on ORT.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import Pass, PassResult, param, register
from onnxcomp.batch import plan, run_batch
from onnxcomp.pipeline import Pipeline

from .helpers import REPO, assert_one_line_error, run_cli

LOSSLESS = "fold, cleanup, fuse"
CORRUPT = "corrupt.onnx"


# ---- the models ----------------------------------------------------------------------------
def _weight(rng, name, *shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(name, nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _float(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _small_models() -> dict[str, onnx.ModelProto]:
    """Small real models, each with something for fold / cleanup / fuse to do (or nothing)."""
    rng = np.random.default_rng(0)
    make = helper.make_node
    return {
        "mlp": _model("mlp", [
            make("MatMul", ["x", "w1"], ["h"]), make("Add", ["h", "b1"], ["h1"]), make("Relu", ["h1"], ["r"]),
            make("MatMul", ["r", "w2"], ["o"]), make("Add", ["o", "b2"], ["y"])],
            [_float("x", 1, 16)], [_float("y", 1, 4)],
            [_weight(rng, "w1", 16, 32), _weight(rng, "b1", 32),
             _weight(rng, "w2", 32, 4), _weight(rng, "b2", 4)]),
        "constant_product": _model("constant_product", [
            make("Mul", ["c1", "c2"], ["c"]), make("Add", ["x", "c"], ["y"])],
            [_float("x", 1, 8)], [_float("y", 1, 8)], [_weight(rng, "c1", 1, 8), _weight(rng, "c2", 1, 8)]),
        "identity_chain": _model("identity_chain", [
            make("Identity", ["x"], ["a"]), make("Identity", ["a"], ["b"]), make("Relu", ["b"], ["c"]),
            make("Identity", ["c"], ["y"])],
            [_float("x", 2, 5)], [_float("y", 2, 5)], []),
        "conv_relu": _model("conv_relu", [
            make("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]), make("Relu", ["c"], ["y"])],
            [_float("x", 1, 3, 8, 8)], [_float("y", 1, 4, 8, 8)],
            [_weight(rng, "w", 4, 3, 3, 3), _weight(rng, "bias", 4)]),
        "conv_batchnorm": _model("conv_batchnorm", [
            make("Conv", ["x", "w"], ["c"]),
            make("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
            make("Relu", ["n"], ["y"])],
            [_float("x", 1, 2, 6, 6)], [_float("y", 1, 3, 4, 4)],
            [_weight(rng, "w", 3, 2, 3, 3), _weight(rng, "scale", 3), _weight(rng, "shift", 3),
             _weight(rng, "mean", 3),
             numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "var")]),
        "gemm_softmax": _model("gemm_softmax", [
            make("Gemm", ["x", "w", "b"], ["g"]), make("Softmax", ["g"], ["y"])],
            [_float("x", 1, 10)], [_float("y", 1, 5)], [_weight(rng, "w", 10, 5), _weight(rng, "b", 5)]),
        "two_branches": _model("two_branches", [
            make("Sigmoid", ["x"], ["s"]), make("Tanh", ["x"], ["t"]), make("Add", ["s", "t"], ["y"])],
            [_float("x", 3, 7)], [_float("y", 3, 7)], []),
        "reshape_transpose": _model("reshape_transpose", [
            make("Concat", ["d0", "d1"], ["shape"], axis=0), make("Reshape", ["x", "shape"], ["r"]),
            make("Transpose", ["r"], ["y"], perm=[1, 0])],
            [_float("x", 1, 4, 6)], [_float("y", 6, 4)],
            [numpy_helper.from_array(np.array([4], np.int64), "d0"),
             numpy_helper.from_array(np.array([6], np.int64), "d1")]),
        "matmul_scale": _model("matmul_scale", [
            make("MatMul", ["x", "w"], ["m"]), make("Mul", ["m", "k"], ["y"])],
            [_float("x", 2, 12)], [_float("y", 2, 3)], [_weight(rng, "w", 12, 3), _weight(rng, "k", 3)]),
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """Ten models: nine that work (real ones first, then small built ones) and one corrupt file."""
    folder = tmp_path_factory.mktemp("models")
    from .conftest import REAL

    sources: list[tuple[str, bytes]] = []
    try:
        from models import zoo

        sources.append(("digits_cnn.onnx", zoo.get("digits_cnn").path.read_bytes()))
    except ImportError:  # no torch/scikit-learn here: the built models fill the folder instead
        pass
    if (REAL / "mnist.onnx").exists():
        sources.append(("mnist.onnx", (REAL / "mnist.onnx").read_bytes()))
    for name, proto in _small_models().items():
        sources.append((f"{name}.onnx", proto.SerializeToString()))
    for name, data in sources[:9]:
        (folder / name).write_bytes(data)
    (folder / CORRUPT).write_bytes(sources[0][1][: len(sources[0][1]) // 3])  # truncated protobuf
    assert len(list(folder.glob("*.onnx"))) == 10
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _check_outcome(outcome, folder: Path, outdir: Path) -> None:
    """The corrupt model is reported on one line and written nowhere; the other nine are valid."""
    by_name = {Path(r.model).name: r for r in outcome.results}
    assert len(by_name) == 10
    bad = by_name.pop(CORRUPT)
    assert bad.status == "error" and bad.output is None
    assert "not an ONNX model" in bad.error and "\n" not in bad.error
    assert not (outdir / CORRUPT).exists()
    assert sorted(p.name for p in outdir.iterdir()) == sorted(by_name), "no temporary or partial files left"
    for name, result in by_name.items():
        assert result.status == "ok", f"{name}: {result.error}"
        out = outdir / name
        assert Path(result.output) == out and result.bytes_after == out.stat().st_size
        onnx.checker.check_model(onnx.load(out))
        check = onnxcomp.validate(folder / name, out, tolerance=onnxcomp.Tolerance(atol=1e-5, rtol=1e-4))
        assert check.ran_any and check.passed, f"{name}: {check.worst()}"
        assert result.nodes_after <= result.nodes_before
    # fold, cleanup and fuse really ran: these lose nodes
    for name in ("identity_chain.onnx", "constant_product.onnx", "conv_batchnorm.onnx"):
        assert by_name[name].nodes_after < by_name[name].nodes_before, name


# ---- local processes -----------------------------------------------------------------------
def test_a_folder_of_ten_models_with_one_corrupt_nine_succeed_in_parallel(model_folder, tmp_path):
    before = _hashes(model_folder)
    outdir = tmp_path / "out"
    finished = []
    jobs = plan([model_folder], outdir, Pipeline.parse(LOSSLESS))
    outcome = run_batch(jobs, workers=2, on_done=finished.append)
    assert outcome.runner == "processes" and outcome.workers == 2
    assert len(finished) == 10 and len(outcome.failed) == 1
    _check_outcome(outcome, model_folder, outdir)
    assert _hashes(model_folder) == before, "inputs untouched"


@register
class KillWorker(Pass):
    """Kills its own process on one model (a crash no Python code can catch, like a segfault)."""

    name = "test_kill_worker"

    @dataclass(frozen=True)
    class Config:
        victim: str = param("", "file name of the model whose worker dies")

    def run(self, model, ctx):
        if model.source_path is not None and Path(model.source_path).name == self.config.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return PassResult(False)


def test_a_worker_process_that_dies_is_reported_and_the_others_go_on(model_folder, tmp_path):
    models = [model_folder / name for name in ("mlp.onnx", "gemm_softmax.onnx", "two_branches.onnx")]
    spec = Pipeline([KillWorker(victim="gemm_softmax.onnx"), onnxcomp.registry.get("cleanup")()])
    outdir = tmp_path / "out"
    outcome = run_batch(plan(models, outdir, spec), workers=2)
    status = {Path(r.model).name: (r.status, r.error) for r in outcome.results}
    assert status["gemm_softmax.onnx"] == ("error", "the worker process died (killed by SIGKILL)")
    assert status["mlp.onnx"][0] == status["two_branches.onnx"][0] == "ok"
    assert sorted(p.name for p in outdir.iterdir()) == ["mlp.onnx", "two_branches.onnx"]


def test_plan_refuses_two_models_that_would_write_the_same_output(model_folder, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "mlp.onnx").write_bytes((model_folder / "mlp.onnx").read_bytes())
    with pytest.raises(onnxcomp.OnnxcompError, match="would both be written to"):
        plan([model_folder / "mlp.onnx", other / "mlp.onnx"], tmp_path / "out", Pipeline.parse(LOSSLESS))
    with pytest.raises(onnxcomp.OnnxcompError, match="refusing to overwrite the input"):
        plan([model_folder], model_folder, Pipeline.parse(LOSSLESS))


# ---- Ray -----------------------------------------------------------------------------------
def test_the_same_job_runs_as_ray_tasks_on_a_local_ray(model_folder, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxcomp[ray]')")
    before = _hashes(model_folder)
    outdir = tmp_path / "out"
    jobs = plan([model_folder], outdir, Pipeline.parse(LOSSLESS))
    outcome = run_batch(jobs, workers=2, ray_address="local")
    assert outcome.runner == "ray local" and len(outcome.failed) == 1
    _check_outcome(outcome, model_folder, outdir)
    assert _hashes(model_folder) == before


# ---- the command line ----------------------------------------------------------------------
def test_cli_batch_prints_a_summary_writes_json_and_exits_1_when_a_model_failed(model_folder, tmp_path):
    before = _hashes(model_folder)
    outdir, summary = tmp_path / "out", tmp_path / "summary.json"
    done = run_cli("optimize", model_folder, "-o", outdir, "--pipeline", LOSSLESS, "--jobs", "2",
                   "--summary", summary)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: 1 of 10 models failed: {CORRUPT}"
    assert "9 of 10 models optimized" in done.stdout and "not an ONNX model" in done.stdout
    data = json.loads(summary.read_text())
    assert (data["ok"], data["failed"], data["workers"]) == (9, 1, 2)
    rows = {Path(m["model"]).name: m for m in data["models"]}
    assert rows[CORRUPT]["status"] == "error" and "not an ONNX model" in rows[CORRUPT]["error"]
    assert all(rows[p.name]["status"] == "ok" for p in outdir.iterdir())
    assert len(list(outdir.iterdir())) == 9
    assert _hashes(model_folder) == before


def test_cli_batch_over_a_list_of_files_exits_0_when_all_succeed(model_folder, tmp_path):
    outdir = tmp_path / "out"
    done = run_cli("optimize", model_folder / "mlp.onnx", model_folder / "conv_batchnorm.onnx", "-o", outdir,
                   "--preset", "lossless", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["ok"] == 2 and data["failed"] == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["conv_batchnorm.onnx", "mlp.onnx"]


def test_cli_ray_without_ray_installed_is_one_line_saying_how_to_install(model_folder, tmp_path):
    # A `ray` package that fails to import stands in for a machine without Ray.
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "onnxcomp", "optimize", str(model_folder), "-o", str(outdir),
               "--pipeline", LOSSLESS, "--ray", "local"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert_one_line_error(done, "--ray needs Ray", "pip install 'onnxcomp[ray]'")
    assert not outdir.exists()


def test_cli_batch_stopped_by_sigterm_leaves_only_complete_outputs(tmp_path):
    folder, outdir = tmp_path / "many", tmp_path / "out"
    folder.mkdir()
    data = _small_models()["conv_batchnorm"].SerializeToString()
    for i in range(30):  # far more than can finish between the first progress line and the signal
        (folder / f"m{i:02d}.onnx").write_bytes(data)
    command = [sys.executable, "-m", "onnxcomp", "optimize", str(folder), "-o", str(outdir),
               "--pipeline", LOSSLESS, "--jobs", "2"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("[1/30] "), first
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("error: interrupted after ") and "no partial output was written" in last
    assert "Traceback" not in rest
    written = sorted(outdir.iterdir())
    assert 1 <= len(written) < 30
    for path in written:  # only complete models: no temporary files, each one loads and checks
        assert not path.name.startswith("."), path
        onnx.checker.check_model(onnx.load(path))
