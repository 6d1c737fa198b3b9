"""Test your own stores the way the engine tests itself.

Design note. Whatever is not deterministic is injected and seeded (STYLE.md habits 10 and 12):

* :class:`FakeClock` puts the engine's clocks (:mod:`engine.clock`: frame timestamps, retention
  by age, ``App(checkpoint_every_s=...)``) under the test's control: time moves only when told.
* :class:`Faults` does real faults to real files and processes, chosen by a seed: a torn last
  write, a bit flip, a failing fsync, and a ``kill -9`` of a child process parked at an exact
  function call. Every :class:`Damage` names its seed, so a failing test can be replayed.
* :func:`assert_incremental_equals_replay` folds the same actions batch by batch (with
  checkpoints, restarts and crashed folders interleaved by a seed) and by one replay from offset
  0, and requires every store to end in the same state, column by column and key by key.

The engine never imports this module. Everything here acts on the whole process (the clock,
``os.fsync``): do not run such tests in parallel threads of one process.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import math
import mmap
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import clock
from ._impl import load
from .app import App, replay
from .frame import read_header
from .limits import Limits
from .log import Log
from .reducers import MultiMapColumn, Ring, TopK
from .schema import ActionType, Schema
from .segment import SEG_HEADER_BYTES
from .store import Store, StoreState

__all__ = [
    "FakeClock", "Faults", "Damage", "FsyncFault", "Crash", "CrashPointError",
    "assert_incremental_equals_replay", "ReplayCheck",
]

_codec = load("codec")


# -- the clock --------------------------------------------------------------------------------

class FakeClock:
    """A clock that moves only when told: ``with FakeClock() as clk: ... clk.advance(61)``.

    Entering installs it for the whole process (every thread) through :mod:`engine.clock`;
    leaving puts back the clocks that were there before (it nests). ``now_ns`` is the wall
    clock in ns since the epoch (frame timestamps, retention by age). The monotonic clock
    (periodic checkpoints) starts at the same value, moves with :meth:`advance` and forward
    :meth:`set` calls, and never goes back. Create an ``App`` inside the clock: it reads the
    monotonic clock when it is made.
    """

    DEFAULT_START_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z: a fixed, replayable date

    def __init__(self, start_ns: int = DEFAULT_START_NS):
        if isinstance(start_ns, bool) or not isinstance(start_ns, int) or start_ns < 0:
            raise ValueError(f"start_ns is an int of ns since the epoch (>= 0), not {start_ns!r}")
        self._now_ns = start_ns  # ns since the epoch; may be set back
        self._mono_ns = start_ns  # ns; only grows
        self._lock = threading.Lock()
        self._saved: list[tuple[clock.TimeNs, clock.Monotonic]] = []

    @property
    def now_ns(self) -> int:
        """The wall clock, ns since the epoch."""
        return self._now_ns

    def time_ns(self) -> int:
        """The wall clock (what ``engine.clock.time_ns`` returns while installed)."""
        return self._now_ns

    def monotonic(self) -> float:
        """The monotonic clock in seconds (``engine.clock.monotonic`` while installed)."""
        return self._mono_ns / 1e9

    def advance(self, seconds: float) -> int:
        """Move both clocks forward by ``seconds`` (>= 0); returns the new ``now_ns``."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds >= 0:
            raise ValueError(f"advance() takes seconds >= 0, not {seconds!r}; use set() to move "
                             "the wall clock back")
        ns = seconds * 1_000_000_000 if isinstance(seconds, int) else round(seconds * 1e9)
        with self._lock:
            self._now_ns += ns
            self._mono_ns += ns
            return self._now_ns

    def set(self, ns: int) -> None:
        """Set the wall clock to ``ns`` since the epoch. It may go back (as after an NTP step);
        the monotonic clock moves forward by the same step, or stays if the step is back."""
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
            raise ValueError(f"set() takes an int of ns since the epoch (>= 0), not {ns!r}")
        with self._lock:
            self._mono_ns += max(0, ns - self._now_ns)
            self._now_ns = ns

    def __enter__(self) -> "FakeClock":
        self._saved.append(clock.install(self.time_ns, self.monotonic))
        return self

    def __exit__(self, *exc: Any) -> None:
        clock.install(*self._saved.pop())

    def __repr__(self) -> str:
        return f"FakeClock(now_ns={self._now_ns})"


