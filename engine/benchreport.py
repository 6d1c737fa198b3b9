"""``python -m engine bench report out.json [--png out.png]``: a benchmark run as ratios.

Reads a pytest-benchmark JSON file (``--benchmark-json``) written by the suites in
``benchmarks/`` (see the shared BENCH.md contract: ``benchmark.group``, ``extra_info["system"]``,
``extra_info["actions"]``, optional ``p50_us`` / ``p99_us``) and prints, per group and parameter
set, every system's median time, throughput (actions / median), latency percentiles and the
engine's ratio to it (engine throughput ÷ its throughput), next to the bar BENCH.md sets.
With ``png`` it also draws the throughputs as a log-scale bar chart.

Only the standard library, rich and (for the chart) matplotlib are used; the engine's own
modules are not imported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BARS", "Row", "format_rate", "format_ratio", "load", "report"]

ENGINE = "engine"

#: BENCH.md's bars: (group, system) -> minimum engine ÷ system throughput ratio.
BARS: dict[tuple[str, str], float] = {
    ("append-columnar", "limit-memcpy-crc"): 0.5,
    ("append-columnar", "sqlite"): 20,
    ("dispatch-single", "limit-python-call"): 0.15,
    ("dispatch-single", "sqlite"): 10,
    ("dispatch-single", "eventsourcing"): 100,
    ("dispatch-durable", "limit-asyncio-group-commit"): 0.5,
    ("dispatch-durable", "nats-jetstream"): 50,
    ("dispatch-durable", "sqlite"): 50,
    ("scan", "limit-memread"): 0.5,
    ("replay-fold", "polars"): 3,
    ("replay-fold", "duckdb"): 3,
    ("replay-fold", "limit-kernel"): 0.5,
    ("replay-fold", "python-dict"): 50,
    ("replay-string-keys", "polars"): 3,
    ("replay-string-keys", "duckdb"): 3,
    ("restart", "full-replay"): 50,
    ("query-get", "limit-numpy-take"): 0.5,
    ("subscriptions", "no-subscriptions"): 0.5,
    ("shards", "one-shard"): 1.6,
}
#: Bars on the engine's own figures: group -> {"rate": actions/s, "p50_us"/"p99_us": at most}.
ENGINE_BARS: dict[str, dict[str, float]] = {
    "dispatch-durable": {"p99_us": 2_000},
    "query-get-single": {"rate": 1e6},
    "latency": {"p50_us": 20, "p99_us": 200},
    "derive-fanout": {"rate": 20e6},
}


@dataclass
class Row:
    """One benchmark of a run: a system measured in one group and parameter set."""

    group: str
    variant: str  # parameter id without the system ("" when not parametrized)
    system: str
    name: str
    median_s: float
    actions: float | None
    p50_us: float | None = None
    p99_us: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        """Actions per second (actions / median), or None if unknown."""
        if self.actions is None or not self.median_s or self.median_s <= 0:
            return None
        return self.actions / self.median_s


def _variant(bench: dict[str, Any]) -> str:
    params = bench.get("params") or {}
    if "system" in params:  # a suite parametrized over systems: the rest is the variant
        return "-".join(str(v) for k, v in params.items() if k != "system")
    return str(bench.get("param") or "")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load(json_path: str) -> list[Row]:
    """The rows of a pytest-benchmark JSON file (later duplicates replace earlier ones)."""
    with open(json_path) as f:
        doc = json.load(f)
    rows: dict[tuple[str, str, str], Row] = {}
    for b in doc.get("benchmarks", []):
        stats = b.get("stats") or {}
        median = _num(stats.get("median"))
        if median is None:
            continue
        extra = dict(b.get("extra_info") or {})
        params = b.get("params") or {}
        system = str(extra.get("system") or params.get("system") or b.get("name", "?"))
        group = str(b.get("group") or b.get("name", "?"))
        row = Row(group, _variant(b), system, str(b.get("name", "")), median,
                  _num(extra.get("actions")), _num(extra.get("p50_us")), _num(extra.get("p99_us")),
                  extra)
        rows[(row.group, row.variant, row.system)] = row
    return list(rows.values())


# -- formatting --------------------------------------------------------------------------------
def format_rate(rate: float | None) -> str:
    """Actions per second with a unit: '12.3 M/s', '850 k/s', '1.25 G/s'."""
    if rate is None:
        return "-"
    for unit, scale in (("G/s", 1e9), ("M/s", 1e6), ("k/s", 1e3)):
        if rate >= scale:
            v = rate / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{rate:.3g} /s"


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 100:
        return f"{ratio:.0f}×"
    if ratio >= 10:
        return f"{ratio:.1f}×"
    return f"{ratio:.2f}×"


def _format_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _format_us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} µs" if v >= 100 else f"{v:.3g} µs"


def _order(system: str) -> tuple[int, str]:
    return (0 if system == ENGINE else 1 if system.startswith("limit-") else 2, system)


def _verdict(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def _bar_cell(row: Row, engine: Row | None, ratio: float | None) -> str:
    """The BENCH.md bar for this row and whether the run meets it."""
    if row.system == ENGINE:
        checks = []
        for key, bar in ENGINE_BARS.get(row.group, {}).items():
            if key == "rate":
                if row.rate is not None:
                    checks.append(f"≥ {format_rate(bar)} {_verdict(row.rate >= bar)}")
            else:
                got = row.p50_us if key == "p50_us" else row.p99_us
                if got is not None:
                    checks.append(f"{key[:3]} ≤ {bar:,.0f} µs {_verdict(got <= bar)}")
        return ", ".join(checks)
    bar = BARS.get((row.group, row.system))
    if bar is None or engine is None or ratio is None:
        return "" if bar is None else f"≥ {bar:g}×"
    return f"≥ {bar:g}× {_verdict(ratio >= bar)}"


def _sections(rows: list[Row]) -> list[tuple[str, str, list[Row]]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.group, r.variant), []).append(r)
    return [(g, v, sorted(rs, key=lambda r: _order(r.system)))
            for (g, v), rs in sorted(groups.items())]


def report(json_path: str, png: str | None = None) -> int:
    """Print every group of a benchmark JSON with throughputs and the engine's ratios.

    With ``png``, also write a log-scale bar chart of the throughputs. Returns 0.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = load(json_path)
    con = Console()
    if not con.is_terminal:
        con = Console(width=max(con.width, 150))
    if not rows:
        con.print(f"{json_path}: no benchmarks")
        return 0
    for group, variant, rs in _sections(rows):
        engine = next((r for r in rs if r.system == ENGINE), None)
        title = group if not variant else f"{group} [{variant}]"
        t = Table("system", "median", "throughput", "p50", "p99", "engine ÷ system", "bar",
                  title=f"[bold]{escape(title)}[/bold]", title_justify="left")
        for r in rs:
            ratio = None
            if engine is not None and r is not engine and engine.rate and r.rate:
                ratio = engine.rate / r.rate
            t.add_row(escape(r.system), _format_time(r.median_s), format_rate(r.rate),
                      _format_us(r.p50_us), _format_us(r.p99_us),
                      "" if r is engine else format_ratio(ratio), _bar_cell(r, engine, ratio))
        con.print(t)
        if engine is None:
            con.print("  (no engine row in this group: ratios need the engine's figure)")
    if png:
        _chart(rows, png)
        con.print(f"chart written to {png}")
    return 0


def _chart(rows: list[Row], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(g, v, [r for r in rs if r.rate]) for g, v, rs in _sections(rows)]
    sections = [s for s in sections if s[2]]
    n = max(1, len(sections))
    height = sum(0.6 + 0.32 * len(rs) for _, _, rs in sections) or 2
    ratios = [max(1, len(s[2])) for s in sections] or [1]
    fig, axes = plt.subplots(n, 1, figsize=(9, max(2.5, height)), squeeze=False,
                             gridspec_kw={"height_ratios": ratios})
    for ax, (group, variant, rs) in zip(axes[:, 0], sections):
        names = [r.system for r in rs][::-1]
        rates = [r.rate for r in rs][::-1]
        colors = ["tab:orange" if s == ENGINE else "tab:gray" if s.startswith("limit-")
                  else "tab:blue" for s in names]
        ax.barh(names, rates, color=colors)
        ax.set_xscale("log")
        ax.set_title(group if not variant else f"{group} [{variant}]", loc="left", fontsize=10)
        for y, v in enumerate(rates):
            ax.text(v, y, " " + format_rate(v), va="center", fontsize=8)
        ax.margins(x=0.25)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("actions per second (log scale)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
