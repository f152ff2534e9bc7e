"""Presets: named pipeline specs, nothing more (`--preset NAME`, `onnxcomp passes --presets`)."""

from __future__ import annotations

from onnxcomp.errors import SpecError

PRESETS: dict[str, tuple[str, str]] = {
    "lossless": ("fold, cleanup, fuse", "constant folding, clean-up and fusions; outputs unchanged"),
}


def preset_spec(name: str) -> str:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name][0]
