"""engine._codec.encode_frame (native) against engine._codec_py.encode_frame (the reference twin).

Hypothesis writes random column sets into buffers pre-filled with garbage and proves the two
byte-identical over the whole buffer (nothing outside the frame changes), then reads the frame
back: CRC and header through ``scan_frames``, every descriptor and buffer by hand, and typed
values through ``engine.frame.decode_frame``. Bad input raises the same error in both and leaves
the buffer unchanged. A pinned frame proves the bytes are those of the pre-native writer.
"""

from __future__ import annotations

import gc
import mmap
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import engine as en
import engine._codec as native
import engine._codec_py as twin
from engine import frame
from engine.frame import KIND_DTYPES, ColumnSpec, VarColumn

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = struct.Struct("<IHHIIQIHHQ")
DESC = struct.Struct("<HHB3xIIIIII")
INT64_MAX = (1 << 63) - 1
FIXED_KINDS = sorted(KIND_DTYPES)  # 13 string and 14 bytes are the variable-length kinds


# ---- strategies -------------------------------------------------------------------------------


def _as(draw: st.DrawFn, raw: bytes, dtype: np.dtype) -> object:
    """``raw`` in one of the buffer types callers hand over (all read as raw bytes)."""
    form = draw(st.sampled_from(["ndarray", "readonly", "bytes", "bytearray", "memoryview"]))
    if form == "ndarray":
        return np.frombuffer(raw, dtype).copy()
    if form == "readonly":
        return np.frombuffer(raw, dtype)
    if form == "bytes":
        return raw
    if form == "bytearray":
        return bytearray(raw)
    return memoryview(raw)


@st.composite
def fixed_columns(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(FIXED_KINDS))
    dtype = KIND_DTYPES[kind]
    rows = draw(st.integers(0, 12))
    raw = draw(st.binary(min_size=rows * dtype.itemsize, max_size=rows * dtype.itemsize))
    return (draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFE)), kind, rows,
            _as(draw, raw, dtype), None)


@st.composite
def type_columns(draw: st.DrawFn) -> tuple:
    ids = draw(st.lists(st.integers(0, 0xFFFF), max_size=12))
    return (0, 0xFFFF, 0, len(ids), np.array(ids, "<u2"), None)


@st.composite
def var_columns(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from([13, 14]))
    if kind == 13:
        values = [s.encode() for s in draw(st.lists(st.text(max_size=6), max_size=10))]
    else:
        values = draw(st.lists(st.binary(max_size=6), max_size=10))
    offsets = np.zeros(len(values) + 1, "<i4")
    np.cumsum([len(v) for v in values], out=offsets[1:])
    junk = draw(st.binary(max_size=5))  # bytes past offsets[rows] are not copied
    aux = offsets if draw(st.booleans()) else offsets.tobytes()
    return (draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFE)), kind, len(values),
            _as(draw, b"".join(values) + junk, np.dtype(np.uint8)), aux)


COLUMNS = st.lists(st.one_of(fixed_columns(), var_columns(), type_columns()), max_size=6)


def _raw(x: object) -> bytes:
    return np.frombuffer(x, np.uint8).tobytes()


def _encode_both(garbage: bytes, pos: int, args: tuple, cols: list) -> tuple[bytearray, int]:
    """Encode with both modules into copies of ``garbage``; assert equal; the native result."""
    a, b = bytearray(garbage), bytearray(garbage)
    na = native.encode_frame(a, pos, *args, cols)
    nb = twin.encode_frame(b, pos, *args, cols)
    assert na == nb == native.frame_length(cols) == twin.frame_length(cols)
    assert a == b
    assert a[:pos] == garbage[:pos] and a[pos + na :] == garbage[pos + na :]
    return a, na


