"""Benchmark scale, peer availability and the plain-``pytest`` smoke mode (see shared BENCH.md).

``ENGINE_BENCH_SCALE`` picks the sizes: ``smoke`` (tiny, each body once), ``quick`` (the
default for ``--benchmark-only``: one suite file in about a minute) or ``full`` (the headline
sizes the README quotes). A plain ``pytest`` run, without ``--benchmark-only`` /
``--benchmark-enable`` and without ``ENGINE_BENCH_SCALE``, is a correctness run: benchmarks are
disabled (pytest-benchmark then calls each body exactly once) at smoke scale.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

SCALE_ENV = "ENGINE_BENCH_SCALE"


@dataclass(frozen=True)
class Scale:
    """Sizes per suite. ``*_rounds`` are measured rounds where each needs a fresh directory."""

    name: str
    peer_rounds: int  # rounds of the slow peers (sqlite, eventsourcing, nats), sizes capped below
    # append-columnar
    append_actions: int
    append_rounds: int
    append_sqlite_actions: int
    # dispatch-single
    dispatch_actions: int
    dispatch_rounds: int
    dispatch_sqlite_actions: int
    dispatch_eventsourcing_actions: int
    # dispatch-durable
    durable_producers: int
    durable_actions: int
    durable_rounds: int
    durable_sqlite_actions: int
    durable_nats_actions: int
    # scan
    scan_actions: int
    scan_rounds: int


SCALES: dict[str, Scale] = {
    "smoke": Scale(
        "smoke", peer_rounds=1,
        append_actions=2 * 65_536, append_rounds=1, append_sqlite_actions=2 * 65_536,
        dispatch_actions=5_000, dispatch_rounds=1, dispatch_sqlite_actions=5_000,
        dispatch_eventsourcing_actions=1_000,
        durable_producers=1_000, durable_actions=2_000, durable_rounds=1,
        durable_sqlite_actions=100, durable_nats_actions=500,
        scan_actions=2 * 65_536, scan_rounds=1,
    ),
    "quick": Scale(
        "quick", peer_rounds=3,
        append_actions=4_000_000, append_rounds=5, append_sqlite_actions=1_000_000,
        dispatch_actions=300_000, dispatch_rounds=5, dispatch_sqlite_actions=300_000,
        dispatch_eventsourcing_actions=20_000,
        durable_producers=1_000, durable_actions=100_000, durable_rounds=5,
        durable_sqlite_actions=2_000, durable_nats_actions=3_000,
        scan_actions=4_000_000, scan_rounds=20,
    ),
    "full": Scale(
        "full", peer_rounds=3,
        append_actions=10_000_000, append_rounds=5, append_sqlite_actions=10_000_000,
        dispatch_actions=1_000_000, dispatch_rounds=5, dispatch_sqlite_actions=1_000_000,
        dispatch_eventsourcing_actions=100_000,
        durable_producers=1_000, durable_actions=200_000, durable_rounds=5,
        durable_sqlite_actions=10_000, durable_nats_actions=20_000,
        scan_actions=10_000_000, scan_rounds=20,
    ),
}

_chosen: dict[str, str] = {}


def _option(config: pytest.Config, name: str) -> Any:
    try:
        return config.getoption(name)
    except ValueError:  # pytest-benchmark not installed: nothing to configure
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Before pytest-benchmark reads its options: a plain run is a once-each smoke run."""
    env = os.environ.get(SCALE_ENV, "").strip().lower()
    if env and env not in SCALES:
        raise pytest.UsageError(f"{SCALE_ENV}={env!r}: choose one of {', '.join(SCALES)}")
    timed = bool(_option(config, "benchmark_only") or _option(config, "benchmark_enable"))
    if not env and not timed:
        if _option(config, "benchmark_disable") is not None:
            config.option.benchmark_disable = True
        env = "smoke"
    _chosen["scale"] = env or "quick"


def current_scale() -> Scale:
    """The scale chosen for this session (also usable outside fixtures)."""
    name = _chosen.get("scale") or os.environ.get(SCALE_ENV, "").strip().lower() or "quick"
    return SCALES[name]


@pytest.fixture(scope="session")
def scale() -> Scale:
    """The sizes of this session (``ENGINE_BENCH_SCALE``)."""
    return current_scale()


def pytest_report_header(config: pytest.Config) -> str:
    return f"engine benchmarks: scale={current_scale().name} ({SCALE_ENV})"


# -- peers -----------------------------------------------------------------------------------
class Peers:
    """Optional peers: import / locate them, or skip the benchmark saying how to install them."""

    @staticmethod
    def module(module: str, peer: str, pip: str) -> Any:
        try:
            return importlib.import_module(module)
        except ImportError:
            pytest.skip(f"peer {peer} not installed: pip install {pip}")

    @staticmethod
    def binary(binary: str, peer: str, pip: str) -> str:
        """The path of an executable: PATH first, then next to this interpreter."""
        path = shutil.which(binary) or shutil.which(binary, path=os.path.dirname(sys.executable))
        if path is None:
            pytest.skip(f"peer {peer} not installed: no {binary} on PATH (pip install {pip})")
        return path


@pytest.fixture(scope="session")
def peers() -> Peers:
    return Peers()


# -- fresh directories per round --------------------------------------------------------------
class Fresh:
    """A new directory per measured round; the previous round's resources are closed and its
    directory removed first, so a long run does not pile up preallocated segments.

    pytest-benchmark skips ``teardown`` when benchmarks are disabled, so setups register what
    they open with ``on_close`` instead.
    """

    def __init__(self, root: Any):
        self.root = root
        self._n = 0
        self._dir: Any = None
        self._close: list[Callable[[], Any]] = []

    def dir(self) -> str:
        self.release()
        self._dir = self.root / f"round-{self._n:03d}"
        self._n += 1
        return str(self._dir)

    def on_close(self, fn: Callable[[], Any]) -> None:
        self._close.append(fn)

    def release(self) -> None:
        todo, self._close = self._close, []
        errors = []
        for fn in reversed(todo):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - close everything, report the first failure
                errors.append(exc)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if errors:
            raise errors[0]


@pytest.fixture
def fresh(tmp_path: Any) -> Any:
    """A :class:`Fresh` under this test's ``tmp_path``."""
    f = Fresh(tmp_path)
    yield f
    f.release()
