"""The packed .onnxc container: bit-exact round trips, in-memory sessions, hostile input."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcomp
from onnxcomp.errors import InputError
from onnxcomp.io import container
from onnxcomp.io import pack as pack_module

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT.glob("light_*.onnx"))


def tensor_hashes(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """Name and hash of every tensor (initializers, subgraphs, Constant attributes) as serialized."""
    return [(t.name, hashlib.sha256(t.SerializeToString()).hexdigest()) for t in container.all_tensors(proto)]


def roundtrip(proto: onnx.ModelProto, tmp_path: Path, coder: str = "auto") -> onnx.ModelProto:
    data, _ = container.pack_proto(proto, coder)
    path = tmp_path / "m.onnxc"
    path.write_bytes(data)
    return container.read_packed_proto(path)


def test_mnist_round_trip_is_bit_exact(mnist_path, tmp_path):
    original = onnx.load(mnist_path)
    back = roundtrip(original, tmp_path)
    assert tensor_hashes(back) == tensor_hashes(original)
    assert back.SerializeToString() == original.SerializeToString()


def test_ultraface_pack_unpack_is_bit_exact_and_smaller(ultraface_path, tmp_path):
    stats = container.pack(ultraface_path, tmp_path / "u.onnxc")
    container.unpack(tmp_path / "u.onnxc", tmp_path / "u.onnx")
    original, back = onnx.load(ultraface_path), onnx.load(tmp_path / "u.onnx")
    assert tensor_hashes(back) == tensor_hashes(original)
    assert stats["packed_bytes"] == (tmp_path / "u.onnxc").stat().st_size < 0.85 * ultraface_path.stat().st_size


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: p.stem)
def test_light_model_round_trip_keeps_every_tensor_hash(path, tmp_path):
    original = onnx.load(path)
    assert tensor_hashes(roundtrip(original, tmp_path)) == tensor_hashes(original)


@pytest.mark.parametrize("coder", ["auto", "rans", "huffman", "zstd", "raw"])
def test_every_coder_round_trips_mnist(mnist_path, tmp_path, coder):
    original = onnx.load(mnist_path)
    assert tensor_hashes(roundtrip(original, tmp_path, coder)) == tensor_hashes(original)


def test_session_from_packed_file_gives_identical_outputs(ultraface_path, tmp_path):
    from onnxcomp.runtime import make_session
    from onnxcomp.validate import generate_inputs

    container.pack(ultraface_path, tmp_path / "u.onnxc")
    packed = onnxcomp.io.container.session(tmp_path / "u.onnxc", providers=("cpu",), threads=1)
    assert packed.get_session_options().intra_op_num_threads == 1
    plain = make_session(ultraface_path, "cpu", threads=None)
    feed = generate_inputs(onnxcomp.load(ultraface_path), 1, seed=0)[0]
    for a, b in zip(packed.run(None, feed), plain.run(None, feed)):
        assert np.array_equal(a, b)
    assert list(tmp_path.iterdir()) == [tmp_path / "u.onnxc"]  # nothing unpacked to disk
    # the weights went to ORT as in-memory arrays, not through the protobuf
    assert len(packed._onnxcomp_keep[0]) > 20


def test_session_leaves_the_callers_options_as_they_were(ultraface_path, mnist_path):
    """With the caller's SessionOptions the weights stay in the protobuf (adding in-memory values
    would change those options for the caller's next session, on another model)."""
    import onnxruntime as ort

    from onnxcomp.runtime import make_session
    from onnxcomp.validate import generate_inputs

    options = ort.SessionOptions()
    packed = container.session(container.pack_proto(onnx.load(ultraface_path))[0], sess_options=options)
    assert packed._onnxcomp_keep[0] == []
    feed = generate_inputs(onnxcomp.load(ultraface_path), 1, seed=0)[0]
    plain = make_session(ultraface_path, "cpu", threads=None)
    for a, b in zip(packed.run(None, feed), plain.run(None, feed)):
        assert np.array_equal(a, b)
    other = ort.InferenceSession(str(mnist_path), sess_options=options, providers=["CPUExecutionProvider"])
    assert other.get_inputs()[0].name == "Input3"


def test_threads_unpacking_different_models_at_once_stay_exact(mnist_path, ultraface_path):
    """The decoder keeps one model's shared tables between planes; threads decoding other models at
    the same time (the rANS kernel releases the GIL) must never pick up each other's tables."""
    from concurrent.futures import ThreadPoolExecutor

    models = [onnx.load(mnist_path), onnx.load(ultraface_path)]
    packed = [container.pack_proto(m, "auto")[0] for m in models]
    expected = [tensor_hashes(m) for m in models]

    def unpack(i: int) -> bool:
        return tensor_hashes(container.unpack_bytes(packed[i % 2])) == expected[i % 2]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(unpack, range(24)))