def _check_decodes(frame_bytes: bytes, args: tuple, cols: list) -> None:
    """Read a frame back by hand: header, CRC, every descriptor and buffer, zero padding."""
    first_offset, count, ntypes, flags, timestamp_ns = args
    length = len(frame_bytes)
    assert length % 64 == 0
    magic, version, fl, ln, crc, first, cnt, ncols, nt, ts = HEADER.unpack_from(frame_bytes)
    assert (magic, version, fl, ln) == (native.FRAME_MAGIC, 1, flags, length)
    assert (first, cnt, ncols, nt, ts) == (first_offset, count, len(cols), ntypes, timestamp_ns)
    assert crc == twin.crc32c_reference(frame_bytes[16:])
    if flags <= 3 and count and first_offset + count <= INT64_MAX:
        positions, _, _, stop, status = native.scan_frames(frame_bytes, 0, length, first_offset)
        assert positions.tolist() == [0] and stop == length and status == native.SCAN_END
    written = bytearray(frame_bytes)  # every byte not checked below must be zero padding
    written[:40] = bytes(40)
    for i, (t, f, kind, rows, data, aux) in enumerate(cols):
        at = 64 + 32 * i
        t2, f2, k2, r2, d_off, d_len, a_off, a_len, reserved = DESC.unpack_from(frame_bytes, at)
        assert (t2, f2, k2, r2, reserved) == (t, f, kind, rows, 0)
        assert frame_bytes[at + 5 : at + 8] == bytes(3)
        written[at : at + 32] = bytes(32)
        assert d_off % 64 == 0 and a_off % 64 == 0 and d_off + d_len <= length
        want = _raw(data)
        if aux is None:
            assert a_off == a_len == 0
        else:
            assert frame_bytes[a_off : a_off + a_len] == _raw(aux)
            written[a_off : a_off + a_len] = bytes(a_len)
            want = want[: np.frombuffer(aux, "<i4")[-1]]
        assert frame_bytes[d_off : d_off + d_len] == want
        written[d_off : d_off + d_len] = bytes(d_len)
    assert not any(written[16:])


# ---- native == twin ---------------------------------------------------------------------------


@FAST
@given(
    cols=COLUMNS,
    pos=st.integers(0, 200),
    tail=st.integers(0, 100),
    first_offset=st.integers(0, 1 << 62),
    count=st.integers(1, 0xFFFFFFFF),
    ntypes=st.integers(0, 0xFFFF),
    flags=st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)),
    timestamp_ns=st.integers(0, (1 << 64) - 1),
    seed=st.integers(0, 2**32 - 1),
)
@example(cols=[], pos=0, tail=0, first_offset=0, count=1, ntypes=0, flags=0, timestamp_ns=0,
         seed=0)
@example(cols=[(0, 0xFFFF, 0, 0, np.empty(0, "<u2"), None),
               (1, 0, 13, 0, b"", np.zeros(1, "<i4")), (1, 1, 4, 0, b"", None)],
         pos=63, tail=0, first_offset=5, count=1, ntypes=1, flags=1, timestamp_ns=1, seed=1)
def test_native_equals_twin(cols, pos, tail, first_offset, count, ntypes, flags, timestamp_ns,
                            seed):
    args = (first_offset, count, ntypes, flags, timestamp_ns)
    length = twin.frame_length(cols)
    garbage = np.random.default_rng(seed).integers(0, 256, pos + length + tail, np.uint8).tobytes()
    buf, n = _encode_both(garbage, pos, args, cols)
    _check_decodes(bytes(buf[pos : pos + n]), args, cols)


def test_large_frame_native_equals_twin():
    # >= 64 KiB: the native writer runs without the GIL
    rng = np.random.default_rng(7)
    values = [bytes(rng.integers(0, 256, rng.integers(0, 40), np.uint8)) for _ in range(20_000)]
    offsets = np.zeros(len(values) + 1, "<i4")
    np.cumsum([len(v) for v in values], out=offsets[1:])
    cols = [(3, 0, 4, 30_000, rng.integers(-9, 9, 30_000), None),
            (3, 1, 14, len(values), np.frombuffer(b"".join(values), np.uint8), offsets),
            (3, 2, 11, 30_001, rng.integers(0, 2, 30_001).astype(bool), None)]
    cols[2] = cols[2][:3] + (30_000, cols[2][4][:30_000], None)
    args = (10, 30_000, 1, 0, 123)
    length = native.frame_length(cols)
    assert length >= 64 << 10
    garbage = rng.integers(0, 256, length + 4096, np.uint8).tobytes()
    buf, n = _encode_both(garbage, 100, args, cols)
    _check_decodes(bytes(buf[100 : 100 + n]), args, cols)


