"""Table-driven interleaved rANS for byte symbols, compiled with numba.

Why hand-written: constriction (which codes the Huffman and the legacy rANS streams) decodes
about 40 M symbols/s from Python, because every symbol is looked up by a binary search in a
model that constriction's Python API builds; the packed format's target is 100 MB/s of decoded
weights on one core. A static rANS with a slot -> symbol lookup table decodes several times
faster, and constriction does not expose one to Python. This module is that coder (and, for
the same reason, the compiled inverse of the byte-plane split): 14-bit probabilities (the tables
are the ones `models` already stores, scaled here to sum exactly 2**14; the finer grain keeps
the symbols between the present ones, which must stay codable, from taking mass), 32-bit states
renormalized by 16-bit words, four interleaved states.

Stream: little-endian u16 words; the decoder reads them forward. Groups of symbols, each with its
own table, follow one another in one stream (the shared-table coder codes each table's rows as
one group). A decoder that runs out of words or does not end in the encoder's initial states
reports corruption instead of returning wrong bytes.
"""

from __future__ import annotations

import numba
import numpy as np

from onnxcomp.io.coding.io import CorruptStream

PROB_BITS = 14
TOTAL = 1 << PROB_BITS
LOW = 1 << 16  # states live in [LOW, 2**32)
LANES = 4
DECODED, CORRUPT, BAD_IDS = 0, 1, 2  # decode_kernel's answers


