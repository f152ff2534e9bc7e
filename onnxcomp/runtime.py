"""ONNX Runtime sessions: provider names, in-memory sessions, and clean errors.

Every evaluation in onnxcomp (validation, calibration, folding) goes through `make_session`,
so provider handling and error wording live in one place.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from onnxcomp.errors import InputError, OnnxcompError

try:  # imported here, at the top, so that no caller's `except Exception` can swallow an interrupt:
    import onnxruntime  # noqa: F401
except ImportError as exc:
    # A Ctrl-C while ORT's native module initializes comes out of pybind11 as ImportError
    # ("initialization failed") caused by the KeyboardInterrupt: give the interrupt back.
    if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
        raise KeyboardInterrupt from None
    raise

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


class RuntimeUnavailable(OnnxcompError):
    """The requested execution provider is not installed or has no device here."""


class CannotRun(OnnxcompError):
    """ORT refused to load or run the model (custom ops, unsupported types...)."""


def provider_name(short: str) -> str:
    key = short.strip().lower()
    if key in PROVIDERS:
        return PROVIDERS[key]
    if short in PROVIDERS.values():
        return short
    raise InputError(f"unknown execution provider {short!r} (known: {', '.join(PROVIDERS)})")


def parse_providers(text: str | Iterable[str] | None) -> list[str]:
    """'cpu,cuda' or ['cpu', 'cuda'] -> short names, validated; default ['cpu']."""
    if text is None:
        return ["cpu"]
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [i.strip().lower() for i in items if i.strip()]
    for name in names:
        provider_name(name)
    return names or ["cpu"]


def available(short: str) -> bool:
    import onnxruntime as ort

    return provider_name(short) in ort.get_available_providers()


def make_session(model, provider: str = "cpu", threads: int | None = 1, optimize: bool = True):
    """An InferenceSession on one provider, built from memory when the model fits in protobuf.

    `model` is a Model, a ModelProto, serialized bytes or a path. CUDA sessions fail loudly
    (RuntimeUnavailable) instead of silently falling back to the CPU.
    """
    import onnxruntime as ort

    from onnxcomp.model import PROTOBUF_LIMIT, Model, _initializer_bytes, save

    name = provider_name(provider)
    if name not in ort.get_available_providers():
        raise RuntimeUnavailable(f"{provider}: {name} is not available in this onnxruntime build")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # ORT's own ERROR lines on stderr would double our CannotRun message
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    keep_alive = None
    if isinstance(model, Model) and model.summary()["param_bytes"] <= PROTOBUF_LIMIT:
        model = model.to_proto()  # (a larger Model is saved streaming, never as one whole proto)
    if isinstance(model, Model) or (isinstance(model, onnx.ModelProto) and _initializer_bytes(model) > PROTOBUF_LIMIT):
        keep_alive = tempfile.TemporaryDirectory(prefix="onnxcomp-session-")
        target = Path(keep_alive.name) / "model.onnx"
        save(model, target, external_data=True)
        model = str(target)
    elif isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=[name])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise CannotRun(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
    if name != "CPUExecutionProvider" and name not in session.get_providers():
        raise RuntimeUnavailable(f"{provider}: onnxruntime fell back to {session.get_providers()}")
    session._onnxcomp_tmp = keep_alive  # keep external data alive as long as the session
    return session


def run(session, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a session; return {output name: array}."""
    names = output_names or [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    types = {o.name: o.type for o in session.get_outputs()}
    try:
        if any(_onnx_type(v.dtype) for v in feeds.values() if isinstance(v, np.ndarray)) or \
                any(_onnx_type(types.get(n, "")) for n in names):
            return _run_with_ort_values(session, feeds, names, types)
        values = session.run(names, feeds)
    except Exception as exc:
        raise CannotRun(f"onnxruntime failed while running the model: {_first_line(exc)}") from exc
    return dict(zip(names, values))


# Element types ORT's Python API has no numpy type for (it raises "No corresponding Numpy type"):
# onnx represents them with ml_dtypes; they cross into ORT as raw bytes of the right ONNX type.
_PACKED_BITS = {"int4": 4, "uint4": 4, "float4e2m1": 4, "int2": 2, "uint2": 2}  # several per byte in ORT


def _onnx_type(dtype_or_ort_type) -> int | None:
    """The ONNX element type of an ml_dtypes dtype or an ORT type string like 'tensor(bfloat16)',
    when it is one ORT's numpy bridge cannot carry (bfloat16, float8, float4, int4, int2); else None."""
    if isinstance(dtype_or_ort_type, str):
        name = dtype_or_ort_type.removeprefix("tensor(").removesuffix(")").upper()
        exotic = name == "BFLOAT16" or name.startswith(("FLOAT8", "FLOAT4")) or name in ("INT4", "UINT4", "INT2", "UINT2")
        return getattr(onnx.TensorProto, name, None) if exotic else None
    if dtype_or_ort_type.type.__module__.split(".")[0] != "ml_dtypes":
        return None
    return onnx.helper.np_dtype_to_tensor_dtype(dtype_or_ort_type)


def _run_with_ort_values(session, feeds, names, types) -> dict[str, np.ndarray]:
    ort_feeds = {key: _to_ort_value(value) for key, value in feeds.items()}
    values = session.run_with_ort_values(names, ort_feeds)
    return {name: _to_numpy(value, types.get(name, "")) for name, value in zip(names, values)}


def _to_ort_value(value):
    """A feed as an OrtValue; exotic types written as raw bytes into a tensor ORT allocates."""
    onnx_type = _onnx_type(value.dtype) if isinstance(value, np.ndarray) else None
    if onnx_type is None:
        return onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    import ctypes

    codes = np.ascontiguousarray(value).view(np.uint8 if value.dtype.itemsize == 1 else np.uint16).ravel()
    bits = _PACKED_BITS.get(onnx.helper.tensor_dtype_to_string(onnx_type).removeprefix("TensorProto.").lower())
    if bits is not None:  # pack, lowest bits first
        per_byte = 8 // bits
        codes = np.pad(codes & ((1 << bits) - 1), (0, -len(codes) % per_byte)).reshape(-1, per_byte)
        codes = np.bitwise_or.reduce(codes << (bits * np.arange(per_byte, dtype=np.uint8)), axis=1).astype(np.uint8)
    tensor = onnxruntime.OrtValue.ortvalue_from_shape_and_type(list(value.shape), onnx_type)
    if codes.nbytes:
        ctypes.memmove(tensor.data_ptr(), codes.ctypes.data, codes.nbytes)
    return tensor


def _to_numpy(value, ort_type: str) -> np.ndarray:
    """An output OrtValue as numpy; exotic types through their raw bytes (ml_dtypes keeps a 4- or
    2-bit value in the low bits of one byte, ORT packs them lowest bits first)."""
    onnx_type = _onnx_type(ort_type)
    if onnx_type is None:
        return value.numpy()
    import ctypes

    dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    bits = _PACKED_BITS.get(ort_type.removeprefix("tensor(").removesuffix(")"))
    if bits is None:
        raw = np.frombuffer(ctypes.string_at(value.data_ptr(), count * dtype.itemsize), np.uint8)
        return raw.view(dtype).reshape(shape).copy()
    per_byte = 8 // bits
    raw = np.frombuffer(ctypes.string_at(value.data_ptr(), -(-count // per_byte)), np.uint8)
    codes = np.stack([(raw >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], axis=-1).ravel()[:count]
    return codes.astype(np.uint8).view(dtype).reshape(shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def interleaved_latency_ms(models: dict[str, Any], feed: dict[str, np.ndarray], threads: int | None = 1,
                           rounds: int = 5, min_runs: int = 10, round_seconds: float = 0.3,
                           warmup: int = 10, provider: str = "cpu") -> dict[str, float]:
    """Median latency (ms) per model, timed in interleaved rounds so drift hits all alike.

    `models`: label -> Model / ModelProto / bytes / path. Value = median of the round medians.
    `threads=None` uses ORT's default thread count.
    """
    sessions = {label: make_session(m, provider, threads=threads) for label, m in models.items()}
    feeds = {}
    for label, session in sessions.items():
        names = {i.name for i in session.get_inputs()}
        feeds[label] = {k: v for k, v in feed.items() if k in names}
        for _ in range(warmup):
            session.run(None, feeds[label])
    medians: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no model is always timed first in a round
        for label in order:
            session = sessions[label]
            times = []
            start = time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - start < round_seconds:
                t0 = time.perf_counter()
                session.run(None, feeds[label])
                times.append((time.perf_counter() - t0) * 1000)
            medians[label].append(float(np.median(times)))
    return {label: float(np.median(values)) for label, values in medians.items()}