# -- file faults ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Damage:
    """One fault done to a file: what, where, and the seed that chose it."""

    kind: str  # "torn_write" or "bit_flip"
    path: str
    byte_offset: int  # first byte changed
    end: int  # one past the last byte changed (byte_offset + 1 for a bit flip)
    seed: int
    bit: int | None = None  # bit_flip: the bit of the byte (0 = least significant)
    shard: int | None = None  # segment files: the shard
    frame_pos: int | None = None  # segment files: byte position of the frame hit
    frame_offset: int | None = None  # segment files: first action offset of the frame hit

    def __str__(self) -> str:
        what = (f"bit {self.bit} of byte {self.byte_offset}" if self.kind == "bit_flip"
                else f"bytes [{self.byte_offset}, {self.end}) zeroed")
        frame = ("" if self.frame_pos is None else
                 f", in the frame at byte {self.frame_pos} (shard {self.shard}, offset "
                 f"{self.frame_offset})")
        return f"{self.kind} of {self.path}: {what}{frame} (Faults(seed={self.seed}))"


@dataclass(frozen=True)
class _Frame:
    pos: int  # bytes from the start of the segment file
    length: int  # bytes
    first: int  # shard offset of its first action

    @property
    def end(self) -> int:
        return self.pos + self.length


def _segment_frames(path: str) -> tuple[int | None, list[_Frame]]:
    """(shard, valid frames in order) of a segment file, read-only, from a scan."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < SEG_HEADER_BYTES:
            return None, []
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        shard = struct.unpack_from("<I", mm, 8)[0]
        base = int(os.path.basename(path).split(".")[0])
        pos, firsts, _counts, _stop, _status = _codec.scan_frames(mm, SEG_HEADER_BYTES, size, base, True)
        frames = [_Frame(p, read_header(mm, p).length, f) for p, f in zip(pos.tolist(), firsts.tolist())]
    finally:
        mm.close()
    return shard, frames


def _last_segment(target: str | os.PathLike[str], shard: int) -> str:
    """The segment file a torn write hits: ``target`` itself, or the last one of a shard."""
    path = os.fspath(target)
    if os.path.isfile(path):
        if not path.endswith(".seg"):
            raise ValueError(f"{path} is not a segment file (.seg); pass a data directory, a "
                             "shard directory or a .seg file")
        return path
    directory = path
    if os.path.exists(os.path.join(path, "engine.json")):
        directory = os.path.join(path, "shards", f"{shard:04d}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no shard directory {directory}: pass a data directory (with a "
                                "valid shard=), a shard directory or a .seg file")
    names = sorted(n for n in os.listdir(directory) if n.endswith(".seg"))
    if not names:
        raise FileNotFoundError(f"{directory} holds no segment file")
    return os.path.join(directory, names[-1])


def _frame_at(frames: Sequence[_Frame], p: int) -> _Frame | None:
    return next((fr for fr in frames if fr.pos <= p < fr.end), None)


@dataclass
class FsyncFault:
    """What :meth:`Faults.failing_fsync` did so far (counts over every thread)."""

    after: int  # calls let through before the first failure
    errno: int
    times: int | None  # failures before fsync works again (None: never again)
    calls: int = 0  # os.fsync / os.fdatasync calls seen
    failed: list[tuple[str, str]] = field(default_factory=list)  # (function, file) per failure


@dataclass(frozen=True)
class Crash:
    """A child killed with SIGKILL while parked at a crash point (see :meth:`Faults.crash_point`)."""

    point: str
    hit: int  # the call of ``point`` it was parked at (1 = the first)
    returncode: int  # -signal.SIGKILL
    stdout: str  # everything the child wrote to stdout before it died
    stderr: str

    @property
    def lines(self) -> list[str]:
        """Complete stdout lines, without their newline (a line cut by the kill is dropped)."""
        parts = self.stdout.split("\n")
        return parts[:-1]


class CrashPointError(RuntimeError):
    """The child never parked at the crash point: it exited, or timed out (stderr attached)."""


# The child: resolve the crash point, replace it with a parking wrapper, run the user's script.
_CHILD = r"""
import importlib, os, runpy, sys, time
_ctl, _point, _hit, _kind, _script = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.argv = [_script if _kind == "path" else "-c"] + sys.argv[6:]

