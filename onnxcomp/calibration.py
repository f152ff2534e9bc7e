"""Calibration data sources and activation capture through ONNX Runtime.

Sources: a `.npz` file (one array per model input, samples along axis 0), a folder of images
with a stated preprocessing, or any Python iterable of `{input_name: array}` dicts. Capture
exposes chosen intermediate tensors as extra graph outputs and yields them batch by batch, so
a caller can stream statistics without holding every activation in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx

from onnxcomp.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImagePreprocess:
    """How photos become one model input: resize to width x height, then (pixel - mean) / std.

    `grayscale` gives one channel; `layout` is "nchw" or "nhwc"; `input_name` defaults to the
    model's first input.
    """

    width: int
    height: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    grayscale: bool = False
    layout: str = "nchw"
    bgr: bool = False
    input_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImagePreprocess:
        """'size=320x240,mean=127,std=128[,gray][,nhwc][,bgr][,input=NAME]'."""
        opts: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                if key == "size":
                    w, h = value.lower().split("x")
                    opts["width"], opts["height"] = int(w), int(h)
                elif key in ("mean", "std"):
                    opts[key] = tuple(float(v) for v in value.split("/"))
                elif key in ("gray", "grayscale"):
                    opts["grayscale"] = True
                elif key in ("nchw", "nhwc"):
                    opts["layout"] = key
                elif key == "bgr":
                    opts["bgr"] = True
                elif key == "input":
                    opts["input_name"] = value
                else:
                    raise ValueError(key)
            except ValueError:
                raise InputError(f"image preprocessing: cannot read {part!r} (expected e.g. size=320x240,mean=127,std=128)") from None
        if "width" not in opts:
            raise InputError("image preprocessing needs size=WIDTHxHEIGHT")
        return cls(**opts)

    def load(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB").resize((self.width, self.height), Image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"{path}: cannot read the image ({exc})") from exc
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self.bgr:
            pixels = pixels[..., ::-1]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "nchw":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels[None])


class CalibrationData:
    """A re-iterable sequence of feeds ({input name: array}), whatever the source."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], description: str):
        if not feeds:
            raise InputError(f"calibration data {description} holds no samples")
        self.feeds = feeds
        self.description = description

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def split(self, holdout: float = 0.5) -> tuple[CalibrationData, CalibrationData]:
        """Disjoint (calibration, evaluation) halves: the two never share a sample."""
        cut = max(1, min(len(self.feeds) - 1, int(round(len(self.feeds) * (1 - holdout)))))
        if len(self.feeds) < 2:
            raise InputError("need at least two samples to hold some out for evaluation")
        return (CalibrationData(self.feeds[:cut], f"{self.description} [calibration part]"),
                CalibrationData(self.feeds[cut:], f"{self.description} [evaluation part]"))

    @classmethod
    def from_source(cls, source: Any, preprocess: ImagePreprocess | str | None = None,
                    input_names: list[str] | None = None, limit: int | None = None) -> CalibrationData | None:
        if source is None or isinstance(source, CalibrationData):
            return source
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                if preprocess is None:
                    raise InputError(f"{path}: an image folder needs a preprocessing (e.g. size=224x224,mean=127.5,std=127.5)")
                pre = ImagePreprocess.parse(preprocess) if isinstance(preprocess, str) else preprocess
                return cls._from_images(path, pre, input_names, limit)
            if path.suffix == ".npz":
                return cls._from_npz(path, limit)
            raise InputError(f"{path}: calibration data must be a .npz file or a folder of images")
        if isinstance(source, dict):
            source = [source]
        try:
            feeds = []
            for feed in source:
                if not isinstance(feed, dict):
                    raise InputError("calibration data from Python must yield {input_name: numpy array} dicts")
                feeds.append({str(k): np.asarray(v) for k, v in feed.items()})
                if limit and len(feeds) >= limit:
                    break
        except TypeError:
            raise InputError("calibration data must be an iterable of {input_name: array} dicts") from None
        return cls(feeds, "from Python")

    @classmethod
    def _from_npz(cls, path: Path, limit: int | None) -> CalibrationData:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the .npz file ({exc})") from exc
        lengths = {len(a) for a in arrays.values() if a.ndim > 0}
        if len(lengths) != 1:
            raise InputError(f"{path}: every array needs the same number of samples along axis 0")
        count = lengths.pop()
        if limit:
            count = min(count, limit)
        feeds = [{k: a[i:i + 1] for k, a in arrays.items()} for i in range(count)]
        return cls(feeds, str(path))

    @classmethod
    def _from_images(cls, folder: Path, pre: ImagePreprocess, input_names: list[str] | None,
                     limit: int | None) -> CalibrationData:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit:
            files = files[:limit]
        name = pre.input_name or (input_names[0] if input_names else "input")
        return cls([{name: pre.load(p)} for p in files], f"{folder} ({len(files)} images)")


def tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every tensor ONNX shape inference can type (inputs, outputs, value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # inference is best-effort: a model ORT runs may still defeat it
        inferred = proto
    graph = inferred.graph
    return {vi.name: vi.type for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}


def with_extra_outputs(proto: onnx.ModelProto, names: Iterable[str], typed: bool = True) -> onnx.ModelProto:
    """A copy of the model whose graph also outputs the named intermediate tensors.

    `typed=False` skips shape inference (ORT accepts untyped outputs): much faster on big models.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    types = tensor_types(proto) if typed else {}
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name in existing:
            continue
        vi = out.graph.output.add(name=name)
        if name in types:
            vi.type.CopyFrom(types[name])
    return out


def capture(model, names: list[str], data: Iterable[dict[str, np.ndarray]], provider: str = "cpu",
            threads: int | None = None, typed: bool = True
            ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {tensor name: value}) for every calibration feed, one batch at a time.

    `typed=False`: the extra outputs are left untyped (no shape inference), see with_extra_outputs.
    """
    from onnxcomp.model import Model
    from onnxcomp.runtime import make_session, run

    proto = model.to_proto() if isinstance(model, Model) else model
    session = make_session(with_extra_outputs(proto, names, typed), provider, threads=threads)
    for feed in data:
        yield feed, run(session, feed, list(names))
