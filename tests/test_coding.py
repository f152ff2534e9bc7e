"""The coders under the container: exact inverses, sensible choices, clean errors on garbage."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.io import coding
from onnxcomp.io.coding import models, planes, tables
from onnxcomp.io.coding.io import CorruptStream, Reader, Writer
from onnxcomp.errors import InputError

UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _code(arr: np.ndarray, data_type: int, coder: str, shared=None):
    kind, itemsize = coding.layout(data_type, arr.dtype)
    u = np.ascontiguousarray(arr).reshape(-1).view(UNSIGNED[arr.dtype.itemsize])
    if shared is None:
        shared = coding.fit_shared([(u, kind, itemsize, arr.shape)], coder)
    stream, choice = coding.encode_tensor(u, kind, itemsize, arr.shape, coder, shared)
    back = coding.decode_tensor(stream, kind, itemsize, u.size, shared, "t")
    return stream, choice, back, u


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype,data_type", [(np.float32, 1), (np.float16, 10), (np.float64, 11)])
def test_float_planes_invert_exactly_including_nan_inf_and_negative_zero(dtype, data_type, compiled):
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -7.5], dtype=dtype)
    values = np.concatenate([special, np.random.default_rng(0).standard_normal(993).astype(dtype)])
    u = values.view(UNSIGNED[values.itemsize])
    back = planes.from_planes(planes.to_planes(u, "f", values.itemsize), "f", values.itemsize, compiled)
    assert back.dtype == u.dtype and np.array_equal(back, u)
    ints = np.concatenate([u, np.array([0, 1, np.iinfo(u.dtype).max], u.dtype)])  # the same bytes, not rotated
    assert np.array_equal(planes.from_planes(planes.to_planes(ints, "i", ints.itemsize), "i", ints.itemsize,
                                             compiled), ints)


def test_float_exponent_plane_is_the_skewed_one():
    values = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    ps = planes.to_planes(values.view(np.uint32), "f", 4)
    bits = [models.entropy_bits(np.bincount(p, minlength=256)) / p.size for p in ps]
    assert bits[0] < 4 < 7.9 < bits[3]


@pytest.mark.parametrize("coder", coding.CODERS)
@pytest.mark.parametrize("dtype,data_type", [(np.float32, 1), (np.int8, 3), (np.int32, 6), (np.uint16, 4)])
def test_every_coder_inverts_exactly(coder, dtype, data_type):
    rng = np.random.default_rng(1)
    arr = (rng.laplace(0, 9, (32, 40))).astype(dtype)
    _, _, back, u = _code(arr, data_type, coder)
    assert back == u.tobytes()


def test_per_channel_int8_weights_beat_one_table_per_tensor():
    rng = np.random.default_rng(2)
    widths = np.geomspace(0.5, 40, 64)[:, None]  # channels of very different widths
    arr = np.clip(np.round(rng.laplace(0, 1, (64, 2048)) * widths), -127, 127).astype(np.int8)
    stream, choice, back, u = _code(arr, 3, "rans")
    one_table = models.entropy_bits(np.bincount(u, minlength=256)) / 8
    assert back == u.tobytes()
    assert "rans*" in choice and len(stream) < 0.95 * one_table


def test_auto_is_never_larger_than_zstd_or_raw():
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((48, 64)).astype(np.float32)
    sizes = {c: len(_code(arr, 1, c)[0]) for c in ("auto", "zstd", "raw")}
    assert sizes["auto"] <= min(sizes["zstd"], sizes["raw"])


def test_sparse_layout_is_chosen_for_pruned_floats_and_inverts():
    rng = np.random.default_rng(4)
    arr = rng.standard_normal((64, 128)).astype(np.float32)
    arr[rng.random(arr.shape) < 0.75] = 0
    stream, choice, back, u = _code(arr, 1, "auto")
    assert back == u.tobytes() and choice.startswith("sparse")


def test_shared_tables_fit_fewer_tables_than_rows_and_serialize():
    rng = np.random.default_rng(5)
    hists = np.stack([np.bincount(np.clip(rng.laplace(128, w, 500), 0, 255).astype(int), minlength=256)
                      for w in np.repeat([2, 20], 50)])
    fitted = tables.fit(hists)
    assert 2 <= len(fitted) < 100
    assert np.array_equal(tables.read(tables.write(fitted)), fitted)


def test_rans_groups_decode_in_order():
    a = np.arange(100, dtype=np.uint8) % 7
    b = np.full(50, 200, np.uint8)
    ca, cb = (models.quantize_counts(np.bincount(x, minlength=256)) for x in (a, b))
    out = models.rans_decode(models.rans_encode([(a, ca), (b, cb)]), [(100, ca), (50, cb)], "t")
    assert np.array_equal(out[0], a) and np.array_equal(out[1], b)


def test_fast_rans_groups_with_their_tables_decode_exactly_near_the_entropy():
    from onnxcomp.io.coding import fastrans

    rng = np.random.default_rng(3)
    wide = np.clip(np.round(rng.laplace(0, 20, 30000)), -128, 127).astype(np.int8).view(np.uint8)
    narrow = np.clip(np.round(rng.laplace(0, 2, 20000)), -128, 127).astype(np.int8).view(np.uint8)
    symbols = np.concatenate([wide[:10000], narrow[:7], wide[10000:], narrow[7:]])  # odd sizes: lanes cross groups
    sizes = np.array([10000, 7, 20000, 19993])
    ids = np.array([0, 1, 0, 1])
    tabs = np.stack([models.quantize_counts(np.bincount(x, minlength=256)) for x in (wide, narrow)])
    data = fastrans.encode(symbols, sizes, ids, tabs)
    assert np.array_equal(fastrans.decode(data, sizes, ids, tabs, "t"), symbols)
    ideal = (models.entropy_bits(np.bincount(wide, minlength=256))
             + models.entropy_bits(np.bincount(narrow, minlength=256))) / 8
    assert len(data) < 1.01 * ideal + 64  # the 14-bit tables cost well under 1 %


def test_fast_rans_normalized_tables_sum_exactly_and_keep_the_support():
    from onnxcomp.io.coding import fastrans

    counts = np.zeros(256, np.int64)
    counts[[3, 10, 200]] = [1, 10**6, 5]
    freq = fastrans.normalize(counts)
    assert freq.sum() == fastrans.TOTAL and (freq[3:201] >= 1).all() and not freq[:3].any() and not freq[201:].any()


def test_fast_rans_refuses_corrupt_streams_cleanly():
    from onnxcomp.io.coding import fastrans

    rng = np.random.default_rng(4)
    symbols = np.clip(np.round(rng.laplace(0, 5, 5000)), -128, 127).astype(np.int8).view(np.uint8)
    tab = models.quantize_counts(np.bincount(symbols, minlength=256))[None]
    data = bytearray(fastrans.encode(symbols, [5000], [0], tab))
    failures = 0
    for trial in range(200):
        bad = bytearray(data)
        if trial % 3 == 0:
            bad = bad[:rng.integers(0, len(bad))]
        elif trial % 3 == 1:
            bad += bytes(rng.integers(0, 256, 2 * int(rng.integers(1, 4))).astype(np.uint8))
        else:
            bad[rng.integers(0, len(bad))] ^= 1 << int(rng.integers(0, 8))
        try:
            out = fastrans.decode(bytes(bad), [5000], [0], tab, "t")
        except CorruptStream:
            failures += 1
            continue
        assert out.size == 5000  # a flip that still decodes (the container's checksum catches it)
    assert failures > 150
    with pytest.raises(CorruptStream, match="table ids"):
        fastrans.decode(bytes(data), [5000], [1], tab, "t")


def test_reader_refuses_reading_past_the_end():
    w = Writer()
    w.varint(300)
    with pytest.raises(CorruptStream, match="truncated"):
        Reader(w.getvalue()[:1], "t").varint()


def test_mutated_tensor_streams_decode_or_fail_with_input_error_only():
    """Without the container's checksums, the decoders themselves must still fail cleanly."""
    rng = np.random.default_rng(6)
    arr = np.clip(np.round(rng.laplace(0, 6, (32, 64))), -127, 127).astype(np.int8)
    farr = rng.standard_normal((32, 64)).astype(np.float32)
    farr[rng.random(farr.shape) < 0.6] = 0
    for values, dt in ((arr, 3), (farr, 1)):
        for coder in ("auto", "rans", "zstd"):
            stream, _, _, u = _code(values, dt, coder)
            kind, itemsize = coding.layout(dt, values.dtype)
            shared = coding.fit_shared([(u, kind, itemsize, values.shape)], coder)
            for _ in range(60):
                buf = bytearray(stream)
                op = rng.integers(0, 3)
                if op == 0:
                    buf[rng.integers(0, len(buf))] ^= 1 << int(rng.integers(0, 8))
                elif op == 1:
                    buf = buf[: rng.integers(0, len(buf))]
                else:
                    buf += bytes(rng.integers(0, 256, 8).astype(np.uint8))
                try:
                    out = coding.decode_tensor(bytes(buf), kind, itemsize, u.size, shared, "t")
                    assert len(out) == u.nbytes
                except InputError as exc:
                    assert "\n" not in str(exc)


