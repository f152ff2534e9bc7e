"""The `onnxcomp` console script and `python -m onnxcomp`.

Only the standard library is imported here, and the CLI (typer, rich, then onnx and numpy
inside the commands) is imported inside `main`, so a Ctrl-C or SIGTERM at any moment, the
first second of imports included, ends in the same one line and exit 130 as one in a pass.
"""

from __future__ import annotations

import sys  # already loaded by the interpreter: nothing here takes time before main's try

INTERRUPTED = "error: interrupted; no output was written"


def raise_interrupt(signum, frame):
    """SIGTERM behaves like Ctrl-C: the same clean-up, the same line."""
    raise KeyboardInterrupt


def _redeliver_lost_interrupt(unraisable) -> None:
    """A Ctrl-C that lands inside a callback Python cannot raise from (importlib's module-lock
    weakref callback, a __del__) is printed as "Exception ignored in ..." and lost, and the run
    goes on. Deliver it again to the main thread, where the clean one-line exit catches it;
    anything else goes to the default hook."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        import _thread

        # from another thread, a moment later: raised now, it would be lost inside this hook again
        _thread.start_new_thread(_interrupt_main_soon, ())
        return
    sys.__unraisablehook__(unraisable)


def _interrupt_main_soon() -> None:
    import _thread
    import time

    time.sleep(0.01)
    _thread.interrupt_main()


def main(argv: list[str] | None = None) -> None:
    sys.unraisablehook = _redeliver_lost_interrupt
    try:
        import signal

        signal.signal(signal.SIGTERM, raise_interrupt)
        from onnxcomp.cli import main as cli_main
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        _exit_interrupted()
    try:
        cli_main(argv)
    except SystemExit as exc:
        if exc.code == 130:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Exit with status 130 whatever the interrupt cut short.

    CPython marks a KeyboardInterrupt that leaves an eval()/exec() of a string (typing's forward
    references, dataclasses, namedtuple: many imports run some) as unhandled even when a caller
    catches it, and then ends the process by SIGINT instead of with the exit status asked for.
    So the exit handlers run here and the process ends with os._exit(130)."""
    import atexit
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        atexit._run_exitfuncs()  # what a normal exit would run (ray.shutdown, logging, ...)
    except BaseException:  # noqa: BLE001 - nothing may turn an interrupt into a traceback
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(130)
