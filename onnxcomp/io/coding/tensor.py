"""One coded stream per tensor: whole-tensor methods (raw, zstd) or byte planes, each plane
coded with the best of: constant, raw, zstd, rANS with its own table, rANS with the model's
shared tables (one table id per row), Huffman.

Stream:  u8 form (0 whole, 1 planes)
  whole:  u8 method, blob
  planes: u8 axis, varint rows, u8 sparse, [varint nnz, plane record of the bitmap],
          one plane record per byte of the element
  plane record: u8 method, blob payload
"""

from __future__ import annotations

import threading

import numpy as np

from onnxcomp.io.coding import models
from onnxcomp.io.coding import planes as P
from onnxcomp.io.coding.io import CorruptStream, Reader, Writer
from onnxcomp.io.coding.tables import UNCODABLE, row_costs

# RANS and SHARED are constriction's rANS (still decoded, no longer written: it decodes at about
# 40 MB/s); FRANS and FSHARED are the same tables coded by the table-driven rANS in fastrans.
RAW, CONST, ZSTD, RANS, SHARED, HUFF, XZ, FRANS, FSHARED, BROTLI = range(10)
NAMES = {RAW: "raw", CONST: "const", ZSTD: "zstd", RANS: "rans-v1", SHARED: "rans*-v1", HUFF: "huffman", XZ: "xz",
         FRANS: "rans", FSHARED: "rans*", BROTLI: "brotli"}
CODERS = ("auto", "huffman", "rans", "zstd", "raw")
RANS_METHODS = (RANS, SHARED, FRANS, FSHARED)
PLANE_METHODS = {
    "auto": (CONST, RAW, ZSTD, FRANS, FSHARED),
    "rans": (CONST, RAW, FRANS, FSHARED),
    "huffman": (CONST, RAW, HUFF),
}
ZSTD_BIG = 256 << 10  # above this many bytes zstd uses a faster level (19 runs at ~5 MB/s; on weights the higher level gains little)
XZ_DICT = 1 << 20  # the dictionary (not the data) caps what xz allocates
XZ_MAX = 1 << 16    # xz is slow to encode and decodes at ~25 MB/s: tried on small tensors only
XZ_MARGIN = 0.03  # xz must be this much smaller to be chosen (it decodes ~15x slower than rANS)
BROTLI_MAX = 1 << 16  # brotli at quality 11 encodes at ~0.5 MB/s: tried on small tensors only


def weighed(method: int, nbytes: int) -> float:
    """The size a candidate is compared by: xz's is raised by XZ_MARGIN, so that it is chosen only
    where it saves enough to pay for its slow decoding."""
    return nbytes * (1 + XZ_MARGIN) if method == XZ else nbytes


def _xz_dict(n: int) -> int:
    """Dictionary for n decoded bytes: no larger than needed, since the decoder allocates (and
    clears) all of it; any size >= n decodes the same data, so older streams still decode."""
    return min(XZ_DICT, max(4096, 1 << (max(n, 1) - 1).bit_length()))


def xz_compress(data: bytes) -> bytes:
    import lzma

    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": _xz_dict(len(data))}])


def xz_decompress(data: bytes | memoryview, n: int, where: str) -> bytes:
    import lzma

    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2,
                                                                    "dict_size": _xz_dict(n)}])
        out = d.decompress(bytes(data), max_length=n)
    except lzma.LZMAError as exc:
        raise CorruptStream(f"{where}: xz data cannot be decoded ({exc})") from exc
    if len(out) != n or not d.eof:
        raise CorruptStream(f"{where}: xz data does not decode to {n} bytes")
    return out


def brotli_compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=max(10, min(24, (max(len(data), 1) - 1).bit_length())))