def test_brotli_streams_are_decoded_within_their_declared_size():
    """A tiny brotli stream can expand to gigabytes: the decoder stops at the declared size and
    says so in one line, and garbage is one line too."""
    from onnxcomp.io.coding.tensor import brotli_compress, brotli_decompress

    data = bytes(range(256)) * 40
    assert brotli_decompress(brotli_compress(data), len(data), "t") == data
    bomb = brotli_compress(b"\0" * (64 << 20))  # 64 MB of zeros in a few bytes
    assert len(bomb) < 1000
    with pytest.raises(CorruptStream, match="does not decode to 4096 bytes"):
        brotli_decompress(bomb, 4096, "t")
    with pytest.raises(CorruptStream, match="does not decode to 1000 bytes"):
        brotli_decompress(brotli_compress(data), 1000, "t")
    with pytest.raises(CorruptStream, match="cannot be decoded|does not decode"):
        brotli_decompress(b"\xff" * 50, 100, "t")


def test_auto_takes_brotli_where_it_is_smallest_and_it_decodes():
    # text-like bytes (a uint8 tensor holding a vocabulary, say): brotli's context modelling and
    # dictionary beat xz, zstd and per-byte tables
    text = " ".join(f"the {w} of layer {i % 7} is {i * 37 % 101}"
                    for i, w in enumerate(["weight", "bias", "scale", "offset"] * 60)).encode()
    values = np.frombuffer(text, np.uint8)
    stream, choice = coding.encode_tensor(values, "b", 1, (values.size,), "auto")
    assert choice == "brotli"
    assert len(stream) < 0.85 * len(coding.encode_tensor(values, "b", 1, (values.size,), "zstd")[0])
    assert coding.decode_tensor(stream, "b", 1, values.size, np.zeros((0, 256), np.int64), "t") == text


