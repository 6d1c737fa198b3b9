"""``engine.benchreport``: ratios from a pytest-benchmark JSON, matched per parameter id."""

from __future__ import annotations

import json
import os

from engine.benchreport import format_rate, load, report


def _bench(name: str, group: str, system: str, median: float, actions: int,
           param: str | None = None, **extra: float) -> dict:
    return {
        "name": name if param is None else f"{name}[{param}]",
        "group": group,
        "param": param,
        "params": None if param is None else {"keys": param},
        "extra_info": {"system": system, "actions": actions, **extra},
        "stats": {"median": median, "mean": median, "min": median, "max": median},
    }


def _write(tmp_path, benches: list[dict]) -> str:
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return str(path)


def test_report_prints_ratios_per_group_and_param(tmp_path, capsys):
    path = _write(tmp_path, [
        # append: engine 100 M/s, limit 200 M/s, sqlite 1 M/s -> 0.50x and 100x
        _bench("test_append_engine", "append-columnar", "engine", 0.01, 1_000_000),
        _bench("test_append_limit", "append-columnar", "limit-memcpy-crc", 0.005, 1_000_000),
        _bench("test_append_sqlite", "append-columnar", "sqlite", 0.5, 500_000),
        # fold, two parameter sets: each engine figure is compared with its twin only
        _bench("test_fold_engine", "replay-fold", "engine", 0.1, 10_000_000, "zipf"),
        _bench("test_fold_polars", "replay-fold", "polars", 0.4, 10_000_000, "zipf"),
        _bench("test_fold_engine", "replay-fold", "engine", 0.2, 10_000_000, "uniform"),
        _bench("test_fold_polars", "replay-fold", "polars", 0.5, 10_000_000, "uniform"),
        # latency figures pass through
        _bench("test_durable_engine", "dispatch-durable", "engine", 0.5, 100_000,
               p50_us=300.0, p99_us=1_500.0),
        _bench("test_durable_sqlite", "dispatch-durable", "sqlite", 1.0, 1_000,
               p50_us=900.0, p99_us=4_000.0),
    ])
    png = str(tmp_path / "chart.png")
    assert report(path, png) == 0
    out = capsys.readouterr().out
    rows = _rows_by_section(out)
    assert "0.50×" in rows["append-columnar"]["limit-memcpy-crc"]
    assert "✗" not in rows["append-columnar"]["limit-memcpy-crc"]  # meets BENCH.md's 0.5 bar
    assert "100×" in rows["append-columnar"]["sqlite"]  # 100 M/s ÷ 1 M/s
    assert "✗" in rows["append-columnar"]["sqlite"] or "✓" in rows["append-columnar"]["sqlite"]
    assert "100 M/s" in rows["append-columnar"]["engine"]
    assert "200 M/s" in rows["append-columnar"]["limit-memcpy-crc"]
    assert "4.00×" in rows["replay-fold [zipf]"]["polars"]  # 100 M/s ÷ 25 M/s
    assert "2.50×" in rows["replay-fold [uniform]"]["polars"]  # 50 M/s ÷ 20 M/s
    assert "300 µs" in rows["dispatch-durable"]["engine"]
    assert "1,500 µs" in rows["dispatch-durable"]["engine"]
    assert "200×" in rows["dispatch-durable"]["sqlite"]  # 200 k/s ÷ 1 k/s
    assert os.path.getsize(png) > 1_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _rows_by_section(out: str) -> dict[str, dict[str, str]]:
    """{table title: {system: its printed row}} from the report's output."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in out.splitlines():
        if line.count("│") > 3:
            current[line.split("│")[1].strip()] = line
        elif line.strip() and not line.lstrip().startswith(("┏", "┃", "┡", "└", "(")):
            current = sections.setdefault(line.strip(), {})
    return sections


def test_load_matches_by_group_param_and_system(tmp_path):
    path = _write(tmp_path, [
        _bench("a", "scan", "engine", 0.5, 1_000, "x"),
        _bench("b", "scan", "limit-memread", 0.25, 1_000, "x"),
        _bench("c", "scan", "engine", 0.1, 1_000, "y"),
    ])
    rows = {(r.group, r.variant, r.system): r for r in load(path)}
    assert set(rows) == {("scan", "x", "engine"), ("scan", "x", "limit-memread"),
                         ("scan", "y", "engine")}
    assert rows[("scan", "x", "engine")].rate == 2_000
    assert rows[("scan", "y", "engine")].rate == 10_000


def test_report_without_png_and_missing_engine(tmp_path, capsys):
    path = _write(tmp_path, [_bench("p", "scan", "limit-memread", 0.001, 1_000_000)])
    assert report(path, None) == 0
    out = capsys.readouterr().out
    assert "1 G/s" in out and "no engine row" in out


def test_format_rate():
    assert format_rate(1.25e9) == "1.25 G/s"
    assert format_rate(12_300_000) == "12.3 M/s"
    assert format_rate(850_000) == "850 k/s"
    assert format_rate(None) == "-"
