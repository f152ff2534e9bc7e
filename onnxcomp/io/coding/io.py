"""Bounds-checked little-endian byte I/O for the packed format.

Every read checks what is left, so a truncated or hostile stream ends in one `CorruptStream`
(an InputError) instead of an IndexError, a huge allocation or a hang.
"""

from __future__ import annotations

import struct

from onnxcomp.errors import InputError

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


class CorruptStream(InputError):
    """A coded stream or the container header is malformed."""


class Writer:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self._parts.append(struct.pack("<B", value))

    def u32(self, value: int) -> None:
        self._parts.append(struct.pack("<I", value))

    def u64(self, value: int) -> None:
        self._parts.append(struct.pack("<Q", value))

    def varint(self, value: int) -> None:
        if value < 0:
            raise ValueError("varint must be non-negative")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
        self._parts.append(bytes(out))

    def raw(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def blob(self, data: bytes) -> None:
        """Length-prefixed bytes."""
        self.varint(len(data))
        self.raw(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    # Headers list every tensor, so these reads run thousands of times per file: they index the
    # buffer directly instead of slicing it.
    def __init__(self, data: bytes | memoryview, where: str = "stream") -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.where = where

    def fail(self, what: str) -> CorruptStream:
        return CorruptStream(f"{self.where}: {what}")

    def left(self) -> int:
        return len(self.data) - self.pos

    def raw(self, n: int) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"truncated (needs {n} bytes at offset {self.pos}, {self.left()} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self.fail(f"truncated (needs 1 byte at offset {pos}, 0 left)")
        self.pos = pos + 1
        return self.data[pos]

    def _unpack(self, fmt: struct.Struct) -> int:
        if fmt.size > len(self.data) - self.pos:
            raise self.fail(f"truncated (needs {fmt.size} bytes at offset {self.pos}, {self.left()} left)")
        value = fmt.unpack_from(self.data, self.pos)[0]
        self.pos += fmt.size
        return value

    def u32(self) -> int:
        return self._unpack(U32)

    def u64(self) -> int:
        return self._unpack(U64)

    def varint(self, limit: int = 1 << 62) -> int:
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80 and data[pos] <= limit:  # one byte: most of them
            self.pos = pos + 1
            return data[pos]
        value = shift = 0
        for _ in range(10):
            if pos >= len(data):
                raise self.fail(f"truncated (a varint runs past the end at offset {pos})")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise self.fail(f"value {value} exceeds its limit {limit}")
                self.pos = pos
                return value
            shift += 7
        raise self.fail("varint longer than 10 bytes")

    def blob(self, limit: int | None = None) -> memoryview:
        n = self.varint(self.left())
        if limit is not None and n > limit:
            raise self.fail(f"a block of {n} bytes exceeds its limit {limit}")
        return self.raw(n)

    def done(self) -> None:
        if self.left():
            raise self.fail(f"{self.left()} unexpected trailing bytes")
