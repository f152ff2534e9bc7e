"""The command line's shared options and their parsing: declared once, so that `optimize`,
`validate` and `registry optimize` cannot drift apart; each bad value is one InputError line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxcomp.errors import InputError, OutputError, SpecError


def _tolerance(atol: Optional[float], rtol: Optional[float], min_cosine: Optional[float]):
    from onnxcomp.context import Tolerance

    if atol is None and rtol is None and min_cosine is None:
        return None
    tol = Tolerance()
    if atol is not None:
        tol.atol = atol
    if rtol is not None:
        tol.rtol = rtol
    tol.min_cosine = min_cosine
    return tol


DIM_HELP = ("Size of a symbolic input dimension in generated inputs (validation, gate), NAME=SIZE; "
            "repeatable. The model keeps it symbolic.")


def _dims(items: list[str]) -> dict[str, int]:
    """--dim NAME=SIZE options as {NAME: SIZE}."""
    dims = {}
    for item in items:
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise InputError(f"--dim {item!r}: expected NAME=SIZE with SIZE a whole number >= 1")
        dims[name] = int(size)
    return dims


SHAPE_HELP = ("Whole shape of one input in generated inputs, NAME=1x512 (any axis, named or not; NAME=scalar "
              "for a 0-d input); repeatable. The model keeps its own shape.")


def _shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """--shape NAME=AxBxC options as {NAME: (A, B, C)}; `scalar` (or nothing) is a 0-d input."""
    shapes = {}
    for item in items:
        name, _, text = item.partition("=")
        sizes = [] if text.strip().lower() in ("", "scalar") else text.lower().split("x")
        if not name or not all(size.isdigit() for size in sizes):
            raise InputError(f"--shape {item!r}: expected NAME=AxBxC with whole numbers, e.g. input=1x512, or NAME=scalar")
        shapes[name] = tuple(int(size) for size in sizes)
    return shapes


def _carry(items: list[str]) -> dict[str, str]:
    """--carry-state OUTPUT=INPUT options as {OUTPUT: INPUT}."""
    pairs = {}
    for item in items:
        output, _, input_name = item.partition("=")
        if not output or not input_name:
            raise InputError(f"--carry-state {item!r}: expected OUTPUT=INPUT, e.g. stateN=state")
        pairs[output] = input_name
    return pairs


GATE_METRIC_HELP = ("Gate: the task metric --max-drop holds, MODULE:FUNCTION or FILE.py:FUNCTION. "
                    "FUNCTION(outputs, labels) -> float, higher is better: outputs is a list with one "
                    "{output name: numpy array} per evaluation sample, labels the evaluation data's `labels` "
                    "array, flattened (None without). Drop in points = 100 x (value on the input - value on the result).")

# Options that `optimize` and `registry optimize` share, declared once so the two cannot drift apart.
PipelineOpt = Annotated[Optional[str], typer.Option("--pipeline", "-p", help="Pipeline spec text or a .yaml/.json file.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="A named pipeline (see `onnxcomp passes --presets`); without --preset or --pipeline: lossless.")]
CalibrationOpt = Annotated[Optional[Path], typer.Option(
    "--calibration", help="Calibration data: .npz (one array per input, samples on axis 0; or sample_0/NAME keys), "
                          "a folder of .npz/.npy files, or an image folder. A lossy pipeline holds half of it out "
                          "for the accuracy gate unless --evaluation is given.")]
PreprocessOpt = Annotated[Optional[str], typer.Option("--preprocess",
                                                      help="For image folders, e.g. size=320x240,mean=127,std=128.")]
ProvidersOpt = Annotated[str, typer.Option("--providers", help="Execution providers to validate on, e.g. cpu,cuda.")]
DimOpt = Annotated[list[str], typer.Option("--dim", help=DIM_HELP)]
ShapeOpt = Annotated[list[str], typer.Option("--shape", help=SHAPE_HELP)]
CarryOpt = Annotated[list[str], typer.Option("--carry-state", help="A stateful model: feed output OUTPUT of one sample "
                                                                    "to input INPUT of the next, OUTPUT=INPUT; repeatable.")]
NoGateOpt = Annotated[bool, typer.Option("--no-gate", help="Run a lossy pipeline unchecked: the report and the "
                                                           "model's metadata say NOT VALIDATED.")]
AtolOpt = Annotated[Optional[float], typer.Option("--atol", help="Gate: max absolute output error vs the input model.")]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance for lossy passes.")]
MinCosineOpt = Annotated[Optional[float], typer.Option("--min-cosine", help="Gate: minimum output cosine vs the input model.")]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="Gate: max task-metric drop in points "
                                                                        "(needs labels or --gate-metric).")]
GateMetricOpt = Annotated[Optional[str], typer.Option("--gate-metric", help=GATE_METRIC_HELP)]
BudgetOpt = Annotated[int, typer.Option("--budget", help="Gate: how many back-offs to try before giving up.")]



def _gate(max_drop: float | None, min_cosine: float | None, atol: float | None, budget: int,
          gate_metric: str | None):
    """The Gate the options describe, with --gate-metric's function loaded (before any work)."""
    from onnxcomp.gate import Gate, load_metric

    metric = None
    if gate_metric is not None:
        if max_drop is None:
            raise SpecError("--gate-metric gives the metric that --max-drop holds: give --max-drop POINTS too")
        metric = load_metric(gate_metric)
    # No tolerance given: an inactive Gate, which the API replaces by the default gate for a
    # lossy pipeline (keeping the budget) and leaves off for a lossless one.
    return Gate(max_drop=max_drop, min_cosine=min_cosine, atol=atol, budget=budget, metric=metric)


def _onto_input(output: Path, source: Path) -> bool:
    return output.exists() and source.exists() and output.resolve() == source.resolve()


def _staged(output: Path, write):
    """--force onto the input itself, for writers that refuse their input as output (container's):
    `write` makes the complete file(s) in a staging folder beside OUTPUT, then they replace it by
    rename, data files before the model - never a half-written input. Returns what `write` does."""
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        result = write(staging / output.name)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == output.name):
            os.replace(item, output.parent / item.name)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_output_path(output: Path, source: Path, force: bool) -> None:
    """Fail before any work when the output cannot or must not be written."""
    from onnxcomp.files import check_writable

    if not output.parent.exists():
        raise OutputError(f"{output}: the folder {output.parent} does not exist")
    if _onto_input(output, source) and not force:
        raise OutputError(f"{output}: refusing to overwrite the input model (use --force)")
    check_writable(output)