def brotli_decompress(data: bytes | memoryview, n: int, where: str, exact: bool = True) -> bytes:
    """Decode brotli data that must hold exactly n bytes (or, not `exact`, at most n); the output
    buffer stops growing at n, so a hostile stream cannot make it allocate more."""
    import brotli

    try:
        d = brotli.Decompressor()
        out = d.process(bytes(data), output_buffer_limit=max(n, 1))
    except brotli.error as exc:
        raise CorruptStream(f"{where}: brotli data cannot be decoded ({exc})") from exc
    if len(out) > n or (exact and len(out) != n) or not d.is_finished():
        raise CorruptStream(f"{where}: brotli data does not decode to {'' if exact else 'at most '}{n} bytes")
    return out


def zstd_compress(data: bytes, big: bool = False) -> bytes:
    """`big`: the faster level whatever the size (a sample of a big tensor is judged as the tensor)."""
    import zstandard

    level = 19 if len(data) <= ZSTD_BIG and not big else 6
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


_local = threading.local()


def _zstd_decompressor():
    """This thread's decompressor: making one costs more than decoding a small plane, and one
    must not be shared between threads."""
    import zstandard

    if not hasattr(_local, "zstd"):
        _local.zstd = zstandard.ZstdDecompressor()
    return _local.zstd


def zstd_decompress(data: bytes | memoryview, n: int, where: str) -> bytes:
    import zstandard

    data = bytes(data)
    try:
        size = zstandard.frame_content_size(data)
        if size != n:
            raise CorruptStream(f"{where}: zstd frame holds {size} bytes, expected {n}")
        out = _zstd_decompressor().decompress(data, max_output_size=n)
    except zstandard.ZstdError as exc:
        raise CorruptStream(f"{where}: zstd data cannot be decoded ({exc})") from exc
    if len(out) != n:
        raise CorruptStream(f"{where}: zstd data decodes to {len(out)} bytes, expected {n}")
    return out


