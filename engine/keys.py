"""Key interning: raw keys of a key domain ("user", "photo") → dense int64 ids, persisted.

Design note. Each domain has an append-only dictionary file ``keys/<domain>.keys`` made of
records: a 32-byte header (magic "ENGK", version, kind, count, first id, payload bytes, CRC32C
over header and payload) and a payload (int64 keys, or int32 offsets + UTF-8 bytes for string
keys, padded to 8). New keys are written before any frame that references their ids, so a frame
present after a crash implies its keys are present. A torn record at the end of the file is
cut off on open; a damaged record followed by more data raises ``CorruptLogError``. Ids are
dense, never reused, and the raw key is always recoverable with ``key_of``.

A cut is only safe if no frame uses the ids of the cut record (true after a crash: a frame is
written after its keys). The dictionary says what it cut (``cut_from_id``: the first id lost)
and does not truncate the file at once: the shard logs check their frames on open
(``ShardLog._check_key_ids``) and, if a frame uses a lost id, the open is refused
(``refuse_cut``) and the file is left as it was. Otherwise the torn bytes are truncated before
the next record is written, or on close.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Sequence

import numpy as np

from ._impl import load
from .errors import CorruptLogError, DiskFullError, LogError

_codec = load("codec")
_keys = load("keys")

KEYS_MAGIC = 0x4B474E45  # b"ENGK"
_REC = struct.Struct("<IHHIQII")  # magic, version, kind, count, first_id, payload_len, crc
KIND_INT, KIND_STR = 1, 2


class StrInterner:
    """str → dense id. Python's dict is the fastest hash table for str keys from Python."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def get(self, key: str, default: int = -1) -> int:
        return self._ids.get(key, default)

    def intern_one(self, key: str) -> int:
        i = self._ids.get(key)
        if i is None:
            i = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return i

    def intern_list(self, keys: Sequence[str]) -> np.ndarray:
        get, add = self._ids.get, self.intern_one
        return np.fromiter((get(k) if k in self._ids else add(k) for k in keys), np.int64, len(keys))

    def extend(self, keys: Sequence[str]) -> None:
        for k in keys:
            if k in self._ids:
                raise ValueError(f"duplicate key {k!r} in dictionary")
            self._ids[k] = len(self._keys)
            self._keys.append(k)

    def lookup_list(self, keys: Sequence[str]) -> np.ndarray:
        get = self._ids.get
        return np.fromiter((get(k, -1) for k in keys), np.int64, len(keys))

    def key_of(self, ids: np.ndarray) -> list[str]:
        ks = self._keys
        return [ks[i] for i in np.asarray(ids).tolist()]


def var_to_strs(offsets: np.ndarray, data: np.ndarray) -> list[str]:
    """Decode an Arrow-layout string column to Python strings (vectorized through Arrow)."""
    import pyarrow as pa

    n = len(offsets) - 1
    base = int(offsets[0]) if n >= 0 else 0
    offs = offsets if base == 0 else (offsets - base).astype(np.int32)
    arr = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.ascontiguousarray(offs)),
                                                 pa.py_buffer(np.ascontiguousarray(data[base:]))])
    return arr.to_pylist()