def test_session_accepts_packed_bytes(mnist_path):
    data, _ = container.pack_proto(onnx.load(mnist_path))
    sess = container.session(data)
    assert sess.get_inputs()[0].name == onnx.load(mnist_path).graph.input[0].name


def test_onnxcomp_load_and_save_use_the_packed_format(mnist_path, tmp_path):
    model = onnxcomp.load(mnist_path)
    onnxcomp.save(model, tmp_path / "m.onnxc")
    assert (tmp_path / "m.onnxc").read_bytes().startswith(container.MAGIC)
    back = onnxcomp.load(tmp_path / "m.onnxc")
    ref = {n: c.values.tobytes() for n, c in model.initializers().items()}
    assert {n: c.values.tobytes() for n, c in back.initializers().items()} == ref


def _every_dtype_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = []
    for i, dt in enumerate([np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64,
                            np.uint64, np.bool_]):
        arr = (rng.standard_normal((8, 24)) * 20).astype(dt)
        inits.append(onnx.numpy_helper.from_array(arr, f"raw_{np.dtype(dt).name}"))
    bf = helper.make_tensor("bf16", TensorProto.BFLOAT16, [64], rng.standard_normal(64).astype(np.float32))
    i4 = helper.make_tensor("int4", TensorProto.INT4, [200], rng.integers(-8, 8, 200))
    f8 = helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [100], rng.standard_normal(100).astype(np.float32))
    typed_f = helper.make_tensor("typed_float", TensorProto.FLOAT, [100], rng.standard_normal(100).tolist())
    typed_h = helper.make_tensor("typed_f16", TensorProto.FLOAT16, [100], rng.standard_normal(100).astype(np.float16))
    typed_i = helper.make_tensor("typed_int64", TensorProto.INT64, [50], rng.integers(-10**12, 10**12, 50).tolist())
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38] * 10, np.float32)
    inits += [bf, i4, f8, typed_f, typed_h, typed_i, onnx.numpy_helper.from_array(special, "special")]
    pruned = rng.standard_normal((16, 64)).astype(np.float32)
    pruned[rng.random(pruned.shape) < 0.8] = 0
    inits.append(onnx.numpy_helper.from_array(pruned, "pruned"))
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(rng.standard_normal(40).astype(np.float32), "sp"),
        onnx.numpy_helper.from_array(np.arange(0, 400, 10, dtype=np.int64), "sp_idx"), [400])
    const = helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
        rng.standard_normal(50).astype(np.float32), "const_value"))
    sub_init = onnx.numpy_helper.from_array(rng.standard_normal(30).astype(np.float32), "sub_w")
    then_g = helper.make_graph([helper.make_node("Identity", ["sub_w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [30])], [sub_init])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=onnx.numpy_helper.from_array(
        np.ones(30, np.float32), "ones"))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [30])])
    nodes = [const, helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [30])], inits,
                              sparse_initializer=[sparse])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("coder", ["auto", "rans", "zstd"])
def test_every_dtype_field_subgraph_and_sparse_tensor_round_trips_exactly(tmp_path, coder):
    original = _every_dtype_model()
    data, stats = container.pack_proto(original, coder)
    assert stats["tensors"] >= 20
    back = container.unpack_bytes(data)
    assert back.SerializeToString() == original.SerializeToString()


def test_pruned_float_tensor_is_coded_sparse():
    model = _every_dtype_model()
    rng = np.random.default_rng(1)
    big = rng.standard_normal((64, 256)).astype(np.float32)  # large enough to be coded on its own
    big[rng.random(big.shape) < 0.8] = 0
    model.graph.initializer.append(onnx.numpy_helper.from_array(big, "big_pruned"))
    data, stats = container.pack_proto(model, "auto")
    assert stats["per_tensor"]["big_pruned"]["choice"].startswith("sparse")
    assert stats["per_tensor"]["big_pruned"]["coded"] < 0.5 * stats["per_tensor"]["big_pruned"]["bytes"]
    assert container.unpack_bytes(data).SerializeToString() == model.SerializeToString()


