"""Errors a user can act on. Each message is one line; the CLI prints it and exits non-zero."""

from __future__ import annotations


class OnnxcompError(Exception):
    """Base of every error onnxcomp reports to a user (never a traceback)."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep the message on one line whatever the wrapped library said.
        super().__init__(" ".join(str(message).split()))


class InputError(OnnxcompError):
    """The input model or data file is unreadable, invalid or unsafe."""


class SpecError(OnnxcompError):
    """The pipeline spec names an unknown pass or gives a bad parameter."""


class PassError(OnnxcompError):
    """A pass could not do its work on this model."""


class OutputError(OnnxcompError):
    """The output could not be written (or would overwrite the input)."""


class GateFailed(OnnxcompError):
    """The result is outside the tolerance the user asked for."""

    exit_code = 1


def describe_os_error(exc: OSError) -> str:
    """'PATH: REASON' for an OSError, e.g. "/mnt/ro/out.onnx: Read-only file system"."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    return f"{where}: {reason}" if where is not None else reason


def user_error(exc: BaseException) -> OnnxcompError | None:
    """The one-line error for an exception that escaped as a bug but that a user can act on
    (an OSError that names a file: read-only file system, permission denied, disk full...);
    None for anything else. The CLI's last resort: code that writes or reads a file the user
    named raises OutputError / InputError itself, with what it was doing."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return OnnxcompError(describe_os_error(exc))
    first = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, MemoryError) or isinstance(exc, ValueError) and first.startswith("array is too big"):
        return OnnxcompError(f"a tensor is too large for this machine's memory ({first.rstrip('.') or 'MemoryError'}); "
                             "if the model declares huge input sizes, give them with --dim NAME=SIZE or --shape")
    return None
