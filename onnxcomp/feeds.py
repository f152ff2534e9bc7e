"""Data a model runs on: calibration and evaluation feeds, from whatever the user has.

A feed is one sample: {input name: array of exactly the shape the model takes}. Sources:
- `.npz`, stacked layout: one array per input with the samples on axis 0 (an array of the
  input's own rank is cut into batches of one, `a[i:i+1]`; one rank more is cut into `a[i]`);
  a 0-d array, or an array whose shape is exactly a fixed input shape, is a constant given
  to every sample (a sample rate, an initial recurrent state);
- `.npz`, per-sample layout: `sample_0/NAME`, `sample_1/NAME`, ... one complete feed per sample,
  plus plain `NAME` keys for inputs that are the same in every sample;
- a folder of `.npz` files (one feed each) or `.npy` files (one sample each of a one-input
  model), or a folder of images with a stated preprocessing;
- a Python iterable of feeds, or anything with `get_next()` (ONNX Runtime's CalibrationDataReader).
Feeds are checked against the model's inputs (`conform`): a missing input, a wrong rank or size
or an incompatible dtype is one line naming the sample, the input, and expected vs got.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from onnxcomp.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LABELS_KEY = "labels"
SAMPLE_KEY = re.compile(r"^sample_(\d+)/(.+)$")


@dataclass(frozen=True)
class InputSpec:
    """One graph input as data must match it: numpy dtype and dims (int, name, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple

    def describe(self) -> str:
        return f"{self.dtype} [{', '.join('?' if d is None else str(d) for d in self.dims)}]"

    @property
    def fixed(self) -> bool:
        return self.dims is not None and all(isinstance(d, int) for d in self.dims)


def input_specs(model) -> list[InputSpec]:
    """The inputs a feed must give (graph inputs that are not initializers), with their types."""
    import onnx

    from onnxcomp.model import Model

    proto = model.to_proto(weights=False) if isinstance(model, Model) else model  # the inputs only
    initializers = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in initializers or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        # a negative size (-1: Paddle's exports) means "any size", as an unnamed dimension does
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                     for d in tt.shape.dim)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:  # an element type numpy has no dtype for: checked by ORT instead
            continue
        specs.append(InputSpec(vi.name, dtype, dims if tt.HasField("shape") else None))
    return specs


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
        """Disjoint (calibration, evaluation) parts, the held-out part at the end: the two never
        share a sample."""
        if len(self.feeds) < 2:
            raise InputError("need at least two samples to hold some out for evaluation")
        cut = max(1, min(len(self.feeds) - 1, int(round(len(self.feeds) * (1 - holdout)))))
        return (CalibrationData(self.feeds[:cut], f"{self.description} [calibration part]"),
                CalibrationData(self.feeds[cut:], f"{self.description} [held-out part]"))

    # ---- checking against the model ---------------------------------------------------------
    def conform(self, specs: list[InputSpec]) -> CalibrationData:
        """Check every feed against the model's inputs; cast within a kind (float64 data for a
        float32 input) and add a missing batch axis of one, refuse anything else in one line."""
        known = {s.name for s in specs}
        for index, feed in enumerate(self.feeds):
            where = f"{self.description}, sample {index}"
            unknown = [k for k in feed if k not in known and k != LABELS_KEY]
            if unknown:
                raise InputError(f"{where}: {unknown[0]!r} is not an input of the model "
                                 f"(its inputs: {', '.join(sorted(known)) or 'none'})")
            for spec in specs:
                if spec.name not in feed:
                    raise InputError(f"{where}: input {spec.name!r} ({spec.describe()}) is missing "
                                     f"(the sample has: {', '.join(sorted(feed)) or 'nothing'})")
                feed[spec.name] = _conformed(feed[spec.name], spec, where)
        return self

    def carry_state(self, model, pairs: dict[str, str]) -> CalibrationData:
        """Feed a stateful model its own state: sample i's input IN becomes what the input model
        output as OUT on sample i-1 (`pairs` = {OUT: IN}), run in order on ORT. The first sample
        keeps the state it was given."""
        from onnxcomp.runtime import make_session, run

        if not pairs:
            return self
        session = make_session(model, "cpu", threads=None)
        outputs = {o.name for o in session.get_outputs()}
        for out_name, in_name in pairs.items():
            if out_name not in outputs:
                raise InputError(f"--carry-state {out_name}={in_name}: the model has no output {out_name!r}")
        previous = None
        for feed in self.feeds:
            if previous is not None:
                for out_name, in_name in pairs.items():
                    feed[in_name] = previous[out_name].astype(feed[in_name].dtype, copy=False)
            previous = run(session, feed, list(pairs))
        self.description += f" (state carried: {', '.join(f'{o}->{i}' for o, i in pairs.items())})"
        return self

    # ---- sources -----------------------------------------------------------------------------
    @classmethod
    def from_source(cls, source: Any, preprocess: ImagePreprocess | str | None = None,
                    input_names: list[str] | None = None, limit: int | None = None,
                    specs: list[InputSpec] | None = None) -> CalibrationData | None:
        """Read any supported source (see the module docstring); with `specs`, the model's
        inputs, the layout of a stacked .npz is read against them and every feed is checked."""
        if source is None:
            return None
        if isinstance(source, CalibrationData):
            data = source
        elif isinstance(source, (str, os.PathLike)):
            data = cls._from_path(Path(source), preprocess, input_names or [s.name for s in specs or []],
                                  limit, specs)
        elif hasattr(source, "get_next"):  # ONNX Runtime's CalibrationDataReader, as it is
            data = cls(_first(iter(source.get_next, None), limit, "from a get_next() reader"), "from a reader")
        else:
            if isinstance(source, dict):
                source = [source]
            try:
                iterator = iter(source)
            except TypeError:
                raise InputError("calibration data must be an iterable of {input_name: array} dicts, or a "
                                 "reader with get_next()") from None
            data = cls(_first(iterator, limit, "from Python"), "from Python")
        return data.conform(specs) if specs else data

    @classmethod
    def _from_path(cls, path: Path, preprocess, input_names: list[str], limit: int | None,
                   specs: list[InputSpec] | None) -> CalibrationData:
        if path.is_dir():
            arrays = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
            if arrays:
                return cls._from_array_folder(path, arrays, input_names, limit, specs)
            if preprocess is None:
                raise InputError(f"{path}: a folder of images needs a preprocessing "
                                 "(e.g. size=224x224,mean=127.5,std=127.5); or give .npz/.npy files")
            pre = ImagePreprocess.parse(preprocess) if isinstance(preprocess, str) else preprocess
            return cls._from_images(path, pre, input_names, limit)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.suffix == ".npz":
            return cls._from_npz(path, limit, specs)
        raise InputError(f"{path}: data must be a .npz file, a folder of .npz/.npy files or a folder of images")

    @classmethod
    def _from_npz(cls, path: Path, limit: int | None, specs: list[InputSpec] | None) -> CalibrationData:
        arrays = read_npz(path)
        per_sample: dict[int, dict[str, np.ndarray]] = {}
        constants = {}
        for key, value in arrays.items():
            match = SAMPLE_KEY.match(key)
            if match:
                per_sample.setdefault(int(match.group(1)), {})[match.group(2)] = value
            else:
                constants[key] = value
        if per_sample:
            feeds = [{**constants, **per_sample[i]} for i in sorted(per_sample)]
        else:
            feeds = _unstack(arrays, {s.name: s for s in specs or []}, path)
        return cls(feeds[:limit] if limit else feeds, str(path))

    @classmethod
    def _from_array_folder(cls, folder: Path, files: list[Path], input_names: list[str], limit: int | None,
                           specs: list[InputSpec] | None) -> CalibrationData:
        files = files[:limit] if limit else files
        feeds = []
        for file in files:
            if file.suffix == ".npz":
                feeds.append(read_npz(file))
                continue
            if len(input_names) != 1:
                raise InputError(f"{file}: a .npy file holds one input, but the model has {len(input_names)} "
                                 "inputs: give one .npz per sample instead")
            try:
                feeds.append({input_names[0]: np.load(file, allow_pickle=False)})
            except (OSError, ValueError, EOFError) as exc:
                raise InputError(f"{file}: cannot read the .npy file ({exc})") from exc
        return cls(feeds, f"{folder} ({len(feeds)} files)")

    @classmethod
    def _from_images(cls, folder: Path, pre: ImagePreprocess, input_names: list[str] | None,
                     limit: int | None) -> CalibrationData:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit:
            files = files[:limit]
        name = pre.input_name or (input_names[0] if input_names else "input")
        return cls([{name: pre.load(p)} for p in files], f"{folder} ({len(files)} images)")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file; an unreadable file (not a zip, truncated, pickled objects)
    is one line."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file (it is not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except zipfile.BadZipFile:
        raise InputError(f"{path}: not an .npz file (it is not a zip archive)") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(f"{path}: holds Python objects (pickled), which are not loaded for safety; "
                             "use the per-sample layout sample_0/NAME, sample_1/NAME, ...") from None
        raise InputError(f"{path}: cannot read the .npz file ({exc})") from exc
    except (OSError, EOFError, KeyError) as exc:
        raise InputError(f"{path}: cannot read the .npz file ({exc})") from exc


