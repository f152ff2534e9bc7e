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
