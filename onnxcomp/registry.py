"""Pass name -> class. Pass modules register themselves with `@register`.

Every module under `onnxcomp.passes` (the top-level `passes/` folder), and every module in the
folders listed in $ONNXCOMP_PASS_PATH, is imported the first time a pass is looked up, so a new file there is enough for a pass to appear in the CLI and
the spec grammar; nothing heavy is imported before that, so the CLI starts fast.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

from onnxcomp.base import Pass
from onnxcomp.errors import SpecError

_PASSES: dict[str, type[Pass]] = {}
_loaded = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass available under `cls.name`."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} must set a string `name`")
    existing = _PASSES.get(name)
    # The same class imported twice (e.g. as `passes.x` and `onnxcomp.passes.x`) is one pass.
    if existing is not None and existing.__qualname__ == cls.__qualname__ \
            and existing.__module__.rsplit(".", 1)[-1] == cls.__module__.rsplit(".", 1)[-1]:
        return existing
    if existing is not None:
        raise TypeError(f"two passes are named {name!r}: {existing.__module__} and {cls.__module__}")
    _PASSES[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("onnxcomp.passes")
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"onnxcomp.passes.{module.name}")
    _load_user_folders()
    _loaded = True


def _load_user_folders() -> None:
    """Pass modules from the folders in $ONNXCOMP_PASS_PATH (a user's own passes)."""
    for folder in filter(None, os.environ.get("ONNXCOMP_PASS_PATH", "").split(os.pathsep)):
        for path in sorted(Path(folder).glob("*.py")):
            if path.name.startswith("_"):
                continue
            name = f"onnxcomp_user_passes.{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # a broken user module is the user's one-line problem
                raise SpecError(f"{path}: cannot load this pass module ({type(exc).__name__}: {exc})") from exc


def get(name: str) -> type[Pass]:
    """The pass class registered under `name`, or a SpecError with a suggestion."""
    _load_all()
    if name in _PASSES:
        return _PASSES[name]
    close = difflib.get_close_matches(name, list(_PASSES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SpecError(f"unknown pass {name!r}{hint}; `onnxcomp passes` lists them")


def all_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(_PASSES.items()))
