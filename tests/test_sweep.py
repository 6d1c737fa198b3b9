"""``python -m engine bench sweep``: grid parsing, the recommendation, argument errors, a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.cli import main
from engine.sweep import CellResult, explain, parse_grid, ratios_to_best, recommend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cell(shards: int, batch: int, e2e_mps: float, actions: int = 1_000_000) -> CellResult:
    """A synthetic cell whose end-to-end throughput is ``e2e_mps`` M actions/s."""
    secs = actions / (e2e_mps * 1e6)
    return CellResult(shards, batch, actions, append_s=[secs / 2], fold_s=[secs / 2], e2e_s=[secs])


# -- grid parsing ----------------------------------------------------------------------------
def test_parse_grid_sorts_and_dedups():
    assert parse_grid("4,1,2,2", name="--shards", hi=1024, example="1,2,4") == [1, 2, 4]
    assert parse_grid(" 256_000 , 1000", name="--batch", hi=1 << 26, example="x") == [1000, 256000]


@pytest.mark.parametrize("text, why", [
    ("0", "0 is out of range"), ("-1", "out of range"), ("abc", "'abc' is not an integer"),
    ("1,,2", "got '1,,2'"), ("", "got ''"), ("2048", "2,048 is out of range"),
    (",".join(map(str, range(1, 18))), "at most 16 values"),
])
def test_parse_grid_rejects(text, why):
    with pytest.raises(ValueError) as e:
        parse_grid(text, name="--shards", hi=1024, example="1,2,4")
    assert why in str(e.value)
    assert "--shards 1,2,4" in str(e.value)  # says what to pass


# -- the recommendation on synthetic results ---------------------------------------------------
def test_best_and_smallest_batch_within_ten_percent():
    results = [cell(1, 1000, 1.0), cell(1, 16000, 2.8), cell(1, 256000, 3.0),
               cell(2, 1000, 1.2), cell(2, 16000, 3.7), cell(2, 256000, 4.0)]
    rec = recommend(results)
    assert (rec.best.shards, rec.best.batch) == (2, 256000)
    assert (rec.low_latency.shards, rec.low_latency.batch) == (2, 16000)  # 3.7 >= 0.9 * 4.0
    assert ratios_to_best(results)[4] == pytest.approx(3.7 / 4.0)
    text = "\n".join(explain(rec, cores=2))
    assert "--shards 2 --batch 256000" in text and "--shards 2 --batch 16000" in text
    assert "0.93× best" in text


def test_just_outside_ten_percent_is_not_recommended():
    rec = recommend([cell(1, 1000, 3.59), cell(1, 16000, 3.61), cell(1, 256000, 4.0)])
    assert rec.best.batch == 256000
    assert rec.low_latency.batch == 16000  # 3.61 >= 3.6; 3.59 is not


def test_best_is_also_smallest_when_nothing_comes_close():
    rec = recommend([cell(1, 1000, 0.5), cell(1, 16000, 2.0), cell(1, 256000, 4.0)])
    assert rec.low_latency is rec.best
    assert "the same setting" in "\n".join(explain(rec))


def test_smallest_batch_may_be_on_another_shard_count_and_takes_the_faster():
    # the best is 1 shard at 256k; at 16k both shard counts are within 10 %: take the faster one
    results = [cell(1, 256000, 5.0), cell(1, 16000, 4.6), cell(2, 16000, 4.8),
               cell(2, 256000, 4.9), cell(2, 1000, 1.0)]
    rec = recommend(results)
    assert (rec.best.shards, rec.best.batch) == (1, 256000)
    assert (rec.low_latency.shards, rec.low_latency.batch) == (2, 16000)


def test_ties_prefer_smaller_batch_then_fewer_shards():
    rec = recommend([cell(2, 16000, 3.0), cell(1, 16000, 3.0), cell(1, 256000, 3.0)])
    assert (rec.best.shards, rec.best.batch) == (1, 16000)


def test_failed_cells_are_left_out():
    broken = cell(2, 1000, 9.0)  # its partial runs must not win
    broken.error = "CorruptLogError: ..."
    results = [broken, cell(1, 16000, 3.0), cell(1, 256000, 3.2)]
    rec = recommend(results)
    assert (rec.best.batch, rec.low_latency.batch) == (256000, 16000)
    assert ratios_to_best(results)[0] == 0.0 and ratios_to_best(results)[2] == 1.0
    with pytest.raises(ValueError, match="no cell of the grid completed"):
        recommend([broken])


def test_median_of_runs_and_shards_beyond_cores_warned():
    c = CellResult(4, 1000, 1_000_000, append_s=[1, 9, 2], fold_s=[1, 1, 1], e2e_s=[1.0, 100.0, 2.0])
    assert c.e2e_rate == pytest.approx(500_000)  # median 2 s, the 100 s outlier ignored
    assert any("more shards than the 2 cores" in line for line in explain(recommend([c]), cores=2))
    with pytest.raises(ValueError, match="no results"):
        recommend([])


# -- argument errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--shards", "0"], "--shards wants comma-separated integers from 1 to"),
    (["--batch", "abc"], "e.g. --batch 1000,16000,256000; 'abc' is not an integer"),
    (["--repeat", "0"], "--repeat wants an integer from 1"),
    (["--actions", "many"], "--actions wants an integer from 1"),
    (["--durability", "fast"], "invalid choice: 'fast'"),
])
def test_bad_arguments_exit_2_and_say_what_to_pass(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "sweep", *argv])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


# -- the real command --------------------------------------------------------------------------
def test_end_to_end_tiny_grid(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "160", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "sweep", "--shards", "1,2", "--batch",
         "1000,50000", "--actions", "20000", "--users", "2000", "--out", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for head in ("shards", "batch", "append M/s", "fold M/s", "end-to-end M/s", "ratio to best"):
        assert head in text
    assert "★ best" in text
    assert "best end-to-end: --shards" in text
    assert "smallest batch within 10% of the best" in text
    assert f"{os.cpu_count()} cores" in text

    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "sweep.json").read_text())
    cells = {(c["shards"], c["batch"]): c for c in doc["cells"]}
    assert sorted(cells) == [(1, 1000), (1, 50000), (2, 1000), (2, 50000)]
    assert len(doc["cells"]) == 4
    for c in cells.values():
        assert c["actions"] == 20000  # caption words are derived, not appended
        assert c["derived"] and min(c["derived"]) > 0
        for k in ("append_per_s", "fold_per_s", "e2e_per_s"):
            assert c[k] > 0
        assert 0 < c["ratio_to_best"] <= 1
    best = doc["recommendation"]["best"]
    assert cells[(best["shards"], best["batch"])]["ratio_to_best"] == 1
    # every temp data directory is gone
    assert not [p for p in os.listdir(tmp_path) if p.startswith("engine-sweep-")]