def test_small_tensors_are_coded_in_bundles_and_come_back_exactly():
    """Hundreds of small tensors (a CNN's biases and scales) go into one stream per layout: fewer
    streams than tensors, and a file no larger than coding each alone (the bundle's rows share
    the model's tables)."""
    rng = np.random.default_rng(2)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal(64 + i) * (i + 1)).astype(np.float32), f"b{i}")
             for i in range(150)]
    inits += [onnx.numpy_helper.from_array(rng.integers(-40, 40, (16, 9)).astype(np.int8), f"w{i}")
              for i in range(150)]
    graph = helper.make_graph([], "g", [], [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    data, stats = container.pack_proto(model, "auto")
    assert stats["tensors"] == 300 and stats["streams"] == 2
    assert all(c.startswith("bundle:") for c in stats["choices"])
    assert container.unpack_bytes(data).SerializeToString() == model.SerializeToString()
    alone = pack_module.BUNDLE_MAX
    try:
        pack_module.BUNDLE_MAX = 0  # every tensor in its own stream, as format version 1 did
        separate, stats_alone = container.pack_proto(model, "auto")
    finally:
        pack_module.BUNDLE_MAX = alone
    assert stats_alone["streams"] == 300
    assert len(data) < len(separate)


def test_small_models_keep_rans_only_where_it_saves_more_than_its_costs(mnist_path, ultraface_path, monkeypatch):
    """mnist's weights gain less from rANS than its shared tables cost: packed without rANS
    (so without numba at load time). Ultraface fp32 gains 0.85 % from rANS, over RANS_MARGIN."""
    mnist = onnx.load(mnist_path)
    data, stats = container.pack_proto(mnist)
    assert not any("rans" in c for c in stats["choices"]) and stats["tables_bytes"] <= 2
    ultraface = onnx.load(ultraface_path)
    kept, stats_kept = container.pack_proto(ultraface)
    assert any("rans" in c for c in stats_kept["choices"])
    monkeypatch.setattr(pack_module, "RANS_MARGIN", 0.02)  # a user who wants no numba for 2 %
    dropped, stats_dropped = container.pack_proto(ultraface)
    assert not any("rans" in c for c in stats_dropped["choices"])
    assert len(kept) < len(dropped) < 1.02 * len(kept)
    monkeypatch.setattr(pack_module, "RECODE_MAX", 0)  # no model is coded twice: rANS wherever a stream gains
    forced, stats_forced = container.pack_proto(mnist)
    assert any("rans*" in c for c in stats_forced["choices"]) and stats_forced["tables_bytes"] > 10
    assert len(data) < len(forced)
    for packed, original in ((data, mnist), (forced, mnist), (kept, ultraface), (dropped, ultraface)):
        assert container.unpack_bytes(packed).SerializeToString() == original.SerializeToString()


def test_the_cheapest_coding_of_the_rans_streams_is_chosen():
    """Three codings of a model's rANS streams: as they are (with the shared tables), without the
    tables (per-plane rANS allowed), without rANS (preferred within RANS_MARGIN of the file)."""
    def records():  # 0: rANS with the shared tables, 1: rANS with its own table, 2: zstd
        return [pack_module._Stream([], 0, coded, 0, choice)
                for coded, choice in ((1000, "planes[rans*]"), (500, "planes[rans]"), (8500, "zstd"))]

    def chosen(tables_cost, no_tables, no_rans):
        streams = records()
        replaced = pack_module._cheaper_codings(
            streams, {0: (b"t" * no_tables, "planes[rans]")},
            {0: (b"r" * no_rans[0], "brotli"), 1: (b"r" * no_rans[1], "zstd")}, tables_cost)
        return sorted(replaced), [s.choice for s in streams[:2]], sum(s.coded for s in streams[:2])

    margin = container.RANS_MARGIN * 10_000  # of the file: 10,000 bytes of streams here, 50 bytes
    # the tables pay for themselves and rANS saves more than the margin: nothing changes
    assert chosen(100, 1150, (1200, 600)) == ([], ["planes[rans*]", "planes[rans]"], 1500)
    # the tables cost more than they save: without them (rANS kept, it saves 200 > margin)
    assert chosen(300, 1100, (1200, 600)) == ([0], ["planes[rans]", "planes[rans]"], 1600)
    # rANS saves less than the margin over the best coding with it: no rANS at all
    assert chosen(100, 1150, (1050, 550 + int(margin) - 1)) == ([0, 1], ["brotli", "zstd"], 1599 + int(margin))
    # ... one byte more, and rANS stays
    assert chosen(100, 1150, (1050, 550 + int(margin) + 1))[0] == []


def test_a_file_without_rans_streams_loads_without_numba(mnist_path, tmp_path):
    """numba's import and first call cost about 0.5 s at a cold start: a packed file that needs
    no rANS must not pay them (checked in a new interpreter)."""
    packed = tmp_path / "m.onnxc"
    assert not any("rans" in c for c in container.pack(mnist_path, packed)["choices"])
    code = ("import sys, onnxcomp; s = onnxcomp.session(sys.argv[1]); "
            "print(len(s.get_inputs()), 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(packed)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.split() == ["1", "False"]


def test_version_1_files_still_unpack():
    """A file written by the version 1 packer (one stream per tensor), kept as a fixture."""
    data = (Path(__file__).parent / "fixtures" / "every_dtype_v1.onnxc").read_bytes()
    assert struct.unpack("<H", data[8:10])[0] == 1
    assert container.unpack_bytes(data).SerializeToString() == _every_dtype_model().SerializeToString()


def test_unknown_coder_is_refused(mnist_path, tmp_path):
    with pytest.raises(InputError, match="unknown coder"):
        container.pack(mnist_path, tmp_path / "m.onnxc", coder="lz77")


# ---- hostile input ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_mnist() -> bytes:
    from tests.conftest import REAL

    path = REAL / "mnist.onnx"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return container.pack_proto(onnx.load(path))[0]


def _error(data: bytes) -> str:
    with pytest.raises(InputError) as info:
        container.unpack_bytes(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_reader_refuses_a_file_without_the_magic(packed_mnist):
    assert "bad magic" in _error(b"XXXXXXXX" + packed_mnist[8:])


def test_reader_refuses_an_unknown_version(packed_mnist):
    data = packed_mnist[:8] + struct.pack("<H", 99) + packed_mnist[10:]
    assert "version 99" in _error(data)


def test_reader_refuses_a_truncated_file(packed_mnist):
    assert "truncated" in _error(packed_mnist[: len(packed_mnist) // 2])


def test_reader_refuses_a_corrupted_stream_by_checksum(packed_mnist):
    data = bytearray(packed_mnist)
    data[-10] ^= 0x40
    assert "checksum" in _error(bytes(data))


def test_reader_refuses_trailing_bytes(packed_mnist):
    assert "unexpected bytes" in _error(packed_mnist + b"\0" * 5)


def test_reader_caps_the_decoded_size(packed_mnist):
    with pytest.raises(InputError, match="over the limit"):
        container.unpack_bytes(packed_mnist, max_decoded=1000)


def test_loading_a_missing_packed_file_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        onnxcomp.load(tmp_path / "absent.onnxc")


def _bundle_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(100).astype(np.float32), f"f{i}") for i in range(3)]
    inits.append(onnx.numpy_helper.from_array(rng.integers(-9, 9, 400).astype(np.int8), "q"))
    return helper.make_model(helper.make_graph([], "g", [], [], inits), opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("bundles, message", [
    ([[0, 1, 1]], "listed in two streams"),          # a tensor in a bundle twice
    ([[0, 3]], "mixes tensors of different layouts"),  # a float32 and an int8 tensor in one bundle
])
def test_reader_refuses_inconsistent_bundles(monkeypatch, bundles, message):
    """A writer (ours, bent here) that lists a tensor twice or bundles unlike tensors gets one
    clean error from the reader, not a model with doubled or misread weights."""
    monkeypatch.setattr(pack_module, "_bundles", lambda sizes: ([i for i in sizes if i not in sum(bundles, [])],
                                                              bundles))
    data, _ = container.pack_proto(_bundle_model(), "zstd")
    assert message in _error(data)


def test_typed_float_fields_keep_every_bit_pattern():
    """float_data refilled from the decoded bytes keeps a signalling NaN, -0.0 and subnormals as
    they were (a round trip through Python floats would quiet the NaN)."""
    bits = np.array([0x7F800001, 0xFFC00123, 0x80000000, 0x00000001, 0x3F800000] * 40, np.uint32)
    tensor = TensorProto(name="typed_bits", data_type=TensorProto.FLOAT, dims=[bits.size])
    payload = bits.astype("<u4").tobytes()
    tensor.MergeFromString(bytes([4 << 3 | 2]) + bytes([len(payload) & 0x7F | 0x80, len(payload) >> 7]) + payload)
    model = helper.make_model(helper.make_graph([], "g", [], [], [tensor]),
                              opset_imports=[helper.make_opsetid("", 21)])
    data, _ = container.pack_proto(model, "auto")
    back = container.unpack_bytes(data).graph.initializer[0]
    assert back.SerializeToString() == tensor.SerializeToString()


def test_session_of_a_model_past_the_protobuf_limit_takes_its_weights_in_memory(ultraface_path, monkeypatch):
    """Over 2 GB the weights cannot go through the protobuf, so even the caller's options get
    them as in-memory values (the limit is lowered here to reach that path on a real model)."""
    import onnxruntime as ort

    import onnxcomp.model
    from onnxcomp.runtime import make_session
    from onnxcomp.validate import generate_inputs

    monkeypatch.setattr(onnxcomp.model, "PROTOBUF_LIMIT", 100_000)
    packed = container.session(container.pack_proto(onnx.load(ultraface_path))[0], sess_options=ort.SessionOptions())
    assert len(packed._onnxcomp_keep[0]) > 20
    feed = generate_inputs(onnxcomp.load(ultraface_path), 1, seed=0)[0]
    plain = make_session(ultraface_path, "cpu", threads=None)
    for a, b in zip(packed.run(None, feed), plain.run(None, feed)):
        assert np.array_equal(a, b)