def _first(iterator, limit: int | None, where: str) -> list[dict[str, np.ndarray]]:
    feeds = []
    for feed in iterator:
        if not isinstance(feed, dict):
            raise InputError(f"calibration data {where} must give {{input_name: numpy array}} dicts, "
                             f"not {type(feed).__name__}")
        feeds.append({str(k): np.asarray(v) for k, v in feed.items()})
        if limit and len(feeds) >= limit:
            break
    return feeds


def _unstack(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec], path: Path) -> list[dict[str, np.ndarray]]:
    """Feeds from the stacked layout (module docstring), read against the inputs' ranks."""
    how = {}
    for name, a in arrays.items():
        spec = specs.get(name)
        rank = len(spec.dims) if spec is not None and spec.dims is not None else None
        if a.ndim == 0 or (rank is not None and a.ndim < rank) or (
                spec is not None and spec.fixed and a.shape == spec.dims and spec.dims[:1] != (1,)):
            how[name] = "constant"
        elif rank is not None and a.ndim == rank + 1:
            how[name] = "sample"
        else:
            how[name] = "batch"
    lengths = {len(arrays[n]) for n, kind in how.items() if kind != "constant"}
    if len(lengths) > 1:
        raise InputError(f"{path}: every per-sample array needs the same number of samples along axis 0 "
                         f"(found {', '.join(f'{n}: {len(a)}' for n, a in arrays.items() if how[n] != 'constant')}); "
                         "for other layouts use sample_0/NAME keys")
    count = lengths.pop() if lengths else 1
    cut = {"constant": lambda a, i: a, "sample": lambda a, i: a[i], "batch": lambda a, i: a[i:i + 1]}
    return [{n: cut[how[n]](a, i) for n, a in arrays.items()} for i in range(count)]


def _conformed(value: Any, spec: InputSpec, where: str) -> np.ndarray:
    """`value` as `spec` takes it, or one line saying why not."""
    array = np.asarray(value)
    got = f"{array.dtype} {list(array.shape)}"
    if array.dtype != spec.dtype:
        same_kind = (array.dtype.kind in "f" and spec.dtype.kind == "f") or \
                    (array.dtype.kind in "iu" and spec.dtype.kind in "iu") or \
                    (array.dtype.kind == "b" and spec.dtype.kind == "b")
        if not same_kind:
            raise InputError(f"{where}: input {spec.name!r} expects {spec.describe()}, got {got}")
        array = array.astype(spec.dtype)
    if spec.dims is None:
        return array
    if spec.dims and array.ndim == len(spec.dims) - 1 and (spec.dims[0] == 1 or not isinstance(spec.dims[0], int)):
        array = array[None]  # one sample given without its batch axis of one
    fits = array.ndim == len(spec.dims) and all(
        not isinstance(d, int) or d == s for d, s in zip(spec.dims, array.shape))
    if not fits:
        raise InputError(f"{where}: input {spec.name!r} expects {spec.describe()}, got {got}")
    return array