@pytest.mark.parametrize("m", MODULES)
def test_writes_every_writable_buffer(m, tmp_path):
    cols = [(1, 0, 4, 3, np.arange(3, dtype="<i8"), None)]
    want = bytearray(256)
    n = m.encode_frame(want, 64, 0, 3, 1, 0, 7, cols)
    with mmap.mmap(-1, 256) as mm:
        assert m.encode_frame(mm, 64, 0, 3, 1, 0, 7, iter(cols)) == n  # any iterable of columns
        assert mm[:] == want
    arr = np.zeros(32, np.int64)  # any dtype, read as raw bytes
    m.encode_frame(arr, 64, 0, 3, 1, 0, 7, cols)
    assert arr.tobytes() == want
    path = tmp_path / "seg"
    path.write_bytes(bytes(256))
    memmap = np.memmap(path, np.uint8, mode="r+")
    m.encode_frame(memmap, 64, 0, 3, 1, 0, 7, cols)
    memmap.flush()
    del memmap
    assert path.read_bytes() == want


# ---- errors -----------------------------------------------------------------------------------

OK = (1, 0, 4, 2, np.arange(2, dtype="<i8"), None)
VAR = (1, 1, 13, 2, b"abcde", np.array([0, 2, 5], "<i4"))


def _bad(**kw: object) -> dict:
    call: dict = {"pos": 0, "first_offset": 0, "count": 1, "ntypes": 1, "flags": 0,
                  "timestamp_ns": 0, "columns": [OK]}
    return {**call, **kw}


BAD_CALLS = [
    pytest.param(_bad(pos=129), ValueError, id="buffer-too-small"),
    pytest.param(_bad(pos=-1), ValueError, id="negative-pos"),
    pytest.param(_bad(pos=1.0), TypeError, id="float-pos"),
    pytest.param(_bad(count=1 << 32), ValueError, id="count-over-u32"),
    pytest.param(_bad(ntypes=1 << 16), ValueError, id="ntypes-over-u16"),
    pytest.param(_bad(flags=-1), ValueError, id="negative-flags"),
    pytest.param(_bad(first_offset=1 << 64), ValueError, id="first-offset-over-u64"),
    pytest.param(_bad(timestamp_ns=-1), ValueError, id="negative-timestamp"),
    pytest.param(_bad(columns=[OK, (1, 1, 4, 2, np.arange(2), np.zeros(3, "<i4"))]), ValueError,
                 id="aux-on-fixed"),
    pytest.param(_bad(columns=[OK, VAR[:5] + (None,)]), ValueError, id="no-aux-on-var"),
    pytest.param(_bad(columns=[VAR[:5] + (np.array([0, 2], "<i4"),)]), ValueError,
                 id="aux-too-short"),
    pytest.param(_bad(columns=[VAR[:5] + (np.array([0, 2, 5], "<i8"),)]), ValueError,
                 id="aux-int64"),
    pytest.param(_bad(columns=[VAR[:5] + (np.array([0, 2, 6], "<i4"),)]), ValueError,
                 id="aux-past-data"),
    pytest.param(_bad(columns=[VAR[:5] + (np.array([0, 2, -1], "<i4"),)]), ValueError,
                 id="aux-negative"),
    pytest.param(_bad(columns=[(1, 0, 4, 2, np.arange(4, dtype="<i8")[::2], None)]), ValueError,
                 id="strided-ndarray"),
    pytest.param(_bad(columns=[(1, 0, 4, 2, memoryview(bytes(32))[::2], None)]), BufferError,
                 id="strided-memoryview"),
    pytest.param(_bad(columns=[(1, 0, 5, 2, "ab", None)]), TypeError, id="str-data"),
    pytest.param(_bad(columns=[(1, 0, 4, 2, np.arange(3, dtype="<i8"), None)]), ValueError,
                 id="rows-disagree-with-data"),
    pytest.param(_bad(columns=[(1, 0, 17, 0, b"", None)]), ValueError, id="unknown-kind"),
    pytest.param(_bad(columns=[(1, 0, 256, 0, b"", None)]), ValueError, id="kind-over-u8"),
    pytest.param(_bad(columns=[(1 << 16, 0, 4, 0, b"", None)]), ValueError, id="type-over-u16"),
    pytest.param(_bad(columns=[(1, -1, 4, 0, b"", None)]), ValueError, id="negative-field"),
    pytest.param(_bad(columns=[(1, 0, 4, -1, b"", None)]), ValueError, id="negative-rows"),
    pytest.param(_bad(columns=[(1, 0, 4, 0.0, b"", None)]), TypeError, id="float-rows"),
    pytest.param(_bad(columns=[list(OK)]), TypeError, id="column-not-a-tuple"),
    pytest.param(_bad(columns=[OK[:5]]), TypeError, id="column-of-five"),
    pytest.param(_bad(columns=[OK] * 65536), ValueError, id="too-many-columns"),
]


