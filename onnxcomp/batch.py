"""Batch mode: `onnxcomp optimize` over many models, in parallel local processes or as Ray tasks.

Each model is one job, `run_one`, which calls the same `api.optimize_file` as the one-model
command, so presets, the gate and atomic saving behave identically. Locally every job runs in its
own spawned process: a model that fails — or crashes its process outright — is reported with a
one-line reason and the others go on. With `ray_address` the same `run_one` runs as Ray tasks
("local" starts a Ray instance on this machine); onnxcomp must then be installed on every node,
and the models and the output folder must be on storage every node can see.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Sequence

from onnxcomp.errors import InputError, OnnxcompError, OutputError
from onnxcomp.pipeline import Pipeline


class BatchFailed(OnnxcompError):
    """Some models failed (the others were written); each reason is in the summary."""

    exit_code = 1


class BatchInterrupted(OnnxcompError):
    exit_code = 130


@dataclass
class BatchJob:
    """One model to optimize. Plain, picklable values: it travels to a worker process or a Ray task."""

    model: str
    output: str
    spec: Pipeline
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of api.optimize_file
    force: bool = False


@dataclass
class ModelResult:
    model: str
    output: str | None
    status: str  # "ok" or "error"
    error: str = ""
    nodes_before: int | None = None
    nodes_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BatchSummary:
    results: list[ModelResult]
    runner: str  # "processes" or "ray <address>"
    workers: int
    seconds: float

    @property
    def failed(self) -> list[ModelResult]:
        return [r for r in self.results if not r.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "workers": self.workers, "seconds": round(self.seconds, 3),
                "ok": len(self.results) - len(self.failed), "failed": len(self.failed),
                "models": [{**asdict(r), "seconds": round(r.seconds, 3)} for r in self.results]}

    def write(self, path: str | Path) -> Path:
        from onnxcomp.files import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        done = len(self.results) - len(self.failed)
        title = (f"onnxcomp: {done} of {len(self.results)} models optimized in {self.seconds:.1f}s "
                 f"({self.runner}, {self.workers} at a time)")
        table = Table(title=title, title_justify="left")
        for col in ("model", "status", "nodes", "bytes", "time"):
            table.add_column(col, justify="right" if col in ("nodes", "bytes", "time") else "left")
        for r in self.results:
            status = "[green]ok" if r.ok else f"[red]error:[/] {escape(r.error)}"
            table.add_row(escape(Path(r.model).name), status, _delta(r.nodes_before, r.nodes_after),
                          _delta(r.bytes_before, r.bytes_after), f"{r.seconds:.2f}s")
        return table


def _delta(before: int | None, after: int | None) -> str:
    if before is None:
        return "-"
    return f"{before:,}" if after is None or after == before else f"{before:,} → {after:,}"


# ---- planning ------------------------------------------------------------------------------
def plan(models: Sequence[str | Path], outdir: str | Path, spec: Pipeline,
         options: dict[str, Any] | None = None, force: bool = False) -> list[BatchJob]:
    """One job per model: folders stand for every *.onnx in them; OUTDIR/<name> is each output
    (.onnxc when the pipeline ends with entropy coding). Refuses, before any work, two models
    that would write the same output and outputs that would overwrite their inputs (unless force)."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: is a file; batch mode writes into an output folder")
    files: list[Path] = []
    for item in map(Path, models):
        if item.is_dir():
            found = sorted(p for p in item.glob("*.onnx") if p.is_file())
            if not found:
                raise InputError(f"{item}: no *.onnx files in this folder")
            files += found
        else:
            files.append(item)  # a missing or bad file is that model's own error, not the batch's
    suffix = ".onnxc" if any(p.name == "entropy" for p in spec.passes) else ".onnx"
    jobs: list[BatchJob] = []
    seen_inputs: set[Path] = set()
    outputs: dict[Path, Path] = {}
    for path in files:
        if path.resolve() in seen_inputs:
            continue
        seen_inputs.add(path.resolve())
        output = outdir / (path.stem + suffix)
        if output in outputs:
            raise InputError(f"{outputs[output]} and {path} would both be written to {output}: rename one")
        outputs[output] = path
        if not force and output.exists() and output.resolve() == path.resolve():
            raise OutputError(f"{output}: refusing to overwrite the input model (use --force)")
        jobs.append(BatchJob(str(path), str(output), spec, dict(options or {}), force))
    if not jobs:
        raise InputError("no models to optimize")
    return jobs


# ---- the per-model job ---------------------------------------------------------------------
def run_one(job: BatchJob) -> ModelResult:
    """Optimize one model; every failure becomes this model's result, never an exception."""
    from onnxcomp.api import optimize_file

    started = time.perf_counter()
    model = Path(job.model)
    size = model.stat().st_size if model.is_file() else None
    try:
        result = optimize_file(model, job.output, job.spec, force=job.force, **job.options)
    except OnnxcompError as exc:
        return ModelResult(job.model, None, "error", str(exc), bytes_before=size,
                           seconds=time.perf_counter() - started)
    except Exception as exc:  # a bug in a pass: one line, like the CLI, and the other models go on
        first = str(exc).splitlines()[0] if str(exc) else ""
        return ModelResult(job.model, None, "error", f"internal error: {type(exc).__name__}: {first}",
                           bytes_before=size, seconds=time.perf_counter() - started)
    return ModelResult(job.model, job.output, "ok", nodes_before=result.report.input.get("nodes"),
                       nodes_after=result.model.summary()["nodes"], bytes_before=_stored_bytes(model),
                       bytes_after=_stored_bytes(Path(job.output)), seconds=time.perf_counter() - started,
                       notes=list(result.report.notes))


