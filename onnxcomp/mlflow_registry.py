"""The pre-deployment step of an MLflow model registry: fetch a registered ONNX model version,
compress it under the accuracy gate, and register the result as a new version.

    onnxcomp registry optimize --model digits --version 1 --preset int8 --calibration c.npz --max-drop 1

The work goes through `onnxcomp.api.optimize` (and its gate) exactly as `onnxcomp optimize`
does; this module only moves models and figures in and out of MLflow. Nothing is written to
the registry until the gate has passed, so a failed gate leaves the registry as it was.
MLflow is an optional extra: `pip install 'onnxcomp[mlflow]'`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp.errors import InputError

INSTALL_HINT = "the registry commands need MLflow: pip install 'onnxcomp[mlflow]'"
LOCAL_DB = "mlruns.db"
LOCAL_ARTIFACTS = "mlartifacts"
TAG_PREFIX = "onnxcomp."


def require_mlflow():
    """Import mlflow quietly, or say in one line how to install it."""
    # No download progress bars and no endless retries against a server that is down.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow
            import mlflow.onnx
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    # MLflow logs every registration and alembic every migration at INFO; keep stderr for errors.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else an embedded SQLite store in the current folder (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / LOCAL_DB).resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@dataclass
class RegisteredResult:
    name: str
    version: str
    run_id: str
    source: str  # NAME/VERSION of the model that was compressed
    pipeline: str  # the pipeline that ran, after any gate back-off
    report: Any
    metrics: dict[str, float] = field(default_factory=dict)


def optimize_version(tracking_uri: str | None, name: str, version: str, pipeline, *, target_name: str | None = None,
                     experiment: str = "onnxcomp", calibration=None, evaluation=None, preprocess=None,
                     providers: str = "cpu", tolerance=None, gate=None, dims=None, progress=None,
                     **data_options) -> RegisteredResult:
    """Compress version `version` of registered model `name`; register the result as a new version
    of `target_name` (default: `name`). Raises GateFailed (nothing registered) when the gate fails.
    `data_options` (shapes, carry_state) go to onnxcomp.optimize as they are."""
    mlflow = require_mlflow()
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and not db.exists():  # MLflow would create an empty store: say so instead
        raise InputError(f"no MLflow store at {db} (register a model there first, or give --tracking-uri)")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # The registry resolves logged models through MLflow's global tracking URI: point it at `uri`.
    with _tracking(mlflow, uri), tempfile.TemporaryDirectory(prefix="onnxcomp-registry-") as tmp:
        work = Path(tmp)
        source_version = _call(lambda: client.get_model_version(name, str(version)), f"{name} version {version}")
        if progress:
            progress(f"downloading {name} version {version}", 0.0)
        source_path = fetch_onnx(mlflow, client, source_version, uri, work / "source")
        result, figures, paths = _optimize(source_path, pipeline, work / "out", calibration=calibration,
                                           evaluation=evaluation, preprocess=preprocess, providers=providers,
                                           tolerance=tolerance, gate=gate, dims=dims, progress=progress,
                                           **data_options)
        if progress:
            progress("registering the result", 1.0)
        return _register(mlflow, client, uri, source_version, target_name or name, experiment, result, figures,
                         paths)


def _call(fn, what: str):
    """An MLflow call whose failure (unknown model, server down) becomes one line."""
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as exc:
        first = (str(exc.message).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"MLflow: {what}: {first}") from None
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise InputError(f"MLflow: {what}: {exc}") from None


def fetch_onnx(mlflow, client, model_version, tracking_uri: str, dst: Path) -> Path:
    """Download the ONNX model of a registered version: its `onnx` flavour, else the single
    .onnx file among its artifacts, else the single .onnx artifact of its source run."""
    dst.mkdir(parents=True)
    what = f"{model_version.name} version {model_version.version}"
    uri = _call(lambda: client.get_model_version_download_uri(model_version.name, model_version.version), what)
    local = Path(_call(lambda: mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst / "version"),
                                                                   tracking_uri=tracking_uri), what))
    if local.is_file():
        found = [local] if local.suffix == ".onnx" else []
    elif (local / "MLmodel").is_file():
        from mlflow.models import Model as MlflowModel

        flavors = MlflowModel.load(str(local / "MLmodel")).flavors
        found = [local / flavors["onnx"]["data"]] if "onnx" in flavors else sorted(local.rglob("*.onnx"))
        if found and local.resolve() not in found[0].resolve().parents:  # an MLmodel pointing elsewhere
            raise InputError(f"MLflow: {what}: the onnx flavour's file {found[0].name!r} is outside the model folder")
    else:
        found = sorted(local.rglob("*.onnx"))
    if not found and model_version.run_id:
        run_files = _onnx_artifacts(client, model_version.run_id)
        if len(run_files) == 1:
            found = [Path(_call(lambda: mlflow.artifacts.download_artifacts(
                run_id=model_version.run_id, artifact_path=run_files[0], dst_path=str(dst / "run"),
                tracking_uri=tracking_uri), what))]
        else:
            found = run_files  # none, or ambiguous: reported below
    if len(found) != 1:
        raise InputError(f"MLflow: {what} has {'no' if not found else len(found)} ONNX model"
                         f"{'s' if len(found) != 1 else ''} ({uri}); register an mlflow.onnx model or one .onnx file")
    return found[0]


def _onnx_artifacts(client, run_id: str, folder: str | None = None) -> list[str]:
    files = []
    for info in _call(lambda: client.list_artifacts(run_id, folder), f"run {run_id}"):
        if info.is_dir:
            files += _onnx_artifacts(client, run_id, info.path)
        elif info.path.endswith(".onnx"):
            files.append(info.path)
    return files


def _optimize(source_path: Path, pipeline, out: Path, *, calibration, evaluation, preprocess, providers,
              tolerance, gate, dims, progress, **data_options):
    """Run the pipeline with the gate (onnxcomp.api.optimize), then write the model and both
    reports to `out` and gather the figures to log."""
    from onnxcomp.api import optimize
    from onnxcomp.errors import GateFailed
    from onnxcomp.html_report import write_html
    from onnxcomp.model import load, save
    from onnxcomp.runtime import CannotRun, RuntimeUnavailable, interleaved_latency_ms
    from onnxcomp.validate import generate_inputs

    try:
        result = optimize(source_path, pipeline, calibration, providers, evaluation=evaluation,
                          preprocess=preprocess, tolerance=tolerance, progress=progress, gate=gate, dims=dims,
                          **data_options)
    except GateFailed as exc:
        raise GateFailed(f"{exc}; nothing was registered") from None
    validation = result.report.validation or {}
    if validation.get("passed") is False:  # the same rule as `onnxcomp optimize`
        raise GateFailed("the result is outside tolerance, nothing was registered: " + validation["summary"])
    out.mkdir(parents=True)
    model_path = save(result.model, out / "model.onnx")
    packed_path = save(result.model, out / "model.onnxc") if getattr(result.model, "packing", None) else None
    source = load(source_path)
    figures: dict[str, float] = {
        "size_bytes_before": _file_bytes(source_path),
        "size_bytes_after": (packed_path or model_path).stat().st_size,
        "param_bytes_before": result.report.input.get("param_bytes", 0),
        "param_bytes_after": result.report.output.get("param_bytes", 0),
        "nodes_before": result.report.input.get("nodes", 0),
        "nodes_after": result.report.output.get("nodes", 0),
    }
    figures["size_ratio"] = figures["size_bytes_before"] / max(figures["size_bytes_after"], 1)
    gate_figures = result.report.gate or {}
    for key, metric in (("metric", "accuracy"), ("reference_metric", "accuracy_before"),
                        ("drop_points", "accuracy_drop_points"), ("cosine", "cosine"), ("max_abs", "max_abs")):
        if isinstance(gate_figures.get(key), (int, float)):
            figures[metric] = float(gate_figures[key])
    outputs = [o for p in validation.get("providers", []) for o in p.get("outputs", [])]
    if outputs:
        figures["validation_cosine"] = min(float(o["cosine"]) for o in outputs)
        figures["validation_max_abs"] = max(float(o["max_abs"]) for o in outputs)
        top1 = [o["top1"] for o in outputs if o.get("top1") is not None]
        if top1:
            figures["validation_top1_agreement"] = float(min(top1))
    try:
        feed = generate_inputs(source, 1, dims=dims)[0]
        latency = interleaved_latency_ms({"before": source, "after": result.model}, feed, threads=1, rounds=5,
                                         min_runs=5, round_seconds=0.05, warmup=3)
        figures["latency_ms_before"], figures["latency_ms_after"] = latency["before"], latency["after"]
    except (RuntimeUnavailable, CannotRun) as exc:  # e.g. custom ops: register without a latency
        result.report.notes.append(f"latency not measured: {exc}")
    paths = {"model": model_path, "packed": packed_path, "json": result.report.write(out / "report.json"),
             "html": write_html(out / "report.html", result.report, source, result.model, providers.split(","),
                               feed)}
    return result, figures, paths


def _file_bytes(path: Path) -> int:
    """An .onnx file plus the external data files it refers to."""
    import onnx

    from onnxcomp.model import _external_tensors

    proto = onnx.load(str(path), load_external_data=False)
    locations = {t.external_data[i].value for t in _external_tensors(proto)
                 for i in range(len(t.external_data)) if t.external_data[i].key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _register(mlflow, client, uri: str, source_version, target: str, experiment: str, result, figures, paths):
    """Log a run (model, reports, figures) in `experiment` and register its model as a version of `target`."""
    import onnx

    from onnxcomp.model import PROTOBUF_LIMIT, _initializer_bytes

    report = result.report
    final = report.gate["path"][-1]["pipeline"] if report.gate else report.pipeline
    source = f"{source_version.name}/{source_version.version}"
    tags = {
        TAG_PREFIX + "source_model": source_version.name,
        TAG_PREFIX + "source_version": str(source_version.version),
        TAG_PREFIX + "source_run_id": source_version.run_id or "",
        TAG_PREFIX + "source": f"models:/{source}",
        TAG_PREFIX + "pipeline": final,
        TAG_PREFIX + "requested_pipeline": report.pipeline,
        TAG_PREFIX + "gate": report.gate["gate"] if report.gate else "none",
    }
    version_tags = {**tags, **{TAG_PREFIX + k: _short(v) for k, v in figures.items()}}
    db = _sqlite_path(uri)
    experiment_id = _experiment(client, experiment, db)
    run = _call(lambda: client.create_run(experiment_id, run_name=f"onnxcomp {source}", tags=tags), "create a run")
    info = None
    try:
        client.log_param(run.info.run_id, "pipeline", final)
        client.log_param(run.info.run_id, "source", f"models:/{source}")
        for key, value in figures.items():
            client.log_metric(run.info.run_id, key, float(value))
        for kind in ("json", "html"):
            client.log_artifact(run.info.run_id, str(paths[kind]), "onnxcomp")
        proto = onnx.load(str(paths["model"]))
        # MLflow warns about models logged without a signature or input example: not an error here.
        with mlflow.start_run(run_id=run.info.run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.onnx.log_model(
                proto, name="model", pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                save_as_external_data=_initializer_bytes(proto) > PROTOBUF_LIMIT,
                extra_files=[str(paths["packed"])] if paths["packed"] else None)
        if not _exists(client, target):
            _call(lambda: client.create_registered_model(target), f"create {target}")
        version = _call(lambda: client.create_model_version(
            target, info.model_uri, run_id=run.info.run_id, tags=version_tags, model_id=info.model_id,
            description=f"onnxcomp `{final}` of models:/{source} "
                        f"({figures['size_bytes_before']:,} -> {figures['size_bytes_after']:,} bytes)"),
            f"register {target}")
    except BaseException:
        # A half-logged run is not a result: remove it (and its logged model) from the store.
        with suppress(Exception):  # the first error is the one to report
            client.delete_run(run.info.run_id)
            if info is not None:
                client.delete_logged_model(info.model_id)
        raise
    return RegisteredResult(target, str(version.version), run.info.run_id, source, final, report, figures)


@contextmanager
def _tracking(mlflow, uri: str):
    """Set MLflow's global tracking URI for a while (its fluent API and registry read it)."""
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def _experiment(client, name: str, db: Path | None) -> str:
    """The id of experiment `name`, created when missing; on a local SQLite store its artifacts
    go to a folder beside the database (MLflow's own default is relative to the current folder)."""
    found = _call(lambda: client.get_experiment_by_name(name), f"experiment {name}")
    if found is not None:
        return found.experiment_id
    location = (db.parent / LOCAL_ARTIFACTS).resolve().as_uri() if db is not None else None
    return _call(lambda: client.create_experiment(name, artifact_location=location), f"create experiment {name}")


def _short(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


__all__ = ["INSTALL_HINT", "RegisteredResult", "default_tracking_uri", "fetch_onnx", "optimize_version",
           "require_mlflow"]