class KeyDictionary:
    """The persisted dictionary of one key domain."""

    def __init__(self, directory: str, domain: str, kind: str, writable: bool, report: list[str]):
        self.domain = domain
        self.kind = kind  # "int" | "str"
        self.path = os.path.join(directory, f"{domain}.keys")
        self.writable = writable
        self.interner: Any = _keys.Int64Interner() if kind == "int" else StrInterner()
        self._fd = -1
        self._dirty = False
        self.cut_from_id: int | None = None  # a damaged last record was cut: the first id lost
        self._cut_pending = False  # its bytes are still in the file (truncated when safe)
        self._cut_refused = False  # frames use the lost ids: leave the file for a restore
        if writable:
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._size = self._load(report)

    def __len__(self) -> int:
        return len(self.interner)

    # -- persistence -----------------------------------------------------------------------
    def _load(self, report: list[str]) -> int:
        """Read every record; cut a torn tail record (writable); returns the valid length."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            raw = f.read()
        if self.kind == "int" and len(self.interner) == 0:
            # size the table once for every key the file can hold: no rehashing while loading
            # (measured 61 ns/key against 127 ns/key growing from the default, 10M keys)
            self.interner = _keys.Int64Interner(max(1024, len(raw) // 8))
        pos, n = 0, 0
        want_kind = KIND_INT if self.kind == "int" else KIND_STR
        while pos < len(raw):
            why = None
            if len(raw) - pos < _REC.size:
                why = "truncated record header"
            else:
                magic, ver, kind, count, first, plen, crc = _REC.unpack_from(raw, pos)
                end = pos + _REC.size + plen
                if magic != KEYS_MAGIC or ver != 1 or kind != want_kind:
                    why = "bad record header"
                elif end > len(raw):
                    why = "truncated record"
                elif crc != _codec.crc32c(memoryview(raw)[pos + _REC.size : end],
                                          _codec.crc32c(memoryview(raw)[pos : pos + _REC.size - 4])):
                    why = "bad CRC"
                elif first != n:
                    why = f"record starts at id {first}, expected {n}"
            if why is not None:
                if self._more_records_after(raw, pos):
                    raise CorruptLogError(
                        f"key dictionary of domain {self.domain!r} is corrupt ({why}); restore it "
                        "from a backup: ids in the log refer to it", path=self.path, byte_offset=pos)
                report.append(f"{self.path}: torn record ({why}) at byte {pos} cut off")
                self.cut_from_id = n
                self._cut_pending = self.writable  # truncated before the next record / on close
                return pos
            payload = memoryview(raw)[pos + _REC.size : end]
            try:
                self._extend_from_payload(payload, count)
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise CorruptLogError(f"key dictionary record is invalid: {exc}", path=self.path,
                                      byte_offset=pos) from exc
            n += count
            pos = end
        return pos

    @staticmethod
    def _more_records_after(raw: bytes, pos: int) -> bool:
        magic = struct.pack("<I", KEYS_MAGIC)
        nxt = raw.find(magic, pos + 1)
        while nxt != -1:
            if len(raw) - nxt >= _REC.size:
                m, ver, kind, count, first, plen, crc = _REC.unpack_from(raw, nxt)
                end = nxt + _REC.size + plen
                if end <= len(raw) and crc == _codec.crc32c(raw[nxt : nxt + _REC.size - 4] + raw[nxt + _REC.size : end]):
                    return True
            nxt = raw.find(magic, nxt + 1)
        return False

    def _extend_from_payload(self, payload: memoryview, count: int) -> None:
        if self.kind == "int":
            if len(payload) != 8 * count:
                raise ValueError("payload size does not match the key count")
            self.interner.extend(np.frombuffer(payload, "<i8"))
            return
        offs = np.frombuffer(payload, "<i4", count + 1)
        data_lo = 4 * (count + 1)
        if offs[0] != 0 or np.any(np.diff(offs) < 0) or data_lo + int(offs[-1]) > len(payload):
            raise ValueError("string offsets are out of bounds")
        raw = bytes(payload[data_lo : data_lo + int(offs[-1])])
        o = offs.tolist()
        self.interner.extend([raw[o[i] : o[i + 1]].decode("utf-8") for i in range(count)])

    def refuse_cut(self) -> None:
        """Frames use ids of the cut record: never truncate it (the open is being refused)."""
        self._cut_refused = True
        self._cut_pending = False

    def _truncate_cut(self) -> None:
        if self._cut_pending and self._fd >= 0:
            os.ftruncate(self._fd, self._size)
            self._cut_pending = False
            self._dirty = True

    def _write_record(self, first: int, payload: bytes) -> None:
        count = len(self.interner) - first
        kind = KIND_INT if self.kind == "int" else KIND_STR
        head = _REC.pack(KEYS_MAGIC, 1, kind, count, first, len(payload), 0)[:-4]
        rec = head + struct.pack("<I", _codec.crc32c(head + payload)) + payload
        if self._cut_refused:  # pragma: no cover - a refused open hands out no dictionary
            self._rollback(first)
            raise CorruptLogError("the key dictionary lost records that the log uses; restore it "
                                  "from a backup", path=self.path)
        try:
            self._truncate_cut()
            written = os.pwrite(self._fd, rec, self._size)
        except OSError as exc:
            os.ftruncate(self._fd, self._size)
            self._rollback(first)
            if exc.errno in (28, 122):
                raise DiskFullError("no space left to record new keys; nothing was appended. Free "
                                    "space and retry", path=self.path) from exc
            raise
        if written != len(rec):  # a nearly full disk (tmpfs, ext4) writes only part of it
            os.ftruncate(self._fd, self._size)
            self._rollback(first)
            raise DiskFullError(f"short write of a key record ({written} of {len(rec)} bytes): "
                                "the disk is probably full; nothing was appended. Free space and "
                                "retry", path=self.path)
        self._size += len(rec)
        self._dirty = True

    def _rollback(self, first: int) -> None:
        """Forget ids >= first (their record could not be written)."""
        keys = self.interner.keys() if self.kind == "int" else list(self.interner._keys)
        fresh = _keys.Int64Interner() if self.kind == "int" else StrInterner()
        fresh.extend(keys[:first])
        self.interner = fresh

    # -- interning -------------------------------------------------------------------------
    def intern(self, raw: Any) -> np.ndarray:
        """Ids for raw keys (int64 array, list of str, or (offsets, data)); records new keys."""
        first = len(self.interner)
        if self.kind == "int":
            ids = self.interner.intern(np.ascontiguousarray(raw, dtype=np.int64))
            if len(self.interner) > first:
                self._write_record(first, self.interner.key_of(np.arange(first, len(self.interner))).astype("<i8").tobytes())
            return ids
        keys = raw if isinstance(raw, list) else var_to_strs(*raw)
        ids = self.interner.intern_list(keys)
        if len(self.interner) > first:
            self._write_record(first, _str_payload(self.interner._keys[first:]))
        return ids

    def intern_one(self, key: Any) -> int:
        first = len(self.interner)
        i = self.interner.intern_one(key)
        if i == first:
            self._write_record(first, np.array([key], "<i8").tobytes() if self.kind == "int"
                               else _str_payload([key]))
        return i

    def lookup(self, raw: Any) -> np.ndarray:
        if self.kind == "int":
            return self.interner.lookup(np.ascontiguousarray(raw, dtype=np.int64))
        return self.interner.lookup_list(list(raw))

    def key_of(self, ids: np.ndarray) -> Any:
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.interner)):
            raise CorruptLogError(f"key id out of range for domain {self.domain!r} "
                                  f"({len(self.interner)} keys known)", path=self.path)
        return self.interner.key_of(ids)

    def sync(self) -> None:
        if self._dirty and self._fd >= 0:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise LogError(f"fdatasync of the key dictionary of domain {self.domain!r} failed; "
                               "actions using its new keys are not durable", path=self.path) from exc
            self._dirty = False

    def refresh(self, report: list[str] | None = None) -> None:
        """Read-only follower: load records appended by the writer since."""
        if self.writable or not os.path.exists(self.path):
            return
        if os.path.getsize(self.path) > self._size:
            fresh = KeyDictionary.__new__(KeyDictionary)
            fresh.__dict__.update(self.__dict__)
            fresh.interner = _keys.Int64Interner() if self.kind == "int" else StrInterner()
            self._size = fresh._load(report if report is not None else [])
            self.interner = fresh.interner

    def close(self) -> None:
        if self._fd >= 0:
            if not self._cut_refused:
                self._truncate_cut()
            self.sync()
            os.close(self._fd)
            self._fd = -1


def _str_payload(keys: Sequence[str]) -> bytes:
    enc = [k.encode("utf-8") for k in keys]
    offs = np.zeros(len(enc) + 1, "<i4")
    np.cumsum([len(e) for e in enc], out=offs[1:])
    body = offs.tobytes() + b"".join(enc)
    return body + b"\0" * (-len(body) % 8)
