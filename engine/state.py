"""Keyed state of one store on one shard, and its checkpoint files.

Design note. Live state is struct-of-arrays indexed by key id: scalar columns (1-D), rings
(2-D ``(capacity, n)`` plus a ``head`` count per key) and multimaps (native). It grows by
doubling as keys appear. A checkpoint writes every array to files of a new *generation*
directory (``gen-<n>/``), fsyncs them, and only then does the store's manifest point at it
(temp file + fsync + rename) — so a checkpoint's offsets match exactly the effects in its files,
and a crash at any moment leaves the previous checkpoint intact. Restart maps the generation's
files copy-on-write (``np.memmap(mode="c")``): reopening a 10M-key store reads nothing up
front, and folding the log tail never modifies the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ._impl import load
from .fsutil import write_atomic
from .reducers import MultiMapColumn, Ring, TopK

_mm = load("multimap")


class ShardState:
    """The arrays of one store on one shard."""

    def __init__(self, columns: dict[str, Any], capacity: int = 1024):
        self.spec = columns  # name -> np.dtype | Ring | MultiMapColumn (see reducers)
        self.capacity = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.multimaps: dict[str, Any] = {}
        self.offset = 0  # shard offset folded up to (exclusive)
        for name, kind in columns.items():
            if _is_multimap(kind):
                self.multimaps[name] = _mm.MultiMap()
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        old = self.arrays
        self.arrays = {}
        for name, kind in self.spec.items():
            if _is_multimap(kind) or _is_view(kind):
                continue
            if _is_ring(kind):
                shapes = {name: ((capacity, kind.n), kind.dtype), name + ".head": ((capacity,), np.int64)}
            elif not _is_rows(kind) and not _is_topk(kind):
                shapes = {name: ((capacity,), np.dtype(kind))}
            elif _is_topk(kind):
                shapes = {name: ((capacity, kind.k), kind.dtype), name + ".fill": ((capacity,), np.int64)}
            elif _is_rows(kind):
                shapes = {name: ((capacity, len(kind.columns)), kind.dtype)}
            for arr_name, (shape, dtype) in shapes.items():
                new = np.zeros(shape, dtype)
                if arr_name in old:
                    new[: self.capacity] = old[arr_name][: self.capacity]
                self.arrays[arr_name] = new
        self.capacity = capacity
        self._bind_views()

    def _bind_views(self) -> None:
        """Columns stored together in a row group are strided views of the group's array."""
        for name, kind in self.spec.items():
            if _is_view(kind):
                self.arrays[name] = self.arrays[kind.group][:, kind.index]

    def ensure(self, keys: int) -> None:
        """Make room for key ids < ``keys`` (amortized doubling)."""
        if keys > self.capacity:
            cap = self.capacity or 1024
            while cap < keys:
                cap *= 2
            self._alloc(cap)

    # -- checkpoint files ------------------------------------------------------------------
    def write(self, directory: str) -> dict[str, Any]:
        """Write every array to ``directory`` (fsync'd); returns the metadata to manifest."""
        os.makedirs(directory, exist_ok=True)
        meta: dict[str, Any] = {"capacity": self.capacity, "offset": self.offset, "arrays": {},
                                "multimaps": {}}
        for name, arr in self.arrays.items():
            if _is_view(self.spec.get(name)):
                continue  # written with its row group
            _write_file(os.path.join(directory, name + ".bin"), arr)
            meta["arrays"][name] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        for name, mm in self.multimaps.items():
            keys, vals = mm.pairs()
            _write_file(os.path.join(directory, name + ".keys.bin"), np.ascontiguousarray(keys, np.int64))
            _write_file(os.path.join(directory, name + ".vals.bin"), np.ascontiguousarray(vals, np.int64))
            meta["multimaps"][name] = {"pairs": int(len(keys))}
        return meta

    @classmethod
    def read(cls, columns: dict[str, Any], directory: str, meta: dict[str, Any]) -> "ShardState":
        """Map a checkpoint's files copy-on-write (nothing is read until touched)."""
        st = cls.__new__(cls)
        st.spec = columns
        st.capacity = int(meta["capacity"])
        st.offset = int(meta["offset"])
        st.arrays = {}
        st.multimaps = {}
        for name, am in meta["arrays"].items():
            shape = tuple(am["shape"])
            path = os.path.join(directory, name + ".bin")
            if int(np.prod(shape)) == 0:
                st.arrays[name] = np.zeros(shape, np.dtype(am["dtype"]))
            else:
                st.arrays[name] = np.memmap(path, np.dtype(am["dtype"]), mode="c", shape=shape)
        st._bind_views()
        for name, mmeta in meta["multimaps"].items():
            n = int(mmeta["pairs"])
            keys = np.fromfile(os.path.join(directory, name + ".keys.bin"), np.int64, n)
            vals = np.fromfile(os.path.join(directory, name + ".vals.bin"), np.int64, n)
            st.multimaps[name] = _mm.MultiMap.from_pairs(keys, vals)
        for name, kind in columns.items():  # columns declared since (same version) start empty
            if _is_multimap(kind) and name not in st.multimaps:
                st.multimaps[name] = _mm.MultiMap()
        return st


class RowGroup:
    """Scalar columns updated together, stored together: one (capacity, n) array."""

    def __init__(self, columns: tuple[str, ...], dtype: Any):
        self.columns = columns
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"RowGroup({self.columns}, {self.dtype})"


class ColumnView:
    """A scalar column living in a row group (column ``index`` of ``group``)."""

    def __init__(self, group: str, index: int, dtype: Any):
        self.group = group
        self.index = index
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"ColumnView({self.group}, {self.index})"


def _is_topk(kind: Any) -> bool:
    return isinstance(kind, TopK)


def _is_rows(kind: Any) -> bool:
    return isinstance(kind, RowGroup)


def _is_view(kind: Any) -> bool:
    return isinstance(kind, ColumnView)


def _is_ring(kind: Any) -> bool:
    return isinstance(kind, Ring)


def _is_multimap(kind: Any) -> bool:
    return isinstance(kind, MultiMapColumn)


def _write_file(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))
