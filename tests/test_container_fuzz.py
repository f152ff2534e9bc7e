"""Fuzzing the packed reader: flipped, truncated and extended real packed files must end in one
clean InputError (never another exception, a crash, a hang or a huge allocation)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from onnxcomp.io import container
from onnxcomp.errors import InputError
from tests.conftest import REAL

BUDGET_S = 8.0  # per model; the whole file stays well under a minute


def _packed(name: str) -> bytes:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return container.pack_proto(onnx.load(path))[0]


def _mutants(data: bytes, rng: np.random.Generator):
    n = len(data)
    header_end = len(container.MAGIC) + 12 + int.from_bytes(data[len(container.MAGIC) + 4:len(container.MAGIC) + 8],
                                                             "little")
    while True:
        kind = rng.integers(0, 5)
        buf = bytearray(data)
        if kind == 0:  # flip bits anywhere
            for _ in range(rng.integers(1, 4)):
                buf[rng.integers(0, n)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # flip inside the header (lengths, counts, checksums)
            buf[rng.integers(0, header_end)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:  # truncate
            buf = buf[: rng.integers(0, n)]
        elif kind == 3:  # extend with junk
            buf += rng.integers(0, 256, rng.integers(1, 64)).astype(np.uint8).tobytes()
        else:  # overwrite a run with random bytes
            at = int(rng.integers(0, n))
            buf[at:at + 16] = rng.integers(0, 256, 16).astype(np.uint8).tobytes()
        yield bytes(buf)


@pytest.mark.parametrize("name", ["mnist.onnx", "ultraface-rfb-320.onnx"])
def test_mutated_packed_files_fail_only_with_one_line_input_errors(name):
    data = _packed(name)
    rng = np.random.default_rng(1234)
    start, tried, survived = time.perf_counter(), 0, 0
    for mutant in _mutants(data, rng):
        if time.perf_counter() - start > BUDGET_S or tried >= 400:
            break
        tried += 1
        if mutant == data:
            continue
        try:
            container.unpack_bytes(mutant, max_decoded=64 << 20)
            survived += 1  # a mutation that leaves a valid file (e.g. none) is not an error
        except InputError as exc:
            assert "\n" not in str(exc)
    assert tried >= 50
    assert survived <= tried // 20


def test_a_forged_header_with_valid_checksum_cannot_claim_a_huge_tensor():
    """Re-sign the header after declaring an enormous decoded size: the cap stops it first."""
    import struct
    import zlib

    data = _packed("mnist.onnx")
    m = len(container.MAGIC)
    header_len = struct.unpack("<I", data[m + 4:m + 8])[0]
    header = bytearray(data[m + 12:m + 12 + header_len])
    total_at = 1 + 8 + 8 + 4 + 8 + 4
    header[total_at:total_at + 8] = struct.pack("<Q", 1 << 50)
    forged = data[:m + 8] + struct.pack("<I", zlib.crc32(bytes(header))) + bytes(header) + data[m + 12 + header_len:]
    with pytest.raises(InputError, match="over the limit"):
        container.unpack_bytes(forged)
