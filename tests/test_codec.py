"""engine._codec (native) against engine._codec_py (twin) and the pure-Python CRC32C oracle.

Every test runs on both modules; the Hypothesis tests prove them equal on random and damaged
bytes. A guard-page test proves the native scanner never reads past ``end``.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import engine._codec as native
import engine._codec_py as twin

MODULES = [pytest.param(native, id="native"), pytest.param(twin, id="twin")]
ref = twin.crc32c_reference
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# RFC 3720 (iSCSI) B.4 vectors plus the usual check value.
VECTORS = [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]

# One seeded blob for the long-buffer paths: 3-way blocks start at 3 * 256 and 3 * 8192 bytes.
BLOB = np.random.default_rng(20240611).integers(0, 256, 200_000, dtype=np.uint8).tobytes()


# ---- crc32c -----------------------------------------------------------------------------------


def test_public_names_match():
    assert native.__all__ == twin.__all__
    for name in native.__all__:
        a, b = getattr(native, name), getattr(twin, name)
        assert callable(a) == callable(b) and (callable(a) or a == b), name


@pytest.mark.parametrize("crc", [native.crc32c, native._crc32c_sw, twin.crc32c, ref])
@pytest.mark.parametrize("data, expected", VECTORS)
def test_crc_known_vectors(crc, data, expected):
    assert crc(data) == expected


@FAST
@given(data=st.binary(max_size=2000), skip=st.integers(0, 15), value=st.integers(0, 2**32 - 1))
def test_crc_random_buffers_agree(data, skip, value):
    view = memoryview(data)[skip:]  # every start alignment
    want = ref(view, value)
    assert native.crc32c(view, value) == want
    assert native._crc32c_sw(view, value) == want
    assert twin.crc32c(view, value) == want


@FAST
@given(start=st.integers(0, 64), length=st.integers(0, len(BLOB) - 64))
@example(start=1, length=3 * 8192 - 1)
@example(start=0, length=3 * 8192)
@example(start=7, length=3 * 8192 + 3 * 256 + 9)
def test_crc_long_buffers_hardware_equals_software(start, length):
    view = memoryview(BLOB)[start : start + length]
    assert native.crc32c(view) == native._crc32c_sw(view) == twin.crc32c(view)


@pytest.mark.parametrize("length", [3 * 256 - 1, 3 * 256, 3 * 8192 + 5, 70_000])
def test_crc_long_buffers_match_oracle(length):
    view = memoryview(BLOB)[3 : 3 + length]
    assert native.crc32c(view) == native._crc32c_sw(view) == ref(view)


@pytest.mark.parametrize("m", MODULES)
@FAST
@given(a=st.binary(max_size=300), b=st.binary(max_size=300), value=st.integers(0, 2**32 - 1))
def test_crc_chains(m, a, b, value):
    assert m.crc32c(b, m.crc32c(a, value)) == m.crc32c(a + b, value) == ref(a + b, value)


def test_crc_software_path_is_not_the_dispatch():
    # If the machine has SSE4.2 the two paths are different code; both must agree.
    assert isinstance(native._crc32c_hw_available(), bool)
    big = memoryview(BLOB)
    assert native.crc32c(big, 12345) == native._crc32c_sw(big, 12345)


@pytest.mark.parametrize("m", MODULES)
def test_crc_accepts_every_buffer(m, tmp_path):
    want = ref(BLOB[:4096])
    arr = np.frombuffer(BLOB[:4096], np.uint8).copy()
    arr.flags.writeable = False
    path = tmp_path / "blob"
    path.write_bytes(BLOB[:4096])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert m.crc32c(mm) == want
    memmap = np.memmap(path, np.uint8, mode="r")
    assert m.crc32c(memmap) == want
    del memmap
    assert m.crc32c(arr) == want
    assert m.crc32c(arr.view(np.int64).reshape(8, 64)) == want  # any dtype, any C-contiguous shape
    assert m.crc32c(arr.view(">i4")) == want
    assert m.crc32c(pa.py_buffer(BLOB[:4096])) == want  # exports format 'b'
    assert m.crc32c(bytearray(BLOB[:4096])) == want
    assert m.crc32c(memoryview(BLOB[:4096]).cast("b")) == want


@pytest.mark.parametrize("m", MODULES)
def test_crc_rejects_bad_input(m):
    with pytest.raises(ValueError):
        m.crc32c(np.arange(10, dtype=np.uint8)[::2])
    with pytest.raises(BufferError):
        m.crc32c(memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        m.crc32c("text")
    with pytest.raises(TypeError):
        m.crc32c(b"a", 1.5)
    for value in (-1, 2**32):
        with pytest.raises(OverflowError):
            m.crc32c(b"a", value)


# ---- frames: a test-local writer --------------------------------------------------------------

HEADER = struct.Struct("<IHHIIQIHHQ")


def make_frame(first: int, count: int, payload: bytes = b"", *, ncols: int = 0, ntypes: int = 1,
               flags: int = 0, version: int = 1, magic: int = twin.FRAME_MAGIC,
               length: int | None = None) -> bytes:
    """A frame of zero descriptors and ``payload``, padded to 64, CRC filled (by the oracle)."""
    body = 64 + 32 * ncols + len(payload)
    if length is None:
        length = -(-body // 64) * 64
    frame = bytearray(HEADER.pack(magic, version, flags, length, 0, first, count, ncols, ntypes,
                                  1_700_000_000_000_000_000))
    frame += bytes(24 + 32 * ncols) + payload
    frame += bytes(max(0, length - len(frame)))
    struct.pack_into("<I", frame, 12, ref(memoryview(frame)[16:length]))
    return bytes(frame)


def make_log(counts, payload_sizes, first=100):
    frames, positions, firsts, pos = [], [], [], 0
    for count, size in zip(counts, payload_sizes):
        frames.append(make_frame(first, count, bytes([count % 251]) * size))
        positions.append(pos)
        firsts.append(first)
        pos += len(frames[-1])
        first += count
    return b"".join(frames), positions, firsts


LOG, LOG_POS, LOG_FIRST = make_log([3, 1, 7, 2], [10, 0, 200, 64])
LOG_END = len(LOG)
SEG = LOG + bytes(256)  # a preallocated segment with unwritten space after the frames


def same(a, b):
    assert len(a) == len(b) == 5
    for x, y in zip(a[:3], b[:3]):
        assert x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, y)
    assert a[3:] == b[3:]


def scan_both(buf, *args, **kw):
    got = native.scan_frames(buf, *args, **kw)
    same(got, twin.scan_frames(buf, *args, **kw))
    return got


# ---- frames: explicit cases -------------------------------------------------------------------


def test_constants():
    assert struct.pack("<I", native.FRAME_MAGIC) == b"ENGF"
    assert (native.FRAME_HEADER_BYTES, native.COLUMN_DESC_BYTES, native.FRAME_ALIGN) == (64, 32, 64)
    codes = [native.SCAN_END, native.SCAN_BAD_MAGIC, native.SCAN_BAD_VERSION,
             native.SCAN_BAD_LENGTH, native.SCAN_BAD_CRC, native.SCAN_BAD_OFFSET,
             native.SCAN_TRUNCATED]
    assert codes == list(range(7))


@pytest.mark.parametrize("m", MODULES)
def test_scan_valid_log(m):
    pos, firsts, counts, stop, status = m.scan_frames(SEG, 0, len(SEG), 100)
    assert pos.tolist() == LOG_POS and firsts.tolist() == LOG_FIRST
    assert counts.tolist() == [3, 1, 7, 2]
    assert (stop, status) == (LOG_END, m.SCAN_END)  # stopped at the zero tail
    assert m.scan_frames(LOG, 0, LOG_END, 100)[3:] == (LOG_END, m.SCAN_END)  # stopped at end
    pos, firsts, counts, stop, status = m.scan_frames(SEG, LOG_POS[1], len(SEG), 103)
    assert pos.tolist() == LOG_POS[1:] and (stop, status) == (LOG_END, m.SCAN_END)
    pos, _, _, stop, status = m.scan_frames(SEG, 0, len(SEG), 100, max_frames=2)
    assert pos.tolist() == LOG_POS[:2] and (stop, status) == (LOG_POS[2], m.SCAN_END)
    assert m.scan_frames(SEG, 0, len(SEG), 100, max_frames=0)[3:] == (0, m.SCAN_END)
    assert m.scan_frames(SEG, 64, 64, 100)[3:] == (64, m.SCAN_END)


def damaged(at: int, new: bytes) -> bytes:
    return SEG[:at] + new + SEG[at + len(new) :]


F2 = LOG_POS[2]  # the damaged frame below; frames 0 and 1 stay valid


@pytest.mark.parametrize("buf, status", [
    (damaged(F2, b"ENGG"), twin.SCAN_BAD_MAGIC),
    (damaged(F2 + 4, b"\x02"), twin.SCAN_BAD_VERSION),
    (damaged(F2 + 6, b"\x04"), twin.SCAN_BAD_VERSION),  # unknown flag
    (damaged(F2 + 63, b"\x01"), twin.SCAN_BAD_VERSION),  # reserved byte
    (damaged(F2 + 8, struct.pack("<I", 64 * 5 + 1)), twin.SCAN_BAD_LENGTH),  # not a multiple
    (damaged(F2 + 8, struct.pack("<I", 0)), twin.SCAN_BAD_LENGTH),
    (damaged(F2 + 28, struct.pack("<H", 65535)), twin.SCAN_BAD_LENGTH),  # descriptors overrun
    (damaged(F2 + 8, struct.pack("<I", 2**32 - 64)), twin.SCAN_BAD_LENGTH),  # past end
    (damaged(F2 + 200, b"\xee"), twin.SCAN_BAD_CRC),  # payload byte
    (damaged(F2 + 30, b"\x05"), twin.SCAN_BAD_CRC),  # header byte under the CRC
    (SEG[:F2] + make_frame(LOG_FIRST[2] + 1, 7, b"x" * 200) + bytes(256), twin.SCAN_BAD_OFFSET),
    (SEG[:F2] + make_frame(LOG_FIRST[2], 0, b"x" * 200) + bytes(256), twin.SCAN_BAD_OFFSET),
    (SEG[:F2] + SEG[F2 : F2 + 60], twin.SCAN_TRUNCATED),
    (SEG[:F2] + SEG[F2 : F2 + 64], twin.SCAN_BAD_LENGTH),  # header whole, frame cut off
    (SEG[:F2] + bytes(63), twin.SCAN_END),  # a short all-zero tail is unwritten space
])
@pytest.mark.parametrize("m", MODULES)
def test_scan_damage(m, buf, status):
    pos, firsts, counts, stop, got = m.scan_frames(buf, 0, len(buf), 100)
    assert (got, stop) == (status, F2)
    assert pos.tolist() == LOG_POS[:2] and firsts.tolist() == LOG_FIRST[:2]
    assert counts.tolist() == [3, 1]


@pytest.mark.parametrize("m", MODULES)
def test_scan_limits_and_crc_switch(m):
    bad_crc = damaged(F2 + 200, b"\xee")
    assert m.scan_frames(bad_crc, 0, len(bad_crc), 100, verify_crc=False)[3:] == (LOG_END, 0)
    big = LOG_POS[3] - LOG_POS[2]  # the 320-byte frame
    assert m.scan_frames(SEG, 0, len(SEG), 100, max_frame_bytes=big - 64)[3:] == (
        F2, m.SCAN_BAD_LENGTH)
    assert m.scan_frames(SEG, 0, len(SEG), 100, max_frame_bytes=big)[3:] == (LOG_END, 0)
    assert m.scan_frames(SEG, 0, len(SEG), 99)[3:] == (0, m.SCAN_BAD_OFFSET)
    assert m.scan_frames(SEG, 0, len(SEG), 2**64 - 1)[3:] == (0, m.SCAN_BAD_OFFSET)
    top = make_frame(2**63 - 2, 1) + make_frame(2**63 - 1, 1)  # offsets must stay int64
    pos, firsts, counts, stop, status = m.scan_frames(top, 0, len(top), 2**63 - 2)
    assert firsts.tolist() == [2**63 - 2] and (stop, status) == (64, m.SCAN_BAD_OFFSET)


@pytest.mark.parametrize("m", MODULES)
@pytest.mark.parametrize("start, end, expected", [
    (0, len(SEG) + 1, 100), (-64, 64, 100), (128, 64, 100), (32, 128, 100), (0, -1, 100),
    (0, 64, -1), (0, 64, 2**64),
])
def test_scan_rejects_bad_arguments(m, start, end, expected):
    with pytest.raises(ValueError):
        m.scan_frames(SEG, start, end, expected)
    with pytest.raises(ValueError):
        m.scan_frames(SEG, 0, 64, 100, max_frame_bytes=-1)


@pytest.mark.parametrize("m", MODULES)
def test_scan_accepts_every_buffer(m, tmp_path):
    path = tmp_path / "seg"
    path.write_bytes(SEG)
    want = (LOG_POS, LOG_FIRST, LOG_END, m.SCAN_END)

    def check(buf):
        pos, firsts, _, stop, status = m.scan_frames(buf, 0, len(SEG), 100)
        assert (pos.tolist(), firsts.tolist(), stop, status) == want

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        check(mm)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        check(mm)
    memmap = np.memmap(path, np.uint8, mode="r")
    check(memmap)
    del memmap
    check(np.frombuffer(SEG, np.uint8))  # read-only
    check(np.frombuffer(SEG, np.uint64).reshape(-1, 8))
    check(pa.py_buffer(SEG))
    check(bytearray(SEG))


@pytest.mark.parametrize("m", MODULES)
def test_scan_grows_its_outputs(m):
    # More frames than the native first capacity (256): the output arrays must grow correctly.
    log, positions, firsts = make_log([1] * 700, [0] * 700, first=0)
    pos, got_firsts, counts, stop, status = m.scan_frames(log, 0, len(log), 0)
    assert pos.tolist() == positions and got_firsts.tolist() == firsts
    assert counts.tolist() == [1] * 700 and (stop, status) == (len(log), m.SCAN_END)
    pos, _, _, stop, status = m.scan_frames(log, 0, len(log), 0, max_frames=513)
    assert len(pos) == 513 and (stop, status) == (positions[513], m.SCAN_END)


@pytest.mark.parametrize("m", MODULES)
def test_frame_header(m):
    h = m.frame_header(SEG, LOG_POS[2])
    assert h == {"magic": m.FRAME_MAGIC, "version": 1, "flags": 0, "length": 320,
                 "crc": struct.unpack_from("<I", SEG, F2 + 12)[0], "first_offset": LOG_FIRST[2],
                 "count": 7, "ncols": 0, "ntypes": 1, "timestamp_ns": 1_700_000_000_000_000_000}
    assert m.frame_header(SEG, len(SEG) - 64)["magic"] == 0
    for pos in (len(SEG) - 63, -1, len(SEG)):
        with pytest.raises(ValueError):
            m.frame_header(SEG, pos)


# ---- frames: native == twin on damaged and random bytes ---------------------------------------

@FAST
@given(
    flips=st.lists(st.tuples(st.integers(0, len(SEG) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(SEG)),
    start_frame=st.integers(0, 3),
    verify=st.booleans(),
    max_frames=st.integers(-1, 5),
)
def test_scan_damaged_log_agrees(flips, cut, start_frame, verify, max_frames):
    buf = bytearray(SEG)
    for at, mask in flips:
        buf[at] ^= mask
    start = LOG_POS[start_frame]
    end = max(start, cut)
    pos, firsts, counts, stop, status = scan_both(
        bytes(buf), start, end, LOG_FIRST[start_frame], verify, max_frames)
    assert start <= stop <= end and status in range(7)
    if not flips and end >= LOG_END and max_frames < 0:
        assert pos.tolist() == LOG_POS[start_frame:] and (stop, status) == (LOG_END, 0)


def header_fields():
    """Headers that pass the magic check, with field values near every boundary."""
    return st.tuples(
        st.sampled_from([1, 1, 1, 0, 2, 65535]),  # version
        st.sampled_from([0, 0, 1, 2, 0x8000]),  # flags
        st.sampled_from([0, 64, 128, 192, 4096, 65, 2**32 - 64, 2**32 - 1, 2**31]),  # length
        st.sampled_from([0, 0, 0, 100, 2**63 - 1, 2**63, 2**64 - 1]),  # first_offset
        st.sampled_from([1, 1, 0, 2, 2**32 - 1]),  # count
        st.sampled_from([0, 0, 1, 2, 65535]),  # ncols
        st.booleans(),  # fill in the right CRC (when the claimed length fits)
    )


@FAST
@given(headers=st.lists(header_fields(), min_size=1, max_size=4), noise=st.binary(max_size=512),
       tail=st.integers(0, 200), verify=st.booleans(),
       max_bytes=st.sampled_from([1 << 32, 1 << 40, 4096, 128, 64, 0]))
def test_scan_crafted_headers_agree(headers, noise, tail, verify, max_bytes):
    buf = bytearray()
    for version, flags, length, first, count, ncols, fix_crc in headers:
        at = len(buf)
        buf += HEADER.pack(twin.FRAME_MAGIC, version, flags, length, 0, first, count, ncols, 1, 0)
        buf += bytes(24) + noise
        buf += bytes(-len(buf) % 64)
        if fix_crc and at + length <= len(buf) + tail:
            buf += bytes(max(0, at + length - len(buf)))
            struct.pack_into("<I", buf, at + 12, ref(memoryview(buf)[at + 16 : at + length]))
    buf += bytes(tail)
    scan_both(bytes(buf), 0, len(buf), 100, verify, -1, max_bytes)
    scan_both(bytes(buf), 0, len(buf), headers[0][3], verify, -1, max_bytes)


@FAST
@given(garbage=st.binary(max_size=700), magic_at=st.lists(st.integers(0, 10), max_size=3),
       end_cut=st.integers(0, 64))
def test_scan_garbage_agrees(garbage, magic_at, end_cut):
    buf = bytearray(garbage)
    for slot in magic_at:  # put plausible magics at frame boundaries
        if slot * 64 + 4 <= len(buf):
            buf[slot * 64 : slot * 64 + 4] = b"ENGF"
    end = max(0, len(buf) - end_cut)
    pos, firsts, counts, stop, status = scan_both(bytes(buf), 0, end, 0)
    assert 0 <= stop <= end and len(pos) == len(firsts) == len(counts)


# ---- the native scanner never reads past `end` ------------------------------------------------

PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def guarded():
    """A page of memory followed by a PROT_NONE page: reading past the first page segfaults."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mprotect via ctypes is tested on Linux only")
    mm = mmap.mmap(-1, 2 * PAGE)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + PAGE, PAGE, 0) == 0, ctypes.get_errno()  # PROT_NONE
    page = (ctypes.c_char * PAGE).from_address(addr)  # a view that never reaches the guard
    yield page
    assert libc.mprotect(addr + PAGE, PAGE, 3) == 0  # PROT_READ | PROT_WRITE, then unmap
    del page, anchor
    mm.close()


@settings(max_examples=100, deadline=None)
@given(headers=st.lists(header_fields(), min_size=1, max_size=3), back=st.integers(1, 4))
def test_native_scan_stays_inside_end(guarded, headers, back):
    buf = bytearray(PAGE)
    at = PAGE - 64 * back  # crafted headers in the last bytes before the guard page
    for version, flags, length, first, count, ncols, _ in headers:
        if at + 64 > PAGE:
            break
        buf[at : at + 64] = HEADER.pack(twin.FRAME_MAGIC, version, flags, length, 0, first,
                                        count, ncols, 1, 0) + bytes(24)
        at += 64
    ctypes.memmove(guarded, bytes(buf), PAGE)
    start = PAGE - 64 * back
    result = native.scan_frames(guarded, start, PAGE, 100)  # a stray read would crash here
    same(result, twin.scan_frames(bytes(buf), start, PAGE, 100))
    assert native.crc32c(guarded) == twin.crc32c(bytes(buf))