# ---- one plane ---------------------------------------------------------------------------
def _row_perm(lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Symbol gather index putting rows in stable order of their table id."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    rows = np.argsort(ids, kind="stable")
    lens = lengths[rows]
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return np.repeat(starts[rows] - offsets, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def _encode_ids(ids: np.ndarray) -> bytes:
    data = ids.astype(np.uint8).tobytes()
    if len(set(data)) <= 1:
        return bytes([CONST]) + (data[:1] or b"\0")
    z = zstd_compress(data)
    return bytes([ZSTD]) + z if len(z) < len(data) else bytes([RAW]) + data


def _decode_ids(r: Reader, count: int, where: str) -> np.ndarray:
    method = r.u8()
    if method == CONST:
        return np.full(count, r.u8(), np.int64)
    rest = bytes(r.raw(r.left()))
    if method == ZSTD:
        rest = zstd_decompress(rest, count, where)
    elif method != RAW or len(rest) != count:
        raise CorruptStream(f"{where}: bad table id block")
    return np.frombuffer(rest, np.uint8).astype(np.int64)


def encode_plane(plane: np.ndarray, lengths: np.ndarray, methods, shared: np.ndarray | None,
                 hists: np.ndarray | None = None, big: bool = False) -> tuple[int, bytes]:
    from onnxcomp.io.coding import fastrans  # imports numba: only when a plane is coded
    n = plane.size
    if n == 0:
        return RAW, b""
    hist = np.bincount(plane, minlength=256)
    if CONST in methods and np.count_nonzero(hist) == 1:
        return CONST, bytes([int(plane[0])])
    best: tuple[int, bytes | None] = (RAW, None)  # raw: n bytes, copied only if it stays the best
    own = models.quantize_counts(hist)

    def offer(method, payload):
        nonlocal best
        if weighed(method, len(payload)) < weighed(best[0], n if best[1] is None else len(best[1])):
            best = (method, payload)

    if FRANS in methods and models.entropy_bits(hist) / 8 < n:
        w = Writer()
        models.write_table(w, own)
        offer(FRANS, w.getvalue() + fastrans.encode(plane, [n], [0], own[None]))
    if FSHARED in methods and shared is not None and len(shared) and len(lengths) > 1:
        if hists is None:
            hists = P.row_hists(plane, lengths)
        costs = row_costs(hists, shared)
        ids = np.argmin(costs, axis=1)
        if costs[np.arange(len(ids)), ids].max() < UNCODABLE:
            w = Writer()
            w.blob(_encode_ids(ids))
            offer(FSHARED, w.getvalue() + fastrans.encode(plane, lengths, ids, shared))
    if HUFF in methods:
        w = Writer()
        models.write_table(w, own)
        offer(HUFF, w.getvalue() + models.huffman_encode(plane, own))
    if ZSTD in methods:
        offer(ZSTD, zstd_compress(np.ascontiguousarray(plane), big))
    if XZ in methods and n <= XZ_MAX:
        offer(XZ, xz_compress(plane.tobytes()))
    return best if best[1] is not None else (RAW, plane.tobytes())


def decode_plane(method: int, payload: memoryview, n: int, lengths: np.ndarray, shared: np.ndarray,
                 where: str) -> np.ndarray:
    if method == RAW:
        if len(payload) != n:
            raise CorruptStream(f"{where}: raw plane has {len(payload)} bytes, expected {n}")
        return np.frombuffer(bytes(payload), np.uint8)
    if method == CONST:
        if len(payload) != 1:
            raise CorruptStream(f"{where}: bad constant plane")
        return np.full(n, payload[0], np.uint8)
    if method == ZSTD:
        return np.frombuffer(zstd_decompress(payload, n, where), np.uint8)
    if method == XZ:
        return np.frombuffer(xz_decompress(payload, n, where), np.uint8)
    from onnxcomp.io.coding import fastrans  # imports numba: only when a plane is decoded

    r = Reader(payload, where)
    if method in (RANS, HUFF, FRANS):
        table = models.read_table(r)
        rest = r.raw(r.left())
        if method == HUFF:
            return models.huffman_decode(rest, n, table, where)
        if method == FRANS:
            return fastrans.decode(rest, [n], [0], table[None], where)
        return models.rans_decode(rest, [(n, table)], where)[0]
    if method == FSHARED:  # rows in their natural order, each with its shared table (fastrans checks the ids)
        ids = _decode_ids(Reader(r.blob(), where), len(lengths), where)
        return fastrans.decode(r.raw(r.left()), lengths, ids, shared, where, shared=True)
    if method == SHARED:
        ids = _decode_ids(Reader(r.blob(), where), len(lengths), where)
        if len(ids) != len(lengths) or (len(ids) and ids.max() >= len(shared)):
            raise CorruptStream(f"{where}: table ids do not match the shared tables")
        counts = np.bincount(np.repeat(ids, lengths), minlength=len(shared))
        used = np.unique(ids)
        parts = models.rans_decode(r.raw(r.left()), [(int(counts[t]), shared[t]) for t in used], where)
        out = np.empty(n, np.uint8)
        out[_row_perm(lengths, ids)] = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        return out
    raise CorruptStream(f"{where}: unknown plane method {method}")


# ---- one tensor --------------------------------------------------------------------------
def describe(form: int, methods: list[int], sparse: bool = False) -> str:
    if form == 0:
        return NAMES[methods[0]]
    return ("sparse" if sparse else "planes") + "[" + ",".join(NAMES[m] for m in methods) + "]"


SAMPLE_MIN = 1 << 20    # a tensor over this many bytes picks its coding on a sample, then codes once
SAMPLE_BYTES = 256 << 10  # about this much of it, in SAMPLE_PIECES runs of whole leading slices
SAMPLE_PIECES = 8


def encode(values: np.ndarray, kind: str, itemsize: int, shape: tuple[int, ...], coder: str,
           shared: np.ndarray | None = None, rans: bool = True, slow: bool = True) -> tuple[bytes, str]:
    """Code one tensor (values: 1-D unsigned view of the element bytes). Returns (stream, choice).
    `rans=False`: no rANS plane, so decoding it needs no numba. `slow=False`: no xz or brotli
    (they encode at ~1 MB/s; on a large model the bytes they save on its small tensors are noise),
    and zstd at its fast level on small tensors too (level 19 codes at ~5 MB/s: on a 4-bit model's
    block scales and zero points, a fifth of its bytes, it made the whole pack run at ~30 MB/s).

    Every candidate coding (whole-tensor methods; each layout with each plane's methods) is tried;
    on a tensor over SAMPLE_MIN bytes they are tried on a sample of it, and the tensor is then coded
    once, with the sample's winner (its layout and each plane's method, raw as the fallback): the
    full search coded each large tensor about ten times over."""
    plan = None
    if values.nbytes > SAMPLE_MIN:
        part, part_shape = sample(values, shape, itemsize)
        if part.size < values.size:  # (zstd at the level the whole tensor will get, not a small one's)
            plan = _best(_candidates(part, kind, itemsize, part_shape, coder, shared, rans, slow=slow, big=True))[2]
    found = _candidates(values, kind, itemsize, shape, coder, shared, rans, plan, slow, big=not slow)
    if plan is not None and plan[0] == "planes" and all(c[2][0] != "planes" for c in found):
        found = _candidates(values, kind, itemsize, shape, coder, shared, rans, slow=slow, big=not slow)  # the layout does not apply
    stream, choice, _ = _best(found)
    return (stream.materialize() if isinstance(stream, RawStream) else stream), choice


class RawStream:
    """The raw candidate, whose copy of every byte is made only if it is the one chosen."""

    def __init__(self, raw: np.ndarray):
        self.raw = raw

    def __len__(self) -> int:
        return 2 + self.raw.size

    def materialize(self) -> bytes:
        return bytes([0, RAW]) + self.raw.tobytes()


def _best(candidates):
    return min(candidates, key=lambda c: weighed(XZ if c[1] == "xz" else RAW, len(c[0])))


def sample(values: np.ndarray, shape: tuple[int, ...], itemsize: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Evenly spaced runs of whole leading slices (so rows keep their length), about SAMPLE_BYTES."""
    n = values.size
    lead = shape[0] if len(shape) >= 2 and shape[0] > 0 and n % shape[0] == 0 else n
    per = n // lead
    if per * itemsize > SAMPLE_BYTES:  # slices too large to take whole: runs of the flat values
        lead, per, shape = n, 1, (n,)
    take = max(1, SAMPLE_BYTES // (per * itemsize))
    if take >= lead:
        return values, shape
    pieces = min(SAMPLE_PIECES, take)
    run = take // pieces
    starts = np.linspace(0, lead - run, pieces).astype(np.int64)
    rows = (starts[:, None] + np.arange(run)[None, :]).ravel()
    sample = values.reshape(lead, per)[rows].reshape(-1)
    return sample, (len(rows),) + tuple(shape[1:]) if len(shape) >= 2 else (sample.size,)


def _candidates(values, kind, itemsize, shape, coder, shared, rans, plan=None, slow: bool = True,
                big: bool = False) -> list[tuple[bytes, str, tuple]]:
    """(stream, choice, plan) of every coding tried; with a plan, only the one it names (and raw)."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)  # the element bytes, not copied
    whole = plan is None or plan[0] == "whole"
    candidates: list[tuple[bytes | RawStream, str, tuple]] = []
    if coder in ("raw", "auto") or not raw.size:
        candidates.append((RawStream(raw), "raw", ("whole", RAW)))
    if coder in ("zstd", "auto") and raw.size and (plan is None or plan == ("whole", ZSTD)):
        candidates.append((bytes([0, ZSTD]) + zstd_compress(raw, big), "zstd", ("whole", ZSTD)))
    if coder == "auto" and slow and raw.size and raw.size <= XZ_MAX and whole:
        candidates.append((bytes([0, XZ]) + xz_compress(raw.tobytes()), "xz", ("whole", XZ)))  # weighed below
    if coder == "auto" and slow and raw.size and raw.size <= BROTLI_MAX and whole:
        candidates.append((bytes([0, BROTLI]) + brotli_compress(raw.tobytes()), "brotli", ("whole", BROTLI)))
    if coder in PLANE_METHODS and raw.size and (plan is None or plan[0] == "planes"):
        methods = PLANE_METHODS[coder] if rans else tuple(m for m in PLANE_METHODS[coder] if m not in RANS_METHODS)
        for v in P.variants(values, kind, itemsize, shape, only=None if plan is None else plan[1:3]):
            stream, chosen = _code_variant(v, methods, None if plan is None else plan[3], shared, big)
            shown = chosen[1:] if v.sparse else chosen
            candidates.append((stream, describe(1, shown, v.sparse), ("planes", v.axis, v.sparse, tuple(chosen))))
    return candidates


def _code_variant(v: P.Variant, methods, planned: tuple | None, shared, big: bool) -> tuple[bytes, list[int]]:
    """One layout's stream and each plane's method (the bitmap's first when sparse). With `planned`
    methods (from a sample), each plane tries only its own, with constant and raw as fallbacks, and
    a plane it does not fit (e.g. a symbol the shared tables lack) is searched in full."""
    w = Writer()
    w.u8(1)
    w.u8(v.axis)
    w.varint(v.rows)
    w.u8(int(v.sparse))
    if v.sparse:
        w.varint(v.nnz)
    chosen: list[int] = []
    planes = ([(v.mask, np.array([v.mask.size]), None)] if v.sparse else []) + \
        [(plane, v.lengths, shared) for plane in v.planes]
    for i, (plane, lengths, tables) in enumerate(planes):
        allowed = methods if planned is None else tuple(m for m in methods if m in (CONST, RAW, planned[i]))
        m, payload = encode_plane(plane, lengths, allowed, tables, big=big)
        if planned is not None and m == RAW and planned[i] != RAW:
            m, payload = encode_plane(plane, lengths, methods, tables, big=big)
        chosen.append(m)
        w.u8(m)
        w.blob(payload)
    return w.getvalue(), chosen


def decode(stream: bytes | memoryview, kind: str, itemsize: int, n: int, shared: np.ndarray,
           where: str) -> bytes | memoryview:
    """Decode one tensor's stream to its n * itemsize element bytes (bytes, or a memoryview of them)."""
    r = Reader(stream, where)
    form = r.u8()
    nbytes = n * itemsize
    if form == 0:
        method = r.u8()
        payload = r.raw(r.left())
        if method == RAW:
            if len(payload) != nbytes:
                raise r.fail(f"raw tensor has {len(payload)} bytes, expected {nbytes}")
            return bytes(payload)
        if method == ZSTD:
            return zstd_decompress(payload, nbytes, where)
        if method == XZ:
            return xz_decompress(payload, nbytes, where)
        if method == BROTLI:
            return brotli_decompress(payload, nbytes, where)
        raise r.fail(f"unknown tensor method {method}")
    if form != 1:
        raise r.fail(f"unknown stream form {form}")
    axis, rows, sparse = r.u8(), r.varint(max(n, 1)), r.u8()
    if axis > 1 or sparse > 1 or rows < 1 or n % rows:
        raise r.fail("bad plane layout")
    count = n
    nzmask = None
    if sparse:
        if kind != "f":
            raise r.fail("sparse layout on a non-float tensor")
        count = r.varint(n)
        nbits = (n + 7) // 8
        mask = decode_plane(r.u8(), r.blob(), nbits, np.array([nbits]), shared, where)
        nzmask, lengths = P.sparse_row_lengths(mask, n, rows)
        if int(nzmask.sum()) != count:
            raise r.fail("the non-zero bitmap does not match the non-zero count")
    else:
        lengths = P.dense_lengths(rows, n)
    planes, compiled = [], False  # numba is loaded once a plane is rANS-coded
    for _ in range(itemsize):
        method = r.u8()
        compiled |= method in RANS_METHODS
        planes.append(decode_plane(method, r.blob(), count, lengths, shared, where))
    r.done()
    vals = P.from_planes(planes, kind, itemsize, compiled)
    if nzmask is not None:
        full = np.zeros(n, dtype=vals.dtype)
        full[nzmask] = vals
        vals = full
    out = P.unorder(vals, axis, rows)
    out = np.ascontiguousarray(out).astype(out.dtype.newbyteorder("<"), copy=False)
    return memoryview(out.reshape(-1).view(np.uint8))  # (not .tobytes(): a copy of every decoded byte)
