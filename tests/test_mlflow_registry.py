"""`onnxcomp registry optimize` against a real MLflow tracking server (SQLite backend, proxied
file artifacts) started on 127.0.0.1 for this module, with the digits CNN registered in it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .helpers import REPO, assert_one_line_error, run_cli

MODEL = "digits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {seconds} s: {log.read_text()[-2000:]}")


def _start_server(folder: Path) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = folder / "server.log"
    # No background job runner: the tests need the REST API only, and the machine is shared.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: mlflow and its uvicorn
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real `mlflow server` subprocess with the digits CNN registered as version 1 of `digits`
    (mlflow.onnx flavour); its URL, the data folder and the source run id. The server is killed
    at teardown."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
    import mlflow
    import mlflow.onnx
    import onnx

    proc, url, log = _start_server(tmp_path_factory.mktemp("mlflow"))
    try:
        data = tmp_path_factory.mktemp("digits")  # built while the server starts
        done = subprocess.run([sys.executable, "-m", "models", "build", "digits_cnn", "-o", data / "digits.onnx",
                               "--data"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr
        _wait_until_up(url, proc, log)
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(url)  # also sets the variable for child processes: restored below
        try:
            with mlflow.start_run() as run:
                info = mlflow.onnx.log_model(onnx.load(data / "digits.onnx"), name="model",
                                             registered_model_name=MODEL,
                                             pip_requirements=mlflow.onnx.get_default_pip_requirements())
        finally:
            mlflow.set_tracking_uri(before)
        assert str(info.registered_model_version) == "1"
        yield {"url": url, "data": data, "run_id": run.info.run_id}
    finally:
        _stop_server(proc)


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _store_state(client) -> dict:
    """Everything a registration would add: model versions, registered models, runs, logged models."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {
        "versions": sorted((v.name, v.version) for v in client.search_model_versions()),
        "models": sorted(m.name for m in client.search_registered_models()),
        "runs": sorted(r.info.run_id for r in client.search_runs(experiments)),
        "logged_models": sorted(m.model_id for m in client.search_logged_models(experiments)),
    }


def _accuracy(model_path: Path, evaluation: Path) -> float:
    import onnxruntime as ort

    data = np.load(evaluation)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["labels"]))


def test_optimize_registers_a_new_version_with_reports_figures_and_a_link_to_the_source(registry, tmp_path):
    from mlflow.artifacts import download_artifacts

    server, data = registry["url"], registry["data"]
    done = run_cli("registry", "optimize", "--tracking-uri", server, "--model", MODEL, "--version", "1",
                   "--preset", "deep-compression", "--calibration", data / "digits.calibration.npz",
                   "--evaluation", data / "digits.evaluation.npz", "--max-drop", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"registered {MODEL} version 2" in done.stdout
    assert not list(tmp_path.iterdir()), "nothing is written to the current folder when a URI is given"

    client = _client(server)
    version = client.get_model_version(MODEL, "2")
    tags = version.tags
    assert tags["onnxcomp.source_model"] == MODEL and tags["onnxcomp.source_version"] == "1"
    assert tags["onnxcomp.source_run_id"] == registry["run_id"]
    assert "prune" in tags["onnxcomp.pipeline"] and "entropy" in tags["onnxcomp.pipeline"]
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["size_bytes_after"] * 10 < metrics["size_bytes_before"], metrics
    assert metrics["accuracy_drop_points"] <= 1.0
    assert metrics["latency_ms_before"] > 0 and metrics["latency_ms_after"] > 0
    assert float(tags["onnxcomp.size_bytes_after"]) == metrics["size_bytes_after"]

    reports = Path(download_artifacts(run_id=version.run_id, artifact_path="onnxcomp", dst_path=str(tmp_path / "r"),
                                      tracking_uri=server))
    report = json.loads((reports / "report.json").read_text())
    assert report["gate"]["passed"] and report["gate"]["drop_points"] == pytest.approx(metrics["accuracy_drop_points"])
    assert "<html" in (reports / "report.html").read_text()[:200]

    # The registered model is an mlflow.onnx model that ORT runs at the accuracy the gate measured,
    # and it carries the packed .onnxc whose size was logged.
    model_dir = Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, "2"),
                                        dst_path=str(tmp_path / "m"), tracking_uri=server))
    assert "onnx:" in (model_dir / "MLmodel").read_text()
    assert _accuracy(model_dir / "model.onnx", data / "digits.evaluation.npz") == pytest.approx(metrics["accuracy"])
    packed = next(model_dir.rglob("model.onnxc"))
    assert packed.stat().st_size == metrics["size_bytes_after"]


def test_a_failed_gate_registers_nothing(registry, tmp_path):
    server, data = registry["url"], registry["data"]
    client = _client(server)
    before = _store_state(client)
    args = ("registry", "optimize", "--tracking-uri", server, "--model", MODEL, "--version", "1",
            "--pipeline", "prune(sparsity=0.99)", "--min-cosine", "0.9999", "--budget", "0")
    done = run_cli(*args, "--evaluation", data / "digits.evaluation.npz", cwd=tmp_path)
    assert done.returncode == 1
    assert_one_line_error(done, "cosine", "still fails")
    assert _store_state(client) == before
    refused = run_cli(*args, cwd=tmp_path)  # a lossy pipeline without data: refused before any work
    assert refused.returncode == 2
    assert_one_line_error(refused, "no data to check it on")
    assert _store_state(client) == before


def test_an_unknown_version_is_one_line(registry, tmp_path):
    done = run_cli("registry", "optimize", "--tracking-uri", registry["url"], "--model", MODEL, "--version", "99",
                   "--preset", "lossless", cwd=tmp_path)
    assert done.returncode == 2
    assert_one_line_error(done, MODEL, "99")


def test_the_default_local_store_must_exist(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "onnxcomp", "registry", "optimize", "--model", MODEL,
                           "--version", "1", "--preset", "lossless"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert_one_line_error(done, "mlruns.db")
    assert not list(tmp_path.iterdir()), "no empty store is left behind"


def test_without_mlflow_the_error_says_how_to_install_it(tmp_path):
    # mlflow made unimportable in the child, as on an install without the extra.
    code = ("import sys; sys.modules['mlflow'] = None; from onnxcomp.cli import main; "
            "main(['registry', 'optimize', '--model', 'm', '--version', '1', '--preset', 'lossless'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert_one_line_error(done, "pip install 'onnxcomp[mlflow]'")


def test_the_default_local_store_with_a_plain_onnx_artifact(registry, tmp_path):
    """No server and no --tracking-uri: ./mlruns.db with artifacts beside it. The source version is
    a plain .onnx file logged by a run (no mlflow.onnx flavour); the result goes to --target-name."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(registry["data"] / "digits.onnx"), "exported")
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, f"{run.info.artifact_uri}/exported", run_id=run.info.run_id)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "onnxcomp", "registry", "optimize", "--model", MODEL, "--version", "1",
                           "--preset", "lossless", "--target-name", f"{MODEL}-compressed"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    version = client.get_model_version(f"{MODEL}-compressed", "1")
    assert version.tags["onnxcomp.source"] == f"models:/{MODEL}/1"
    assert version.tags["onnxcomp.source_run_id"] == run.info.run_id
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    # The run's files went to the folder beside the database, not to ./mlruns.
    assert (tmp_path / "mlartifacts" / version.run_id / "artifacts" / "onnxcomp" / "report.json").is_file()
    assert not (tmp_path / "mlruns").exists()
