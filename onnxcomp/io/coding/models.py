"""Symbol frequency tables and the two entropy coders built on constriction.

A table is the integer counts of byte symbols 0..255, quantized so that their sum is at most
2**12 (every present symbol keeps a count of at least 1). Encoder and decoder build the same
constriction model from the same integers, so the coding is exact. Stored tables cover only
the support [lo, hi] of the symbols.

- rANS: `constriction.stream.stack.AnsCoder` with `Categorical` models; several groups of
  symbols, each with its own table, share one word stream.
- Huffman: `constriction.symbol` Huffman trees (built from the same quantized counts, so
  encoder and decoder trees are identical); one Python call per symbol, so it is slow and is
  offered only as an explicit choice.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.io.coding.io import Reader, Writer

TABLE_TOTAL = 1 << 12


def quantize_counts(counts: np.ndarray, total: int = TABLE_TOTAL) -> np.ndarray:
    """Counts scaled so their sum is <= `total` + 256, keeping every present symbol >= 1."""
    counts = np.asarray(counts, dtype=np.float64)
    s = counts.sum()
    if s <= total:
        return counts.astype(np.int64)
    q = np.floor(counts * (total / s)).astype(np.int64)
    q[(counts > 0) & (q == 0)] = 1
    return q


def write_table(w: Writer, counts: np.ndarray) -> None:
    """lo, hi, width (1 or 2 bytes), then the counts of symbols lo..hi as one array."""
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    part = np.asarray(counts[lo:hi + 1], dtype=np.int64)
    wide = int(part.max() > 255) + 1
    if part.max() > 65535:
        raise ValueError("table counts must be quantized first")
    w.u8(lo)
    w.u8(hi)
    w.u8(wide)
    w.raw(part.astype("<u2" if wide == 2 else "u1").tobytes())


def read_table(r: Reader, counts: np.ndarray | None = None) -> np.ndarray:
    """The next table's 256 counts. Into `counts` (zeros) when given, and then the caller checks
    that it has a symbol (shared tables check all theirs at once)."""
    lo, hi, wide = r.raw(3)
    if hi < lo or wide not in (1, 2):
        raise r.fail("bad symbol table header")
    part = np.frombuffer(r.raw((hi - lo + 1) * wide), dtype="<u2" if wide == 2 else "u1")
    if counts is None:
        counts = np.zeros(256, dtype=np.int64)
        if not part.any():
            raise r.fail("symbol table has no symbols")
    counts[lo:hi + 1] = part
    return counts


def _support(counts: np.ndarray) -> tuple[int, np.ndarray]:
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    return lo, counts[lo:hi + 1].astype(np.float64)


def _categorical(probs: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(probs, perfect=False)


def rans_encode(groups: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Code groups of uint8 symbols, each with its table, into one rANS word stream."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, counts in reversed(groups):  # a stack: the first group is decoded first
        if symbols.size == 0:
            continue
        lo, probs = _support(counts)
        if probs.size == 1:
            continue  # a one-symbol table needs no bits
        coder.encode_reverse(symbols.astype(np.int32) - lo, _categorical(probs))
    return coder.get_compressed().astype("<u4").tobytes()


def rans_decode(data: bytes | memoryview, groups: list[tuple[int, np.ndarray]], where: str) -> list[np.ndarray]:
    import constriction

    from onnxcomp.io.coding.io import CorruptStream

    if len(data) % 4:
        raise CorruptStream(f"{where}: rANS stream length is not a multiple of 4")
    words = np.frombuffer(bytes(data), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = []
        for n, counts in groups:
            lo, probs = _support(counts)
            if n == 0:
                out.append(np.zeros(0, np.uint8))
            elif probs.size == 1:
                out.append(np.full(n, lo, np.uint8))
            else:
                out.append((coder.decode(_categorical(probs), n) + lo).astype(np.uint8))
    except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
        raise CorruptStream(f"{where}: rANS data cannot be decoded ({exc})") from exc
    return out


def huffman_encode(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    import constriction

    lo, probs = _support(counts)
    w = Writer()
    if probs.size == 1:
        return b""
    tree = constriction.symbol.huffman.EncoderHuffmanTree(probs)
    enc = constriction.symbol.QueueEncoder()
    for s in (symbols.astype(np.int64) - lo).tolist():
        enc.encode_symbol(s, tree)
    words, bits = enc.get_compressed()
    w.varint(int(bits))
    w.raw(np.asarray(words, dtype="<u4").tobytes())
    return w.getvalue()


def huffman_decode(data: bytes | memoryview, n: int, counts: np.ndarray, where: str) -> np.ndarray:
    import constriction

    lo, probs = _support(counts)
    if probs.size == 1:
        return np.full(n, lo, np.uint8)
    r = Reader(data, where)
    bits = r.varint()
    rest = r.raw(r.left())
    if len(rest) % 4 or bits > len(rest) * 8 or n > bits:  # every Huffman code word has >= 1 bit
        raise r.fail("Huffman stream length does not match its bit count")
    words = np.frombuffer(bytes(rest), dtype="<u4").astype(np.uint32)
    tree = constriction.symbol.huffman.DecoderHuffmanTree(probs)
    try:
        dec = constriction.symbol.QueueDecoder(words)
        out = np.fromiter((dec.decode_symbol(tree) for _ in range(n)), dtype=np.int64, count=n)
    except (ValueError, RuntimeError, AssertionError, OverflowError) as exc:
        raise r.fail(f"Huffman data cannot be decoded ({exc})") from exc
    return (out + lo).astype(np.uint8)


def entropy_bits(hist: np.ndarray) -> float:
    """Order-0 entropy of a histogram in bits (its cost with its own ideal table)."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return 0.0
    nz = hist[hist > 0]
    return float(-(nz * np.log2(nz / total)).sum())


def table_bytes(counts: np.ndarray) -> int:
    w = Writer()
    write_table(w, counts)
    return len(w.getvalue())
