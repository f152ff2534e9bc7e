"""The `onnxcomp` command line: a thin layer that builds the same objects the Python API does.

Every error a user can cause ends as one line on stderr and a non-zero exit (2 for bad input,
1 for a result outside tolerance), never a traceback; set ONNXCOMP_DEBUG=1 to see one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from onnxcomp.errors import GateFailed, InputError, OnnxcompError, SpecError

DEFAULT_PRESET = "lossless"  # what runs without --pipeline or --preset: nothing can be lost


def _exception_classes(name: str) -> tuple[type, ...]:
    """`name` from click and from typer's vendored copy of click (typer >= 0.20 ships its own)."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_EXIT = _exception_classes("Exit")
_ABORT = _exception_classes("Abort")
_USAGE = _exception_classes("ClickException")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="onnxcomp: optimize, prune, quantize and pack ONNX models, validated on ONNX Runtime.")
out = Console(width=None if sys.stdout.isatty() else 160)  # pipes get whole table rows
err = Console(stderr=True)


from onnxcomp.cli_options import (  # noqa: F401  (shared option types and parsers)
    AtolOpt, BudgetOpt, CalibrationOpt, CarryOpt, DIM_HELP, DimOpt,
    GATE_METRIC_HELP, GateMetricOpt, MaxDropOpt, MinCosineOpt, NoGateOpt, PipelineOpt,
    PreprocessOpt, PresetOpt, ProvidersOpt, RtolOpt, SHAPE_HELP, ShapeOpt,
    _carry, _check_output_path, _dims, _gate, _onto_input, _shapes,
    _staged, _tolerance,
)


