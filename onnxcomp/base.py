"""The pass contract: Pass, PassResult and typed, validated parameters.

A pass declares its parameters as a frozen dataclass `Config` whose fields are made with
`param(...)`; the field's help, allowed values and range drive parse-time validation, the
canonical spec text and `onnxcomp passes`. A bad parameter fails before any work is done,
with a one-line message naming the pass, the parameter and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from onnxcomp.errors import SpecError


@dataclass(frozen=True)
class PassResult:
    """What a pass did. `changed` is honest: a pass that edited nothing says False."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


def param(default: Any, help: str, *, choices: typing.Sequence[Any] | None = None,
          min: float | None = None, max: float | None = None) -> Any:
    """A pass parameter: default, one-line help, and optional allowed values or range."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass parameter defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoConfig:
    """A pass without parameters."""


class Pass:
    """One graph rewrite. Subclasses set `name`, `lossless`, `Config` and implement `run`.

    `lossless` passes are held to outputs within float rounding of the input model;
    `exact` ones (fold, cleanup) to bit-identical outputs on ORT.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = True
    exact: ClassVar[bool] = False
    Config: ClassVar[type] = NoConfig
    # True when run() reads ctx.input_model (the model before the pipeline's first pass): only
    # then does the pipeline keep that copy.
    needs_input_model: bool = False

    def __init__(self, **params: Any):
        self.config = build_config(self.name, self.Config, params)

    def run(self, model, ctx) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring: the one-line help of the pass."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def backoff(self, shortfall: float = 1.0) -> Pass | None:
        """A weaker version of this pass (lower sparsity, more bits...) for the accuracy gate to
        retry with, or None when it cannot be weakened. Lossy passes override this. `shortfall`:
        how far the failed result was from the gate (its error / the error allowed, >= 1), for
        a pass that can size its step to it."""
        return None

    def with_params(self, **changes: Any) -> Pass:
        """A copy with some parameters changed (used when backing off a lossy pass)."""
        params = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        params.update(changes)
        return type(self)(**params)

    def params(self) -> dict[str, Any]:
        """The parameters that differ from their defaults, in declaration order."""
        out = {}
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value != f.default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        from onnxcomp.spec import format_value

        params = self.params()
        if not params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) + ")"

    def __repr__(self) -> str:
        return f"<Pass {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.config))


def build_config(pass_name: str, config_cls: type, params: dict[str, Any]):
    """Coerce and validate raw parameters (from text, YAML or Python) into a Config."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, raw in params.items():
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise SpecError(f"{pass_name}: unknown parameter {key!r} (parameters: {allowed})")
        values[key] = _check_value(pass_name, key, raw, hints[key], fields[key].metadata)
    return config_cls(**values)


def _check_value(pass_name: str, key: str, raw: Any, hint: Any, meta: dict) -> Any:
    where = f"{pass_name}: parameter {key}"
    value = coerce(raw, hint, where)
    choices = meta.get("choices")
    if choices and value not in choices and value is not None:
        raise SpecError(f"{where} = {raw!r} is not allowed (choose one of: {', '.join(map(str, choices))})")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SpecError(f"{where} = {raw!r} is out of range (must be between {lo} and {hi})")
    return value


def coerce(raw: Any, hint: Any, where: str) -> Any:
    """Turn a raw value into the declared type (bool, int, float, str, tuple[str,...], Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        last_error = None
        for candidate in inner:
            try:
                return coerce(raw, candidate, where)
            except SpecError as exc:
                last_error = exc
        raise last_error  # type: ignore[misc]
    if origin is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        inner = args[0] if args else str
        return tuple(coerce(item, inner, where) for item in items)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return raw.lower() in ("true", "yes", "on", "1")
        raise SpecError(f"{where} = {raw!r} is not a boolean (use true or false)")
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise SpecError(f"{where} = {raw!r} is not an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SpecError(f"{where} = {raw!r} is not an integer") from None
    if hint is float:
        if isinstance(raw, bool):
            raise SpecError(f"{where} = {raw!r} is not a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SpecError(f"{where} = {raw!r} is not a number") from None
    if hint is str:
        if isinstance(raw, (list, tuple, dict)):
            raise SpecError(f"{where} = {raw!r} is not a single value")
        return str(raw).lower() if isinstance(raw, bool) else str(raw)
    return raw