@pytest.mark.parametrize("call, exc", BAD_CALLS)
def test_bad_input_raises_alike_and_writes_nothing(call, exc):
    garbage = bytes(range(256))
    errors = []
    for m in (native, twin):
        buf = bytearray(garbage)
        with pytest.raises(exc) as info:
            m.encode_frame(buf, **call)
        assert buf == garbage
        errors.append(str(info.value))
        del info  # its traceback holds the twin's frames, and so their views of buf
        buf.extend(b"x")  # no buffer export is left behind
    assert errors[0] == errors[1]
    if call["pos"] == 0:  # the column checks of frame_length are the same
        for m in (native, twin):
            try:
                m.frame_length(call["columns"])
            except exc as e:
                assert str(e) == errors[0]


@pytest.mark.parametrize("m", MODULES)
def test_read_only_buffers_are_refused(m, tmp_path):
    ro = np.zeros(256, np.uint8)
    ro.flags.writeable = False
    path = tmp_path / "ro"
    path.write_bytes(bytes(256))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for buf in (bytes(256), ro, mm):
            with pytest.raises(TypeError, match="writable"):
                m.encode_frame(buf, 0, 0, 1, 1, 0, 0, [OK])
    assert not ro.any()


@pytest.mark.parametrize("m", MODULES)
def test_frame_over_4_gib_is_refused(m):
    try:
        huge = mmap.mmap(-1, (1 << 32) - 1, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError, ValueError):  # pragma: no cover - small address spaces
        pytest.skip("cannot map 4 GiB of address space")
    with huge:  # never touched: only its length is read
        cols = [(1, 0, 5, (1 << 32) - 1, huge, None)]  # the most rows; past the limit by 128
        with pytest.raises(ValueError, match="at most 4294967295 bytes"):
            m.frame_length(cols)
        buf = bytearray(128)
        with pytest.raises(ValueError, match="at most 4294967295 bytes"):
            m.encode_frame(buf, 0, 0, 1, 1, 0, 0, cols)
        assert buf == bytes(128)
        del cols


def test_native_holds_no_references():
    data, aux = np.arange(2, dtype="<i8"), np.array([0, 2, 5], "<i4")
    var = np.frombuffer(b"abcde", np.uint8)
    cols = [(1, 0, 4, 2, data, None), (1, 1, 13, 2, var, aux)]
    buf = bytearray(4096)
    before = [sys.getrefcount(x) for x in (data, aux, var, buf)]
    for _ in range(1000):
        native.encode_frame(buf, 0, 0, 2, 1, 0, 0, cols)
        native.frame_length(cols)
        with pytest.raises(ValueError):
            native.encode_frame(buf, 4000, 0, 2, 1, 0, 0, cols)
    gc.collect()
    assert [sys.getrefcount(x) for x in (data, aux, var, buf)] == before
    buf.extend(b"x")  # every export released


# ---- through engine.frame ---------------------------------------------------------------------

# Every field kind of the schema; "a" and "b" share a frame with a type column.
TYPE_A = en.ActionType("a", {
    "k": "key:user", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8",
    "u16": "uint16", "u32": "uint32", "u64": "uint64", "f32": "float32", "f64": "float64",
    "b": "bool", "ts": "timestamp", "s": "string", "by": "bytes",
}, partition="k")
TYPE_B = en.ActionType("b", {"k": "key:user", "s": "string"}, partition="k")
SCHEMA = en.Schema([TYPE_A, TYPE_B])


def _values(at: en.ActionType, rows: int, rng: np.random.Generator) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, ft in at.fields.items():
        kind = frame.kind_of(ft)
        if kind in (frame.KIND_STRING, frame.KIND_BYTES):
            vals = [bytes(rng.integers(0, 256, rng.integers(0, 5), np.uint8)) for _ in range(rows)]
            out[name] = VarColumn.from_values(vals)
        else:
            raw = rng.integers(0, 256, rows * KIND_DTYPES[kind].itemsize, np.uint8)
            if kind == 11:
                raw &= 1
            out[name] = raw.view(KIND_DTYPES[kind])
    return out