@app.command()
def optimize(
    models: list[Path] = typer.Argument(..., metavar="MODEL",
                                        help="Input .onnx model; several models or folders (every *.onnx in them) "
                                             "run in batch mode."),
    output: Path = typer.Option(..., "-o", "--output",
                                help="Output .onnx (or .onnxc for a packed file); in batch mode the output folder."),
    pipeline: PipelineOpt = None,
    preset: PresetOpt = None,
    calibration: CalibrationOpt = None,
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", help="Held-out data to validate on (.npz or images)."),
    preprocess: PreprocessOpt = None,
    verify_each: bool = typer.Option(False, "--verify-each", help="Validate after every pass; roll a failing pass back."),
    on_failure: str = typer.Option("stop", "--on-failure", help="After a pass fails verification: stop or continue."),
    providers: ProvidersOpt = "cpu",
    dim: DimOpt = [],
    shape: ShapeOpt = [],
    carry_state: CarryOpt = [],
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    min_cosine: MinCosineOpt = None,
    max_drop: MaxDropOpt = None,
    gate_metric: GateMetricOpt = None,
    budget: BudgetOpt = 6,
    no_gate: NoGateOpt = False,
    keep_failed: Optional[Path] = typer.Option(None, "--keep-failed", help="When the gate cannot be met, write the "
                                               "attempt nearest it here (the exit code is still 1)."),
    report: list[Path] = typer.Option([], "--report", help="Write the report: .html (a page with plots) or .json; repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the input file (only once complete)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare the result with the input on ORT."),
    require_speedup: bool = typer.Option(False, "--require-speedup",
                                         help="Fail when a quantized model is slower than the float one."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1,
                                       help="Batch mode: models optimized at once (default: the CPU count)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Batch mode: run on the Ray cluster at ADDRESS "
                                                          "(or `local`); needs the ray extra."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Batch mode: write the per-model summary as JSON."),
):
    """Run a pipeline of passes over MODEL and write the result to OUTPUT.

    Batch mode (several models, a folder, an existing output folder, or --jobs/--ray/--summary):
    each model is optimized in its own process into the OUTPUT folder, a failing model does not
    stop the others, and a summary table follows; the exit code is 1 if any model failed."""
    from onnxcomp.api import optimize_file
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.presets import preset_spec

    if pipeline is not None and preset is not None:
        raise SpecError("give one of --pipeline or --preset, not both")
    if pipeline is None and preset is None:
        preset = DEFAULT_PRESET
    dims = _dims(dim)
    batch = len(models) > 1 or models[0].is_dir() or output.is_dir() or any(
        option is not None for option in (jobs, ray, summary))
    model = models[0]
    if not batch:
        _check_output_path(output, model, force)
    if no_gate and any(option is not None for option in (max_drop, min_cosine, atol, gate_metric)):
        raise SpecError("--no-gate turns the accuracy gate off: drop --max-drop/--min-cosine/--atol/--gate-metric, or --no-gate")
    if not batch:
        for path in [*report, *([keep_failed] if keep_failed is not None else [])]:
            _check_output_path(path, model, force)
    spec = Pipeline.parse(pipeline if pipeline is not None else preset_spec(preset),
                          verify_each=verify_each, on_failure=on_failure)
    if require_speedup:
        spec.passes = [p.with_params(require_speedup=True) if p.name == "quantize" else p for p in spec.passes]
    options = dict(calibration=calibration, providers=providers, evaluation=evaluation, preprocess=preprocess,
                   verify_each=verify_each, on_failure=on_failure, tolerance=_tolerance(atol, rtol, min_cosine),
                   check=check, gate=False if no_gate else _gate(max_drop, min_cosine, atol, budget, gate_metric),
                   dims=dims, shapes=_shapes(shape), carry_state=_carry(carry_state))
    if batch:
        if keep_failed is not None:
            raise SpecError("--keep-failed is for one model; batch mode writes nothing for a model below the gate")
        _optimize_many(models, output, spec, options, force, jobs, ray, summary, report, as_json)
        return
    with err.status("loading…") as status:
        def progress(step: str, fraction: float) -> None:
            status.update(f"[{fraction:4.0%}] {step}")

        try:
            result = optimize_file(model, output, spec, force=force, progress=progress, keep_failed=keep_failed,
                                   **options)
        except GateFailed as exc:  # outside tolerance: the JSON report still says why
            for path in report:
                if path.suffix != ".html" and getattr(exc, "report", None) is not None:
                    exc.report.write(path)
            raise
    for path in report:
        if path.suffix == ".html":
            from onnxcomp.html_report import write_html
            from onnxcomp.model import load
            from onnxcomp.validate import generate_inputs

            source = load(model)
            with err.status("writing the HTML report (timing both models)…"):
                write_html(path, result.report, source, result.model, providers.split(","),
                           generate_inputs(source, 1, dims=dims, shapes=_shapes(shape))[0], written=output)
        else:
            result.report.write(path)
    if as_json:
        print(result.report.to_json())
    else:
        out.print(result.report.table())
        if result.report.gate:
            for step in result.report.gate["path"]:
                if "action" in step:
                    out.print(f"gate: {step['reason']} -> {step['action']}", markup=False)
        for note in result.report.notes:
            out.print(f"note: {note}", markup=False)
        validation = result.report.validation
        if validation:
            colour = {True: "green", False: "red", None: "yellow"}[validation["passed"]]
            judged = f" ({escape(validation['gate'])})" if validation.get("gate") else ""
            out.print(f"validation on ORT: [{colour}]{escape(validation['verdict'])}[/]{judged} on "
                      f"{escape(validation['data'])} — {escape(validation['summary'])}")
        out.print(f"wrote {output} ({output.stat().st_size:,} bytes)")


def _optimize_many(models, outdir, spec, options, force, jobs, ray, summary, report, as_json) -> None:
    """Batch mode of `optimize` (onnxcomp.batch): a progress line per model, then one table."""
    from onnxcomp.batch import BatchFailed, plan, run_batch

    if report:
        raise SpecError("--report is for one model; in batch mode use --summary FILE.json")
    planned = plan(models, outdir, spec, options, force)
    finished = []

    def progress(result) -> None:
        finished.append(result)
        verdict = "ok" if result.ok else f"error: {result.error}"
        print(f"[{len(finished)}/{len(planned)}] {Path(result.model).name}: {verdict}", file=sys.stderr, flush=True)

    outcome = run_batch(planned, jobs, ray, on_done=progress)
    if summary is not None:
        outcome.write(summary)
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2))
    else:
        out.print(outcome.table())
    if outcome.failed:
        raise BatchFailed(f"{len(outcome.failed)} of {len(outcome.results)} models failed: "
                          + ", ".join(Path(r.model).name for r in outcome.failed))