def _resolve(point):
    parts = point.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:-1]:
            owner = getattr(owner, name)
        if not hasattr(owner, parts[-1]):
            raise AttributeError(f"crash point {point!r}: {owner!r} has no {parts[-1]!r}")
        return owner, parts[-1]
    raise ImportError(f"crash point {point!r}: write it as module.function or module.Class.method")

_owner, _name = _resolve(_point)
_real = getattr(_owner, _name)
_calls = [0]

def _park(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == _hit:
        os.write(_ctl, b"parked\n")
        while True:  # the parent sends SIGKILL
            time.sleep(3600)
    return _real(*args, **kwargs)

_raw = vars(_owner).get(_name) if isinstance(_owner, type) else None
setattr(_owner, _name, staticmethod(_park) if isinstance(_raw, (staticmethod, classmethod)) else _park)
if _kind == "path":
    runpy.run_path(_script, run_name="__main__")
else:
    exec(compile(_script, "<crash_point script>", "exec"), {"__name__": "__main__"})
"""


class Faults:
    """Seeded faults on real files and processes: ``faults = Faults(seed)``.

    The same seed and the same calls do the same damage (every :class:`Damage` names its seed).
    File faults act on a closed (or crashed) data directory; the engine's reaction is seen on
    the next open or read.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.done: list[Damage] = []  # every file fault so far, in order

    def __repr__(self) -> str:
        return f"Faults(seed={self.seed!r}, done={len(self.done)})"

    def _record(self, d: Damage) -> Damage:
        self.done.append(d)
        return d

    # -- torn write ------------------------------------------------------------------------
    def torn_write(self, target: str | os.PathLike[str], *, shard: int = 0,
                   keep_bytes: int | None = None) -> Damage:
        """Tear the last frame of a shard's open segment: as if the machine lost power while
        writing it, its bytes from ``keep_bytes`` on are zeroed in the file.

        ``target`` is a data directory (then ``shard`` picks the shard), a shard directory or
        a ``.seg`` file. ``keep_bytes`` (seeded if None) is how much of the frame reached the
        disk; it is at least 8 when seeded, so the frame's header is partly there. Documented
        reaction: the next open cuts the frame, says so in ``log.report`` ("torn tail ... at
        byte ...; shard ... ends at offset ...") and the shard ends at ``Damage.frame_offset``.
        """
        path = _last_segment(target, shard)
        shard_no, frames = _segment_frames(path)
        if not frames:
            raise ValueError(f"{path} holds no frame to tear (the segment is empty: append "
                             "something after the last roll first)")
        fr = frames[-1]
        with open(path, "rb") as f:
            f.seek(fr.pos)
            body = np.frombuffer(f.read(fr.length), np.uint8)
        last_nonzero = int(np.flatnonzero(body)[-1])  # the frame's trailing padding is zero
        if keep_bytes is None:
            keep_bytes = self.rng.randrange(8, last_nonzero + 1)
        elif not 0 <= keep_bytes <= last_nonzero:
            raise ValueError(f"keep_bytes must be in [0, {last_nonzero}] for the frame at byte "
                             f"{fr.pos} of {path}: from byte {last_nonzero + 1} of it on it is "
                             "zero padding, so a cut there would change nothing")
        lo, hi = fr.pos + keep_bytes, fr.end
        with open(path, "r+b") as f:  # no fsync: a failing_fsync() in force must not see this
            f.seek(lo)
            f.write(bytes(hi - lo))
        return self._record(Damage("torn_write", path, lo, hi, self.seed, shard=shard_no,
                                   frame_pos=fr.pos, frame_offset=fr.first))

    # -- bit flip --------------------------------------------------------------------------
    def bit_flip(self, path: str | os.PathLike[str], *, frame: int | None = None,
                 lo: int | None = None, hi: int | None = None) -> Damage:
        """Flip one seeded bit among the written bytes of a segment, index or key file.

        Segment files (``.seg``): by default a byte the frame's CRC covers, in a seeded frame
        (``frame=i`` picks the i-th frame of the file; negative counts from the end); with
        ``lo``/``hi`` any byte in ``[lo, hi)`` of the header and frames (never the zeroed,
        preallocated space after them). Other files (``.idx``, ``.keys``, ...): any byte in
        ``[lo, hi)`` (default: the whole file). Documented reactions: a frame with valid frames
        after it raises ``CorruptLogError`` naming the file and ``Damage.frame_pos`` as its
        byte (on open for the open segment, on read for a sealed one); the open segment's last
        frame is cut as a torn tail; a damaged ``.idx`` is rebuilt and reported.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no file {path}")
        size = os.path.getsize(path)
        shard, frames = None, []
        if path.endswith(".seg"):
            shard, frames = _segment_frames(path)
            written = frames[-1].end if frames else min(size, SEG_HEADER_BYTES)
            if lo is None and hi is None:
                if not frames:
                    raise ValueError(f"{path} holds no frame; pass lo/hi to flip a header bit")
                if frame is None:
                    fr = frames[self.rng.randrange(len(frames))]
                elif -len(frames) <= frame < len(frames):
                    fr = frames[frame]
                else:
                    raise ValueError(f"frame={frame}, but {path} holds {len(frames)} frames")
                start, stop = fr.pos + 16, fr.end  # bytes [16, length) are under the CRC
            else:
                if frame is not None:
                    raise ValueError("pass frame= or lo/hi, not both")
                start, stop = lo or 0, min(written if hi is None else hi, written)
        else:
            if frame is not None:
                raise ValueError("frame= is for segment (.seg) files")
            start, stop = lo or 0, min(size if hi is None else hi, size)
        if not 0 <= start < stop:
            raise ValueError(f"no written byte of {path} in [{start}, {stop}) ({size} bytes)")
        p = self.rng.randrange(start, stop)
        bit = self.rng.randrange(8)
        with open(path, "r+b") as f:
            f.seek(p)
            b = f.read(1)[0]
            f.seek(p)
            f.write(bytes([b ^ (1 << bit)]))
        hit = _frame_at(frames, p)
        return self._record(Damage("bit_flip", path, p, p + 1, self.seed, bit=bit, shard=shard,
                                   frame_pos=None if hit is None else hit.pos,
                                   frame_offset=None if hit is None else hit.first))

    # -- failing fsync ---------------------------------------------------------------------
    @contextlib.contextmanager
    def failing_fsync(self, after: int | None = None, errno: int = _errno.EIO, *,
                      times: int | None = None) -> Iterator[FsyncFault]:
        """Make ``os.fsync`` and ``os.fdatasync`` raise ``OSError(errno)`` after ``after`` calls.

        Both are counted together: the engine fdatasyncs segments (``Segment.sync``, new
        segments) and key dictionaries (``KeyDictionary.sync``) and fsyncs index files,
        checkpoints, metadata and directories. ``after`` (seeded in [0, 8) if None) calls go
        through, then every call fails (``times=None``: a disk that stays broken) or the next
        ``times`` calls do. Process-wide while the block runs. Documented reaction: the call
        that needed the sync raises (``LogError`` chaining the ``OSError`` for a segment) and is
        not acknowledged; every action acknowledged before is still there after a reopen.
        """
        if after is None:
            after = self.rng.randrange(8)
        if after < 0 or (times is not None and times < 1):
            raise ValueError("after >= 0 and times >= 1 (or None for every later call)")
        state = FsyncFault(after, errno, times)
        lock = threading.Lock()
        real = {name: getattr(os, name) for name in ("fsync", "fdatasync")}

        def wrap(name: str) -> Callable[[Any], None]:
            def failing(fd: Any) -> None:
                with lock:
                    state.calls += 1
                    fail = state.calls > after and (times is None or len(state.failed) < times)
                    if fail:
                        state.failed.append((name, _fd_path(fd)))
                if fail:
                    raise OSError(errno, f"{os.strerror(errno)} (injected by Faults.failing_fsync, "
                                  f"call {state.calls})")
                real[name](fd)
            return failing

        for name in real:
            setattr(os, name, wrap(name))
        try:
            yield state
        finally:
            for name, fn in real.items():
                setattr(os, name, fn)

    # -- crash points ----------------------------------------------------------------------
    def crash_point(self, script: str | os.PathLike[str], point: str, *, args: Sequence[str] = (),
                    hit: int = 1, timeout_s: float = 60.0, env: Mapping[str, str] | None = None,
                    cwd: str | None = None) -> Crash:
        """Run ``script`` in a child Python, park it in call number ``hit`` of ``point`` and
        kill it there with SIGKILL; returns what it wrote before it died.

        ``script`` is a path to a Python file, or Python source (any text with a newline);
        ``args`` become its ``sys.argv[1:]``. ``point`` is ``"module.function"`` or
        ``"module.Class.method"`` (``"os.fdatasync"``, ``"engine.segment.Segment.seal"``):
        patched where it is looked up, as with ``unittest.mock`` — a name imported with
        ``from x import f`` elsewhere is another reference. The child runs with
        ``PYTHONUNBUFFERED=1``; make it print one line per acknowledgement, with one
        ``sys.stdout.write("ack ...\\n")``, after the call returned: the lines it printed are
        what it acknowledged. Raises :class:`CrashPointError` (with the child's stderr) if the
        child exits or ``timeout_s`` passes before it parks.
        """
        if hit < 1:
            raise ValueError("hit counts calls from 1")
        text = os.fspath(script)
        kind = "code" if "\n" in text else "path"
        if kind == "path" and not os.path.isfile(text):
            raise FileNotFoundError(f"no script {text} (Python source must contain a newline)")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # engine importable
        base = dict(os.environ if env is None else env)
        child_env = {**base, "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)}
        ctl_r, ctl_w = os.pipe()
        try:
            p = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(ctl_w), point, str(hit), kind, text, *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(ctl_w,), env=child_env, cwd=cwd)
        except BaseException:
            os.close(ctl_r)
            raise
        finally:
            os.close(ctl_w)
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [threading.Thread(target=_drain, args=(p.stdout, out), daemon=True),
                   threading.Thread(target=_drain, args=(p.stderr, err), daemon=True)]
        for t in readers:
            t.start()
        ready: list[int] = []
        parked = False
        try:
            ready, _, _ = select.select([ctl_r], [], [], timeout_s)
            parked = bool(ready) and os.read(ctl_r, 64).startswith(b"parked")
            if parked:
                os.kill(p.pid, signal.SIGKILL)
        finally:
            os.close(ctl_r)
            if p.poll() is None and not parked:
                p.kill()
            code = p.wait()
            for t in readers:
                t.join()
        stdout, stderr = b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
        if not parked:
            why = (f"did not reach it within {timeout_s} s" if not ready
                   else f"exited with code {code} first")
            raise CrashPointError(f"the child never parked at call {hit} of {point!r}: it {why}. "
                                  f"Its stderr ends with:\n{stderr[-3000:]}")
        assert code == -signal.SIGKILL, f"the parked child ended with {code}, not SIGKILL"
        return Crash(point, hit, code, stdout, stderr)


def _drain(stream: Any, into: list[bytes]) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        into.append(chunk)
    stream.close()


def _fd_path(fd: Any) -> str:
    """The file behind a descriptor (for messages; Linux /proc), or the descriptor."""
    n = fd if isinstance(fd, int) else fd.fileno()
    try:
        return os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        return f"fd {n}"


# -- incremental == full ----------------------------------------------------------------------

@dataclass
class ReplayCheck:
    """What :func:`assert_incremental_equals_replay` did (all of it passed)."""

    seed: int
    actions: int = 0
    folds: int = 0  # incremental folds (one after every appended piece)
    checkpoints: int = 0  # explicit checkpoints between folds
    restarts: int = 0  # clean restarts: checkpoint, close, reopen, recover
    crashes: int = 0  # folder "crashes": reopen from the last checkpoint, work since is lost
    stores: list[str] = field(default_factory=list)
    values: int = 0  # (store, column, key) values compared, per comparison


Batches = Iterable[tuple[str, Any]]
StoreStateMap = dict[str, dict[str, dict[Any, Any]]]  # store -> column -> raw key -> value


def assert_incremental_equals_replay(
    make_stores: Callable[[], Iterable[Store]],
    types: Iterable[ActionType] | Schema,
    batches: Batches,
    *,
    shards: int = 1,
    seed: int = 0,
    checkpoint_every: int | None = None,
    path: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
) -> ReplayCheck:
    """Assert that folding ``batches`` incrementally gives exactly what one full replay gives.

    ``make_stores()`` returns fresh, equal store definitions (it is called for every restart);
    ``batches`` are ``(action type, columns)`` as for ``Log.append``. Two logs of ``shards``
    shards are written under ``path`` (a temporary directory if None, removed afterwards):

    * incremental: every batch is appended in 1 to 3 seeded pieces, with a fold after each;
      between folds, per ``seed``, the App checkpoints, restarts cleanly (checkpoint, close,
      reopen, recover) or "crashes" (reopens from its last checkpoint: the work since is
      refolded). ``checkpoint_every`` also checkpoints every that many actions inside folds;
    * full: every batch appended whole, then one replay from offset 0 into fresh stores.

    Every store's state is compared: each column of ``store.to_arrow()`` and each ring,
    multimap and top-k column through ``store.get``, key by key (raw keys; values holding key
    ids are compared as raw keys), first live, then after a restart from the checkpoint.
    Raises AssertionError naming the first differing store, column and key and the seed; a
    FAILED store is an AssertionError too. Returns a :class:`ReplayCheck` with the counts.
    """
    batches = list(batches)
    for i, b in enumerate(batches):
        if not (isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str)):
            raise TypeError(f"batch {i} must be (action type name, columns), not {type(b).__name__}")
    limits = Limits(segment_bytes=1 << 20) if limits is None else limits  # rolls happen
    root = tempfile.mkdtemp(prefix="engine-replay-check-") if path is None else os.fspath(path)
    try:
        inc_dir, full_dir = os.path.join(root, "incremental"), os.path.join(root, "full")
        for d in (inc_dir, full_dir):
            if os.path.exists(d) and os.listdir(d):
                raise ValueError(f"{d} is not empty: pass an empty directory (pytest's tmp_path) "
                                 "or None")
        check = ReplayCheck(seed)
        live, reopened = _fold_incrementally(make_stores, types, batches, shards, seed,
                                             checkpoint_every, inc_dir, limits, check)
        full = _replay_full(make_stores, types, batches, shards, full_dir, limits)
        check.stores = list(full)
        check.values = sum(len(v) for cols in full.values() for v in cols.values())
        for label, state in (("incremental fold", live),
                             ("incremental fold reopened from its checkpoint", reopened)):
            diff = _first_difference(state, full)
            if diff is not None:
                raise AssertionError(
                    f"{label} != full replay: {diff}. Seed {seed} ({check.actions} actions, "
                    f"{check.folds} folds, {check.checkpoints} checkpoints, {check.restarts} "
                    f"restarts, {check.crashes} crashes). A reducer whose result depends on "
                    "batch boundaries, time, randomness or anything outside its columns does "
                    f"this; fix it and rerun with seed={seed}")
        return check
    finally:
        if path is None:
            shutil.rmtree(root, ignore_errors=True)


def _open_app(log: Log, make_stores: Callable[[], Iterable[Store]],
              checkpoint_every: int | None) -> App:
    return App(log, list(make_stores()), checkpoint_every_actions=checkpoint_every,
               checkpoint_every_s=None)


def _fold_incrementally(make_stores: Callable[[], Iterable[Store]],
                        types: Iterable[ActionType] | Schema, batches: list[tuple[str, Any]],
                        shards: int, seed: int, checkpoint_every: int | None, directory: str,
                        limits: Limits, check: ReplayCheck) -> tuple[StoreStateMap, StoreStateMap]:
    """Fold piece by piece with seeded checkpoints/restarts; (live state, reopened state)."""
    rng = random.Random(f"incremental:{seed}")
    log = Log(directory, types, shards=shards, durability="none", limits=limits)
    app = _open_app(log, make_stores, checkpoint_every)
    try:
        for name, cols in batches:
            for piece in _pieces(cols, rng):
                log.append(name, piece)
                check.actions += _rows(piece)
                app.fold()
                check.folds += 1
                r = rng.random()
                if r < 0.15:
                    app.checkpoint()
                    check.checkpoints += 1
                elif r < 0.33:
                    if r < 0.25:
                        app.close()  # folds what is left, checkpoints
                        check.restarts += 1
                    else:
                        _abandon(app)  # the folding process died: no checkpoint
                        check.crashes += 1
                    log.close()
                    log = Log(directory, durability="none", limits=limits)
                    app = _open_app(log, make_stores, checkpoint_every)
        app.fold()
        live = _state_of(app, "incremental fold")
        app.close()
        log.close()
        log = Log(directory, durability="none", limits=limits)
        app = _open_app(log, make_stores, checkpoint_every)
        reopened = _state_of(app, "incremental fold reopened from its checkpoint")
    except BaseException:
        _abandon(app)  # keep the first error: closing would fold and checkpoint again
        log.close()
        raise
    app.close()
    log.close()
    return live, reopened


def _replay_full(make_stores: Callable[[], Iterable[Store]], types: Iterable[ActionType] | Schema,
                 batches: list[tuple[str, Any]], shards: int, directory: str,
                 limits: Limits) -> StoreStateMap:
    """Append every batch whole into a new log, then replay it from offset 0."""
    with Log(directory, types, shards=shards, durability="none", limits=limits) as log:
        for name, cols in batches:
            log.append(name, cols)
    app = replay(directory, list(make_stores()), progress=False)
    try:
        return _state_of(app, "full replay")
    finally:
        app.close()
        app.log.close()


def _abandon(app: App) -> None:
    """Drop an App as a killed process would: no final fold, no checkpoint."""
    pool = getattr(app, "_pool", None)
    if pool is not None:
        pool.shutdown()


def _rows(cols: Any) -> int:
    if hasattr(cols, "num_rows"):
        return int(cols.num_rows)
    return len(next(iter(cols.values()))) if cols else 0


def _pieces(cols: Any, rng: random.Random) -> list[Any]:
    """``cols`` cut at 0 to 2 seeded rows (a RecordBatch or a mapping of sliceable columns)."""
    n = _rows(cols)
    k = rng.choice((1, 1, 2, 3))
    if n < 2 or k == 1:
        return [cols]
    bounds = [0, *sorted(rng.sample(range(1, n), min(k - 1, n - 1))), n]
    if hasattr(cols, "num_rows"):
        return [cols.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    return [{f: v[lo:hi] for f, v in cols.items()} for lo, hi in zip(bounds, bounds[1:])]


def _state_of(app: App, label: str) -> StoreStateMap:
    """Every store's every column as {raw key: value}; AssertionError for a FAILED store."""
    out: StoreStateMap = {}
    for name, store in app.stores.items():
        if store.status is StoreState.FAILED:
            raise AssertionError(f"store {name!r} FAILED during the {label} at (shard, offset) "
                                 f"{store.failed_at}: {store.error!r}") from store.error
        table = store.to_arrow()
        keys = table.column("key").to_pylist()
        cols: dict[str, dict[Any, Any]] = {
            c: dict(zip(keys, table.column(c).to_pylist())) for c in table.column_names if c != "key"}
        vector = [c for c, k in store.user_columns.items() if isinstance(k, (Ring, MultiMapColumn, TopK))]
        domains = {c: _value_domain(app.log.schema, store, c) for c in vector}
        for c in vector:
            cols[c] = {}
        for key in keys if vector else ():
            got = store.get(key)
            for c in vector:
                v = got[c]
                d = domains[c]
                raw = app.log.dicts[d].key_of(v) if d is not None and len(v) else v
                cols[c][key] = tuple(raw.tolist() if hasattr(raw, "tolist") else raw)
        out[name] = cols
    return out


def _value_domain(schema: Schema, store: Store, column: str) -> str | None:
    """The key domain whose ids fill ``column``, if exactly one reducer's key field does."""
    found = set()
    for t, rs in store.reducers.items():
        for r in rs:
            if column in r.columns:
                for f in r.fields:
                    ft = schema[t].fields[f]
                    found.add(ft.domain if ft.is_key else None)
    return found.pop() if len(found) == 1 else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _first_difference(got: StoreStateMap, want: StoreStateMap) -> str | None:
    """The first (store, column, key) whose values differ, as a message, or None."""
    for store in want:
        if store not in got:
            return f"store {store!r} is missing"
        for column, values in want[store].items():
            mine = got[store].get(column)
            if mine is None:
                return f"store {store!r} has no column {column!r}"
            for key, v in values.items():
                if key not in mine:
                    return f"store {store!r} column {column!r}: key {key!r} is missing"
                if not _same(mine[key], v):
                    return (f"store {store!r} column {column!r} key {key!r}: {mine[key]!r} "
                            f"!= {v!r} in the full replay")
            extra = next((k for k in mine if k not in values), None)
            if extra is not None:
                return f"store {store!r} column {column!r}: key {extra!r} is not in the full replay"
    return None