@pytest.mark.parametrize("pruned", [False, True])
def test_a_large_tensor_coded_from_a_sample_decodes_exactly_within_1_percent_of_the_full_search(pruned, monkeypatch):
    """Over SAMPLE_MIN bytes the layout and each plane's method are chosen on a sample, and the
    tensor is coded once: the stream stays within 1 % of what trying everything on it gives."""
    from onnxcomp.io.coding import tensor

    rng = np.random.default_rng(9)
    weight = (rng.standard_normal((512, 1024)) * np.linspace(0.01, 0.05, 1024)).astype(np.float32)  # 2 MiB
    if pruned:
        weight[np.abs(weight) < 0.02] = 0
    sampled, choice, back, u = _code(weight, 1, "auto")
    assert u.nbytes > tensor.SAMPLE_MIN and back == u.tobytes()
    monkeypatch.setattr(tensor, "SAMPLE_MIN", 1 << 40)  # the full search, for comparison
    full, full_choice, _, _ = _code(weight, 1, "auto")
    assert len(sampled) <= 1.01 * len(full)  # (a plane near a tie may pick the other method)


def test_a_sampled_layout_that_does_not_fit_the_whole_tensor_falls_back_to_the_full_search(monkeypatch):
    from onnxcomp.io.coding import tensor

    rng = np.random.default_rng(10)
    dense = rng.standard_normal((512, 1024)).astype(np.float32)  # no zeros: no sparse layout exists
    sample = dense[:64].copy()
    sample[:, ::2] = 0  # ...but the sample says sparse
    monkeypatch.setattr(tensor, "sample", lambda values, shape, itemsize: (sample.reshape(-1).view(np.uint32),
                                                                             sample.shape))
    stream, choice, back, u = _code(dense, 1, "auto")
    assert back == u.tobytes() and choice.startswith("planes") and len(stream) < u.nbytes


def test_compiled_layout_helpers_match_numpy():
    """The encoder's numba helpers (per-row histograms, tiled transpose) give numpy's answers."""
    from onnxcomp.io.coding import kernels

    rng = np.random.default_rng(11)
    plane = rng.integers(0, 256, 300_001, dtype=np.uint8)
    lengths = np.array([100_000, 1, 0, 200_000], np.int64)
    keys = planes.row_index(lengths) * 256 + plane.astype(np.int64)
    assert np.array_equal(planes.row_hists(plane, lengths), np.bincount(keys, minlength=4 * 256).reshape(4, 256))
    for dtype in (np.uint8, np.uint32):
        values = rng.integers(0, 255, 333 * 517).astype(dtype)
        assert np.array_equal(kernels.transposed(values, 517), values.reshape(-1, 517).T.ravel())