@app.command()
def validate(
    reference: Path = typer.Argument(..., help="Reference model."),
    candidate: Path = typer.Argument(..., help="Candidate model (e.g. the optimized one)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs: .npz (samples on axis 0, or sample_0/NAME "
                                                                 "keys) or a folder of .npz/.npy files; else generated."),
    providers: str = typer.Option("cpu", "--providers", help="Execution providers, e.g. cpu,cuda."),
    atol: float = typer.Option(1e-5, "--atol"),
    rtol: float = typer.Option(1e-4, "--rtol"),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine"),
    samples: int = typer.Option(2, "--samples", help="Generated input samples when no --inputs."),
    dim: list[str] = typer.Option([], "--dim", help="Size of a symbolic input dimension in generated inputs, "
                                                      "NAME=SIZE (repeatable)."),
    shape: ShapeOpt = [],
    as_json: bool = typer.Option(False, "--json"),
):
    """Run REFERENCE and CANDIDATE on the same inputs; exit 0 within tolerance, 1 outside, 2 on error."""
    from onnxcomp.validate import validate as run_validate

    result = run_validate(reference, candidate, str(inputs) if inputs else None, providers,
                          _tolerance(atol, rtol, min_cosine), samples=samples, dims=_dims(dim), shapes=_shapes(shape))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"{candidate} vs {reference} ({result.samples} samples)", title_justify="left")
        for col in ("provider", "output", "max abs", "max rel", "cosine", "top-1", "verdict"):
            table.add_column(col)
        for p in result.providers:
            if p.skipped:
                table.add_row(p.provider, "-", "-", "-", "-", "-", f"[yellow]not run: {p.skipped}")
            for o in p.outputs:
                table.add_row(p.provider, o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", f"{o.cosine:.6f}",
                              "-" if o.top1 is None else f"{o.top1:.4f}",
                              "[green]ok" if o.passed else f"[red]FAIL {o.reason}")
        out.print(table)
    if not result.ran_any:
        raise InputError("no execution provider could run the models: " + result.worst())
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Model to describe (.onnx or .onnxc)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Opsets, inputs/outputs, op histogram, parameter bytes by dtype, sparsity."""
    from onnxcomp.api import inspect as run_inspect

    info = run_inspect(model)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.table import Table

    out.print(f"[bold]{model}[/]  IR {info['ir_version']}, opsets {info['opsets']}, producer {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            out.print(f"  {kind[:-1]:6} {t['name']}: {t['dtype']} {t['shape']}")
    out.print(f"  {info['nodes']:,} nodes, {info['initializers']:,} initializers, {info['parameters']:,} parameters, "
              f"{info['param_bytes']:,} parameter bytes {info['param_bytes_by_dtype']}, sparsity {info['sparsity']:.2%}")
    table = Table("op", "count", title="ops", title_justify="left")
    for op, count in info["ops"].items():
        table.add_row(op, str(count))
    out.print(table)


@app.command("passes")
def list_passes(presets: bool = typer.Option(False, "--presets", help="List the presets instead.")):
    """Every pass with its parameters, defaults and help."""
    import dataclasses

    from rich.markup import escape
    from rich.table import Table

    from onnxcomp.presets import PRESETS
    from onnxcomp.registry import all_passes
    from onnxcomp.spec import format_value

    if presets:
        table = Table("preset", "pipeline", "what it does")
        for name, (spec, help_text) in PRESETS.items():
            table.add_row(name, spec, help_text)
        out.print(table)
        return
    table = Table("pass", "kind", "parameters (default) — help", show_lines=True)
    for name, cls in all_passes().items():
        kind = "exact" if cls.exact else "lossless" if cls.lossless else "lossy"
        lines = []
        for f in dataclasses.fields(cls.Config):
            meta = f.metadata
            allowed = f" [{'|'.join(map(str, meta['choices']))}]" if meta.get("choices") else ""
            lines.append(f"{f.name}={format_value(f.default)}{allowed} — {meta.get('help', '')}")
        table.add_row(name, kind, escape(cls.summary() + ("\n" + "\n".join(lines) if lines else "")))
    out.print(table)


@app.command()
def pack(
    model: Path = typer.Argument(..., help="Input .onnx model."),
    output: Path = typer.Option(..., "-o", "--output", help="Output packed file (.onnxc)."),
    coder: str = typer.Option("auto", "--coder", help="auto (smallest per tensor), rans, huffman, zstd or raw."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the input file."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Entropy-code the weights into a packed .onnxc file that loads straight into ORT, bit-exact."""
    from onnxcomp.io import container

    _check_output_path(output, model, force)
    with err.status("packing…"):
        if _onto_input(output, model):  # with --force
            stats = _staged(output, lambda path: container.pack(model, path, coder))
        else:
            stats = container.pack(model, output, coder)
    if as_json:
        print(json.dumps({k: v for k, v in stats.items() if k != "per_tensor"}, indent=2, default=str))
        return
    ratio = stats["input_bytes"] / stats["packed_bytes"] if stats.get("packed_bytes") else 0
    out.print(f"wrote {output}: {stats['input_bytes']:,} → {stats['packed_bytes']:,} bytes ({ratio:.2f}×)")