def _stored_bytes(path: Path) -> int:
    """The model file plus the external-data files it names inside its folder (weights past 2 GB)."""
    total = path.stat().st_size
    if path.suffix != ".onnx":
        return total
    import onnx

    from onnxcomp.model import _external_tensors

    folder = path.parent.resolve()
    locations = {entry.value for tensor in _external_tensors(onnx.load(str(path), load_external_data=False))
                 for entry in tensor.external_data if entry.key == "location"}
    for location in locations:
        data = (folder / location).resolve()
        if data.is_relative_to(folder) and data.is_file():
            total += data.stat().st_size
    return total


# ---- runners -------------------------------------------------------------------------------
def run_batch(jobs: list[BatchJob], workers: int | None = None, ray_address: str | None = None,
              on_done: Callable[[ModelResult], None] | None = None) -> BatchSummary:
    """Run every job; results come back in the order of `jobs`. `workers` defaults to the CPU count."""
    workers = max(1, workers or os.cpu_count() or 1)
    ray = _import_ray() if ray_address else None
    outdir = Path(jobs[0].output).parent
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, ModelResult] = {}

    def done(result: ModelResult) -> None:
        results[result.model] = result
        if on_done:
            on_done(result)

    try:
        if ray is not None:
            _run_ray(ray, jobs, ray_address, workers, done)
        else:
            _run_processes(jobs, workers, done)
    except KeyboardInterrupt:
        raise BatchInterrupted(f"interrupted after {len(results)} of {len(jobs)} models; the finished ones "
                               f"are in {outdir}, no partial output was written") from None
    runner = f"ray {ray_address}" if ray_address else "processes"
    return BatchSummary([results[job.model] for job in jobs], runner, workers, time.perf_counter() - started)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def _stop_signals_deferred():
    """Turn Ctrl-C and SIGTERM into a flag the scheduling loop checks, so that a signal never cuts
    a worker's start short (that leaves a half-started, untracked process printing a traceback).
    They stay blocked while a worker starts, too: the worker inherits that mask and lifts it in
    `_child`, so a Ctrl-C that reaches it during its start-up is delivered there, cleanly."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield requested
        return
    previous = {number: signal.signal(number, lambda signum, frame: requested.append(signum))
                for number in _STOP_SIGNALS}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def _blocked(signals: set[int]):
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _child(job: BatchJob, conn) -> None:
    """A worker process: SIGTERM unwinds like Ctrl-C so the atomic writes remove their temp files."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        conn.send(run_one(job))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


def _run_processes(jobs: list[BatchJob], workers: int, done: Callable[[ModelResult], None]) -> None:
    # One fresh process per model rather than a pool: a crash (segfault, out of memory) then
    # takes down only its own model, and an interrupt can stop every worker cleanly.
    # "spawn" because forking a process that already holds ORT/torch threads can deadlock.
    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    running: dict[Any, tuple[Any, BatchJob]] = {}  # result pipe -> (process, job)
    with _stop_signals_deferred() as stop_requested:
        try:
            while pending or running:
                while pending and len(running) < workers and not stop_requested:
                    job = pending.pop(0)
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(target=_child, args=(job, send),
                                              name=f"onnxcomp {Path(job.model).name}")
                    with _blocked(_STOP_SIGNALS):
                        process.start()
                    send.close()  # so that the pipe reads EOF if the child dies without answering
                    running[receive] = (process, job)
                if stop_requested:
                    raise KeyboardInterrupt
                for receive in wait(list(running), timeout=0.2):  # short: a stop request is seen soon
                    process, job = running.pop(receive)
                    result = _receive(receive)
                    process.join()
                    if result is None:
                        reason = f"the worker process died ({_exit_reason(process.exitcode)})"
                        result = ModelResult(job.model, None, "error", reason)
                        _remove_leftovers(Path(job.output))
                    done(result)
        except BaseException:
            for process, _ in running.values():
                process.terminate()
            for receive, (process, _) in running.items():
                process.join()
                result = _receive(receive)
                if result is not None:  # it finished before it was stopped: count it
                    done(result)
            raise


def _receive(receive) -> ModelResult | None:
    """The worker's result, or None when it ended without sending one."""
    try:
        return receive.recv() if receive.poll() else None
    except EOFError:
        return None
    finally:
        receive.close()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _remove_leftovers(output: Path) -> None:
    """A killed worker cannot clean up: remove the temporary files of its atomic write."""
    import shutil

    for leftover in output.parent.glob(f".{output.name}.*.tmp"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise OnnxcompError("--ray needs Ray, which is not installed: pip install 'onnxcomp[ray]'") from None
    return ray


def _run_ray(ray, jobs: list[BatchJob], address: str, workers: int,
             done: Callable[[ModelResult], None]) -> None:
    local = address == "local"
    try:
        if local:  # a Ray instance on this machine, as many workers as asked
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxcompError(f"cannot start Ray at {address!r}: {first}") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(run_one)
        refs = {task.remote(job): job for job in jobs}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died; run_one itself never raises
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        result = ModelResult(job.model, None, "error", f"the Ray task failed: {first}")
                        _remove_leftovers(Path(job.output))
                    done(result)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()