def normalize(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to exactly TOTAL, every symbol of the support >= 1 (deterministic:
    encoder and decoder derive the same frequencies from the same stored counts)."""
    return _tables(np.asarray(counts, np.int64).reshape(1, -1))[0][0]


@numba.njit(cache=True, nogil=True)
def _normalize_kernel(counts):
    """(freq, cum): normalize() for each row of a (K, 256) array and its cumulative frequencies;
    (0, 256) arrays when a row is negative or all zero.
    Every symbol between the lowest and the highest present one keeps a frequency >= 1 (as in the
    stored tables, they can be coded); the rounding difference is taken from or given to the most
    frequent symbols first (a stable order, so encoder and decoder agree)."""
    freq = np.zeros(counts.shape, np.int64)
    cum = np.zeros(counts.shape, np.int64)
    for t in range(counts.shape[0]):
        s, lo, hi = 0, -1, -1
        for i in range(256):
            c = counts[t, i]
            if c < 0:
                return np.zeros((0, 256), np.int64), np.zeros((0, 256), np.int64)
            s += c
            if c > 0:
                lo = i if lo < 0 else lo
                hi = i
        if s <= 0:
            return np.zeros((0, 256), np.int64), np.zeros((0, 256), np.int64)
        diff = TOTAL
        scale = TOTAL / s
        for i in range(256):
            # f = c * TOTAL // s, exactly, without a division per symbol (integer division is
            # most of this loop's time): the float product is off by at most one.
            c = counts[t, i]
            f = np.int64(c * scale)
            if f * s > c * TOTAL:
                f -= 1
            elif (f + 1) * s <= c * TOTAL:
                f += 1
            if f == 0 and lo <= i <= hi:
                f = 1
            freq[t, i] = f
            diff -= f
        if diff:
            top = 0  # the most frequent symbol, the lowest one of a tie: the first in that order
            for i in range(1, 256):
                if freq[t, i] > freq[t, top]:
                    top = i
            if diff > 0 or freq[t, top] - 1 >= -diff:  # it alone takes the whole difference
                freq[t, top] += diff
                diff = 0
            order = np.argsort(-freq[t], kind="mergesort") if diff else np.zeros(0, np.int64)
            j = 0
            while diff:
                sym = order[j % 256]
                if diff > 0:
                    freq[t, sym] += diff
                    diff = 0
                elif freq[t, sym] > 1:
                    take = min(-diff, freq[t, sym] - 1)
                    freq[t, sym] -= take
                    diff += take
                j += 1
        for i in range(1, 256):
            cum[t, i] = cum[t, i - 1] + freq[t, i - 1]
    return freq, cum


def _checked(counts: np.ndarray) -> np.ndarray:
    counts = np.ascontiguousarray(counts, np.int64)
    if counts.ndim != 2 or counts.shape[1] != 256:
        raise ValueError("tables must be rows of 256 counts")
    return counts


def _tables(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(freq, cum) int64 arrays (tables x 256) for a (K, 256) array of counts."""
    counts = _checked(counts)
    freq, cum = _normalize_kernel(counts)
    if len(freq) != len(counts):
        raise ValueError("a table needs 256 non-negative counts, not all zero")
    return freq, cum


@numba.njit(cache=True, nogil=True)
def _decoder_kernel(counts):
    """(slot symbols, freq, cum) for a (K, 256) array of counts, in one call (a small model pays
    per call). The slot symbols are the decoder's first lookup (indexed by the state's low bits);
    one byte per slot keeps 64 tables in 1 MB, so a model's shared tables stay in cache while
    rows switch between them. All have 0 rows when a table is bad."""
    freq, cum = _normalize_kernel(counts)
    out = np.empty((freq.shape[0], TOTAL), np.uint8)
    for t in range(freq.shape[0]):
        for s in range(256):
            out[t, cum[t, s]:cum[t, s] + freq[t, s]] = s
    return out, freq, cum


@numba.njit(cache=True, nogil=True)
def encode_kernel(symbols, sizes, table_ids, freq, cum):
    """Words of the stream (reversed order of coding: rANS is a stack), or an empty array when a
    symbol has no frequency in its table. int64 arithmetic throughout (values stay below 2**48)."""
    n = symbols.size
    out = np.empty(n + 2 * LANES + 8, np.uint16)  # <= one word per symbol + the final states
    pos = out.size
    state = np.full(LANES, LOW, np.int64)
    i = n
    for g in range(sizes.size - 1, -1, -1):
        t = table_ids[g]
        for _ in range(sizes[g]):
            i -= 1
            s = symbols[i]
            f = freq[t, s]
            if f == 0:
                return np.empty(0, np.uint16)
            lane = i & (LANES - 1)
            x = state[lane]
            if x >= (f << (32 - PROB_BITS)):
                pos -= 1
                out[pos] = x & 0xFFFF
                x >>= 16
            state[lane] = ((x // f) << PROB_BITS) + (x % f) + cum[t, s]
    for lane in range(LANES - 1, -1, -1):
        pos -= 1
        out[pos] = state[lane] & 0xFFFF
        pos -= 1
        out[pos] = state[lane] >> 16
    return out[pos:]


@numba.njit(cache=True, nogil=True, inline="always")
def decode_one(x, words, p, symbols, freq, cum):
    """One symbol from state x -> (new state, next word index, symbol)."""
    s = symbols[x & (TOTAL - 1)]
    x = freq[s] * (x >> PROB_BITS) + (x & (TOTAL - 1)) - cum[s]
    need = ((x - LOW) >> 63) & 1  # 1 when x < LOW; branch-free: the branch is unpredictable
    x = (x << (need << 4)) | (words[p] & -need)
    return x, p + need, s


@numba.njit(cache=True, nogil=True)
def decode_kernel(words, nwords, group_sizes, group_tables, slot_symbols, freqs, cums, out):
    # Returns DECODED, CORRUPT or BAD_IDS (a group's table id or size out of range; checked
    # here, where it costs nothing, rather than by numpy calls per plane).
    # `words` is padded with zeros past `nwords` by one word per symbol, so reading never runs
    # past the array even on corrupt data (at most one word is read per symbol); the stream is
    # valid only if exactly `nwords` were read and the states end where the encoder began.
    # The states are four locals so they stay in registers; all arithmetic is int64.
    x0 = (np.int64(words[0]) << 16) | np.int64(words[1])
    x1 = (np.int64(words[2]) << 16) | np.int64(words[3])
    x2 = (np.int64(words[4]) << 16) | np.int64(words[5])
    x3 = (np.int64(words[6]) << 16) | np.int64(words[7])
    p = 2 * LANES
    i = 0
    for g in range(group_sizes.size):
        t = group_tables[g]
        if t < 0 or t >= slot_symbols.shape[0] or group_sizes[g] < 0:
            return BAD_IDS
        sy, fr, cu = slot_symbols[t], freqs[t], cums[t]
        end = i + group_sizes[g]
        while i < end and i & 3:  # finish the round of lanes the previous group began
            if i & 3 == 1:
                x1, p, out[i] = decode_one(x1, words, p, sy, fr, cu)
            elif i & 3 == 2:
                x2, p, out[i] = decode_one(x2, words, p, sy, fr, cu)
            else:
                x3, p, out[i] = decode_one(x3, words, p, sy, fr, cu)
            i += 1
        while i + 4 <= end:
            x0, p, out[i] = decode_one(x0, words, p, sy, fr, cu)
            x1, p, out[i + 1] = decode_one(x1, words, p, sy, fr, cu)
            x2, p, out[i + 2] = decode_one(x2, words, p, sy, fr, cu)
            x3, p, out[i + 3] = decode_one(x3, words, p, sy, fr, cu)
            i += 4
        if i < end:
            x0, p, out[i] = decode_one(x0, words, p, sy, fr, cu)
            i += 1
        if i < end:
            x1, p, out[i] = decode_one(x1, words, p, sy, fr, cu)
            i += 1
        if i < end:
            x2, p, out[i] = decode_one(x2, words, p, sy, fr, cu)
            i += 1
    return DECODED if p == nwords and x0 == LOW and x1 == LOW and x2 == LOW and x3 == LOW else CORRUPT


@numba.njit(cache=True, nogil=True)
def merge_planes_kernel(planes, rotate, out):
    """planes.from_planes in one pass (numpy needs ten passes over a small tensor, the cost of a
    small model): `out` (uint16, uint32 or uint64) gets the values whose bytes are the (k, n)
    byte planes, most significant first; with `rotate`, each value's bits are rotated right by
    one (the float transform undone)."""
    k, n = planes.shape
    top = np.uint64(8 * k - 1)
    one, eight = np.uint64(1), np.uint64(8)
    for i in range(n):  # plane by plane, so that the loops vectorize
        out[i] = planes[0, i]
    for j in range(1, k):
        for i in range(n):
            out[i] = (np.uint64(out[i]) << eight) | np.uint64(planes[j, i])
    if rotate:
        for i in range(n):
            v = np.uint64(out[i])
            out[i] = (v >> one) | ((v & one) << top)


def encode(symbols: np.ndarray, sizes: np.ndarray, table_ids: np.ndarray, tables: np.ndarray) -> bytes:
    """Code uint8 symbols in groups (sizes[g] symbols each, coded with tables[table_ids[g]], a
    (K, 256) array of counts) into one word stream."""
    symbols = np.ascontiguousarray(symbols, np.uint8)
    if not symbols.size:
        return b""
    sizes, table_ids = np.asarray(sizes, np.int64), np.asarray(table_ids, np.int64)
    if int(sizes.sum()) != symbols.size or len(sizes) != len(table_ids):
        raise ValueError("the groups do not match the symbols")
    freq, cum = _tables(tables)
    words = encode_kernel(symbols, sizes, table_ids, freq, cum)
    if not words.size:
        raise ValueError("a symbol is missing from its table")
    return words.astype("<u2").tobytes()


_shared_cache: tuple = (None, None)


def _decoder_tables(tables: np.ndarray, keep: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decoder's (slot symbols, frequencies, cumulative frequencies). A model's shared tables
    (one array object, up to 64 tables) serve most of its planes: with `keep`, the last such
    array's are kept."""
    global _shared_cache
    cached = _shared_cache  # one read: threads decoding other models may replace it meanwhile
    if keep and cached[0] is tables:
        return cached[1]
    counts = _checked(tables)
    decoder = _decoder_kernel(counts)
    if len(decoder[1]) != len(counts):
        raise ValueError("a table needs 256 non-negative counts, not all zero")
    if keep:
        _shared_cache = (tables, decoder)
    return decoder


def decode(data: bytes | memoryview, sizes: np.ndarray, table_ids: np.ndarray, tables: np.ndarray,
           where: str, shared: bool = False) -> np.ndarray:
    """Inverse of encode: the groups' symbols one after another (uint8). `shared`: `tables` is the
    model's shared array, whose decoder tables are worth keeping between calls."""
    sizes = np.asarray(sizes, np.int64)
    table_ids = np.asarray(table_ids, np.int64)
    total = int(sizes.sum())
    if not total:
        if len(data):
            raise CorruptStream(f"{where}: rANS data where no symbols are coded")
        return np.zeros(0, np.uint8)
    nwords = len(data) // 2
    if len(data) % 2 or nwords > total + 2 * LANES + 8 or nwords < 2 * LANES:
        raise CorruptStream(f"{where}: rANS stream length does not fit {total} symbols")
    if len(sizes) != len(table_ids):
        raise CorruptStream(f"{where}: table ids do not match the tables")
    try:
        decoder = _decoder_tables(tables, shared)
    except ValueError as exc:
        raise CorruptStream(f"{where}: bad symbol table ({exc})") from exc
    words = np.zeros(nwords + total + 1, np.uint16)  # the zero padding keeps reads in bounds (see kernel)
    words[:nwords] = np.frombuffer(data, dtype="<u2")
    out = np.empty(total, np.uint8)
    status = decode_kernel(words, nwords, sizes, table_ids, *decoder, out)
    if status == BAD_IDS:
        raise CorruptStream(f"{where}: table ids do not match the tables")
    if status != DECODED:
        raise CorruptStream(f"{where}: rANS data is corrupt (it does not decode to {total} symbols)")
    return out