@app.command()
def unpack(
    packed: Path = typer.Argument(..., help="Packed .onnxc file."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx model."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the input file."),
    external_data: bool = typer.Option(False, "--external-data", help="Weights to OUTPUT.data beside the model, "
                                       "written as they decode (always so past 2 GB)."),
):
    """Decode a packed .onnxc file back to the original .onnx model (initializers bit-identical)."""
    from onnxcomp.io import container

    _check_output_path(output, packed, force)
    with err.status("unpacking…"):
        if _onto_input(output, packed):  # with --force
            _staged(output, lambda path: container.unpack(packed, path, external_data or None))
        else:
            container.unpack(packed, output, external_data or None)
    data = output.parent / (output.name + ".data")
    extra = f" + {data.stat().st_size:,} in {data.name}" if data.exists() else ""
    out.print(f"wrote {output} ({output.stat().st_size:,} bytes{extra})")


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="The uncompressed model (.onnx) whose outputs are the targets."),
    student: Path = typer.Argument(..., help="The compressed model to retrain (.onnx or .onnxc)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx (or .onnxc, entropy-coded)."),
    data: Path = typer.Option(..., "--data", help="Training inputs (.npz, one array per input); no labels needed."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels (.npy/.npz) for a hard-label term."),
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", help="Held-out .npz to measure before/after."),
    epochs: int = typer.Option(20, "--epochs"),
    steps: int = typer.Option(0, "--steps", help="Optimizer steps instead of epochs."),
    lr: float = typer.Option(3e-3, "--lr"),
    batch_size: int = typer.Option(32, "--batch-size"),
    temperature: float = typer.Option(4.0, "--temperature"),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the hard-label term (with labels)."),
    feature: list[str] = typer.Option([], "--feature", help="Intermediate tensor to match too (repeatable)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the student file."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Retrain STUDENT to match TEACHER (knowledge distillation), keeping its pruning, codebooks and int8."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from onnxcomp.distill import DistillConfig, distill_file

    for path in (teacher, student, data):
        if not path.exists():
            raise InputError(f"{path}: no such file")
    _check_output_path(output, student, force)
    cfg = DistillConfig(epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, temperature=temperature,
                        alpha=alpha, features=tuple(feature), seed=seed, device=device)
    with Progress(TextColumn("distilling"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("distill", total=None, loss="-")
        summary = distill_file(teacher, student, output, data, cfg, labels=labels, evaluation=evaluation, force=force,
                               progress=lambda step, total, loss: bar.update(task, completed=step, total=total,
                                                                             loss=f"{loss:.4f}"))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"{summary['steps']} steps on {summary['device']} in {summary['seconds']:.1f}s; loss "
              f"{summary['loss_first']:.4g} → {summary['loss_last']:.4g}", markup=False)
    for when in ("before", "after"):
        out.print(f"{when} ({summary['evaluated_on']}): " + ", ".join(f"{k} {v:.4f}" for k, v in summary[when].items()),
                  markup=False)
    if "teacher" in summary and "accuracy" in summary["teacher"]:
        out.print(f"teacher accuracy {summary['teacher']['accuracy']:.4f}", markup=False)
    out.print(f"wrote {output} ({output.stat().st_size:,} bytes)")


export_app = typer.Typer(no_args_is_help=True, help="Export a model from a training framework to ONNX, verified on ORT.")
app.add_typer(export_app, name="export")


@export_app.command("torch")
def export_torch(
    target: str = typer.Argument(..., help="PKG.MODULE:FACTORY returning a torch.nn.Module (current folder importable)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx file."),
    input_shape: list[str] = typer.Option(..., "--input-shape", help="Shape of each input, e.g. 1x3x224x224 (repeatable)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Make axis 0 of every input and output dynamic."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset to export at."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (torch.export, then TorchScript), dynamo or torchscript."),
):
    """Export a PyTorch module and check its ORT outputs against torch's."""
    import torch

    from onnxcomp.torch_export import export, load_factory, parse_shape

    module = load_factory(target)
    generator = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(parse_shape(s), generator=generator) for s in input_shape)
    names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    dynamic = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with err.status(f"exporting {target}…"):
        result = export(module, args, output, dynamic_axes=dynamic, input_names=names, opset=opset, exporter=exporter)
    if result.fallback_reason:
        err.print(f"note: {result.fallback_reason}; used the TorchScript exporter instead", markup=False)
    out.print(f"wrote {output} ({result.exporter} exporter, opset {result.model.opset}); "
              f"ORT matches torch within {result.max_abs_error:.2g}")


@export_app.command("hf")
def export_hf_command(
    source: Path = typer.Argument(..., help="A local Hugging Face model folder (config.json and weights)."),
    output: Path = typer.Option(..., "-o", "--output", help="The .onnx file to write."),
    task: str = typer.Option("auto", "--task", help="auto, feature-extraction, sequence-classification or causal-lm."),
    past: bool = typer.Option(False, "--past", help="causal-lm: past_key_values.N.key/value in, present.N.* out."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset to export at."),
):
    """Export a transformers model with Optimum's input/output names, verified against torch on ORT."""
    from onnxcomp.frontends.hf import export_hf

    with err.status(f"exporting {source}…"):
        result = export_hf(source, output, task=task, past=past, opset=opset)
    out.print(f"wrote {output} (opset {result.model.opset}; inputs {', '.join(t.name for t in result.model.graph.inputs)}; "
              f"outputs {', '.join(t.name for t in result.model.graph.outputs)}; max abs error vs torch "
              f"{result.max_abs_error:.2e})", markup=False)


@export_app.command("tf")
def export_tf_command(
    source: Path = typer.Argument(..., help="A TensorFlow SavedModel folder (Keras: model.export(folder))."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .onnx file."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset to export at."),
):
    """Export a TensorFlow SavedModel through tf2onnx and check it against TensorFlow (needs the tf extra)."""
    from onnxcomp.tf_export import export_tf

    with err.status(f"converting {source}…"):
        result = export_tf(source, output, opset=opset)
    out.print(f"wrote {output} (tf2onnx, opset {result.model.opset}); ORT matches TensorFlow within {result.max_abs_error:.2g}")


registry_app = typer.Typer(no_args_is_help=True, help="Compress models in an MLflow model registry (needs the mlflow extra).")
app.add_typer(registry_app, name="registry")


@registry_app.command("optimize")
def registry_optimize(
    model: str = typer.Option(..., "--model", help="Registered model name."),
    version: str = typer.Option(..., "--version", help="Version of it to compress."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: sqlite:///./mlruns.db, no server)."),
    target_name: Optional[str] = typer.Option(None, "--target-name", help="Register under this name (default: --model)."),
    experiment: str = typer.Option("onnxcomp", "--experiment", help="Experiment to log the run in."),
    pipeline: PipelineOpt = None,
    preset: PresetOpt = None,
    calibration: CalibrationOpt = None,
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", help="Held-out data for the gate (.npz or images)."),
    preprocess: PreprocessOpt = None,
    providers: ProvidersOpt = "cpu",
    dim: DimOpt = [],
    shape: ShapeOpt = [],
    carry_state: CarryOpt = [],
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    min_cosine: MinCosineOpt = None,
    max_drop: MaxDropOpt = None,
    gate_metric: GateMetricOpt = None,
    budget: BudgetOpt = 6,
    no_gate: NoGateOpt = False,
):
    """Compress a registered ONNX model version under the gate and register the result as a new version."""
    from onnxcomp.mlflow_registry import optimize_version, require_mlflow
    from onnxcomp.pipeline import Pipeline
    from onnxcomp.presets import preset_spec

    require_mlflow()  # before any work: one line saying how to install it
    if pipeline is not None and preset is not None:
        raise SpecError("give one of --pipeline or --preset, not both")
    if pipeline is None and preset is None:
        preset = DEFAULT_PRESET
    dims = _dims(dim)
    spec = Pipeline.parse(pipeline if pipeline is not None else preset_spec(preset))
    with err.status("loading…") as status:
        result = optimize_version(tracking_uri, model, version, spec, target_name=target_name, experiment=experiment,
                                  calibration=calibration, evaluation=evaluation, preprocess=preprocess,
                                  providers=providers, tolerance=_tolerance(atol, rtol, min_cosine),
                                  gate=False if no_gate else _gate(max_drop, min_cosine, atol, budget, gate_metric), dims=dims,
                                  shapes=_shapes(shape), carry_state=_carry(carry_state), progress=lambda step, fraction: status.update(f"[{fraction:4.0%}] {step}"))
    out.print(result.report.table())
    m = result.metrics
    out.print(f"registered {result.name} version {result.version} (run {result.run_id}) from {result.source} "
              f"with {result.pipeline}: {m['size_bytes_before']:,} -> {m['size_bytes_after']:,} bytes",
              markup=False, soft_wrap=True)


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: temp files are cleaned up
    raise KeyboardInterrupt


def _error(message: str) -> None:
    """One plain line on stderr (no rich wrapping, so scripts can read it)."""
    print("error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit: 0, 1 (outside tolerance), 2 (a user error: one line), 3 (a bug:
    one line), 130 (interrupted). The console script enters through onnxcomp.entry, which
    covers a Ctrl-C while this module imports; everything from here on is inside the try."""
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        command = typer.main.get_command(app)
        code = command.main(args=argv, prog_name="onnxcomp", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C (and our SIGTERM) into a returned 130
            _error("interrupted; no output was written")
    except _EXIT as exc:
        code = exc.exit_code
    except _USAGE as exc:
        _error(exc.format_message())
        code = 2
    except (KeyboardInterrupt, *_ABORT):
        _error("interrupted; no output was written")
        code = 130
    except OnnxcompError as exc:
        _error(str(exc))
        code = exc.exit_code
    except Exception as exc:  # a bug: still one line unless debugging
        if os.environ.get("ONNXCOMP_DEBUG"):
            raise
        from onnxcomp.errors import user_error

        known = user_error(exc)  # an OSError, MemoryError... a user can act on: one line, exit 2
        if known is not None:
            _error(str(known))
            code = known.exit_code
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            _error(f"internal error: {type(exc).__name__}: {first} (set ONNXCOMP_DEBUG=1 for a traceback)")
            code = 3
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