@pytest.mark.parametrize("m", MODULES)
@FAST
@given(types=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=20), pos=st.integers(0, 130),
       seed=st.integers(0, 2**32 - 1), first=st.integers(0, 1 << 40))
def test_write_frame_decodes_to_its_values(m, types, pos, seed, first):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(frame, "_encode_frame", m.encode_frame)
        _check_write_frame(types, pos, seed, first)


def _check_write_frame(types: list[int], pos: int, seed: int, first: int) -> None:
    rng = np.random.default_rng(seed)
    ids = np.array(types, np.uint16)
    present = sorted(set(types))
    values = {t: _values(SCHEMA.type_by_id(t), int(np.sum(ids == t)), rng) for t in present}
    specs = []
    if len(present) > 1:
        specs.append(ColumnSpec(0, frame.TYPE_COLUMN_FIELD, frame.KIND_TYPES, ids))
    for t in present:
        at = SCHEMA.type_by_id(t)
        specs += [ColumnSpec(t, i, frame.kind_of(at.fields[f]), values[t][f])
                  for i, f in enumerate(at.field_names)]
    length = frame.frame_size(specs)[0]
    garbage = rng.integers(0, 256, pos + length + 64, np.uint8).tobytes()
    buf = bytearray(garbage)
    assert frame.write_frame(buf, pos, first, len(types), len(present), specs, 99) == length
    assert buf[:pos] == garbage[:pos] and buf[pos + length :] == garbage[pos + length :]
    batch = frame.decode_frame(buf, pos, 0, SCHEMA, {})
    assert batch.types.tolist() == types and batch.first_offset == first
    for t in present:
        at = SCHEMA.type_by_id(t)
        for f in at.field_names:
            got, want = batch.column(at.name, f), values[t][f]
            if isinstance(want, VarColumn):
                assert [bytes(got.data[a:b]) for a, b in zip(got.offsets[:-1], got.offsets[1:])] \
                    == [want[i] for i in range(len(want))]
            else:
                assert got.tobytes() == want.tobytes() and got.dtype == want.dtype


@pytest.mark.parametrize("m", MODULES)
def test_write_frame_copies_strided_columns(m, monkeypatch):
    monkeypatch.setattr(frame, "_encode_frame", m.encode_frame)
    wide = np.arange(20, dtype=np.int64)
    specs = [ColumnSpec(0, 0, frame.KIND_KEY, wide[::2]),
             ColumnSpec(0, 1, frame.KIND_KEY, wide[1::2])]
    a, b = bytearray(512), bytearray(512)
    frame.write_frame(a, 0, 0, 10, 1, specs, 1, sparse=True)
    frame.write_frame(b, 0, 0, 10, 1, [ColumnSpec(s.type_id, s.field_index, s.kind,
                                                  s.values.copy()) for s in specs], 1, sparse=True)
    assert a == b and native.frame_header(a, 0)["flags"] == frame.FLAG_SPARSE


def test_bytes_are_those_of_the_pre_native_writer():
    # The numpy + struct write_frame that came before the native encoder wrote these bytes.
    ids = np.array([0, 1, 0], np.uint16)
    specs = [
        ColumnSpec(0, frame.TYPE_COLUMN_FIELD, frame.KIND_TYPES, ids),
        ColumnSpec(0, 0, frame.KIND_KEY, np.array([7, -3], np.int64)),
        ColumnSpec(0, 1, 12, np.array([1_700_000_000_000_000_000, 5], np.int64)),
        ColumnSpec(1, 0, frame.KIND_KEY, np.array([9], np.int64)),
        ColumnSpec(1, 1, frame.KIND_STRING, VarColumn.from_values([b"h\xc3\xa9llo"])),
    ]
    buf = bytearray(b"\xee" * 1024)
    n = frame.write_frame(buf, 64, 41, 3, 2, specs, 1_700_000_000_123_456_789)
    assert n == 640
    assert twin.crc32c_reference(bytes(buf)) == PINNED_BUFFER_CRC
    for m in (native, twin):
        again = bytearray(b"\xee" * 1024)
        m.encode_frame(again, 64, 41, 3, 2, frame.FLAG_TYPE_COLUMN, 1_700_000_000_123_456_789,
                       frame._column_tuples(specs))
        assert again == buf


PINNED_BUFFER_CRC = 0x745A531B  # of the whole 1024-byte buffer, from the pre-native writer
