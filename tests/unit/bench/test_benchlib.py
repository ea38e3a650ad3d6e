"""The pure helpers of bench/benchlib.py: statistics, ratios, result documents, task timings."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bench"))

import benchlib  # noqa: E402


def test_median_odd_even_and_missing_values():
    assert benchlib.median([3, 1, 2]) == 2
    assert benchlib.median([4, 1, 3, 2]) == 2.5
    assert benchlib.median([5, None, 1, 3]) == 3
    assert benchlib.median([]) is None
    assert benchlib.median([None]) is None
    assert benchlib.median([float("nan"), 2.0]) == 2.0


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0, 1.0), (50, 5.5), (100, 10.0), (99, 9.91), (25, 3.25)],
)
def test_percentile_interpolates_like_numpy(p, expected):
    assert benchlib.percentile(range(10, 0, -1), p) == pytest.approx(expected)


def test_percentile_edges():
    assert benchlib.percentile([7], 99) == 7
    assert benchlib.percentile([], 50) is None
    assert benchlib.percentile([1, 3], 50) == 2
    with pytest.raises(ValueError):
        benchlib.percentile([1], 101)


def test_ratio_and_round_ratios():
    assert benchlib.ratio(1, 4) == 0.25
    assert benchlib.ratio(1, 0) is None
    assert benchlib.ratio(None, 2) is None
    assert benchlib.ratio(2, None) is None
    assert benchlib.round_ratios([2, 3, None], [4, 0, 1]) == [0.5, None, None]
    with pytest.raises(ValueError):
        benchlib.round_ratios([1], [1, 2])


def test_summary():
    assert benchlib.summary([3, None, 1, 2]) == {"n": 3, "median": 2, "min": 1, "max": 3}
    assert benchlib.summary([]) == {"n": 0, "median": None, "min": None, "max": None}


def test_check_target():
    assert benchlib.check_target(0.5, "<=", 0.5) is True
    assert benchlib.check_target(0.6, "<", 0.5) is False
    assert benchlib.check_target(None, ">=", 1) is None
    with pytest.raises(ValueError):
        benchlib.check_target(1, "==", 1)


def test_section_medians_ratios_per_round_and_targets():
    sec = benchlib.section(
        {"scratch_s": [10.0, 30.0, 20.0], "rerun_s": [5.0, 6.0, 12.0]},
        ratios={"rerun_over_scratch": ("rerun_s", "scratch_s")},
        targets={
            "rerun at most 60%": ("ratios.rerun_over_scratch", "<=", 0.6),
            "scratch under 15 s": ("medians.scratch_s", "<", 15),
        },
        units={"scratch_s": "s"},
        notes=["n"],
        extra={"k": 1},
    )
    assert sec["medians"] == {"scratch_s": 20.0, "rerun_s": 6.0}
    r = sec["ratios"]["rerun_over_scratch"]
    assert r["per_round"] == [0.5, 0.2, 0.6]
    assert r["median"] == 0.5  # median of the per-round ratios ...
    assert r["of_medians"] == pytest.approx(0.3)  # ... not the ratio of the medians
    assert sec["targets"]["rerun at most 60%"] == {
        "metric": "ratios.rerun_over_scratch",
        "op": "<=",
        "limit": 0.6,
        "value": 0.5,
        "met": True,
    }
    assert sec["targets"]["scratch under 15 s"]["met"] is False
    assert sec["spread"]["rerun_s"] == {"n": 3, "median": 6.0, "min": 5.0, "max": 12.0}
    assert sec["units"] == {"scratch_s": "s"} and sec["notes"] == ["n"] and sec["extra"] == {"k": 1}


def test_section_rejects_unknown_metrics():
    with pytest.raises(KeyError):
        benchlib.section({"a": [1]}, ratios={"x": ("a", "b")})
    with pytest.raises(ValueError):
        benchlib.section({"a": [1]}, targets={"t": ("a", "<", 1)})


def test_result_document_and_write(tmp_path):
    sec = benchlib.section({"a": [1, 2, 3]}, targets={"t": ("medians.a", "<=", 2)})
    doc = benchlib.result_document(
        "demo",
        rounds=3,
        benchmarks={"one": sec, "two": benchlib.section({"b": [1]})},
        timestamp="2026-01-01T00:00:00+00:00",
        commit={"sha": "abc", "dirty": False},
        host={"nproc": 2, "kernel": "6.1"},
        load_average={"start": [1.0, 1.0, 1.0], "end": [2.0, 2.0, 2.0]},
        argv=["--rounds", "3"],
        duration_s=1.5,
    )
    for key in ("timestamp", "commit", "host", "rounds", "load_average", "benchmarks"):
        assert key in doc
    assert doc["all_targets_met"] is True
    path = benchlib.write_result(doc, directory=str(tmp_path))
    assert path == str(tmp_path / "demo.json")
    with open(path) as f:
        assert json.load(f) == doc
    assert not os.path.exists(path + ".tmp")


def test_result_document_targets_unknown_or_missed():
    none = benchlib.result_document(
        "x",
        rounds=3,
        benchmarks={"a": benchlib.section({"a": [1]})},
        timestamp="t",
        commit={},
        host={},
        load_average={},
    )
    assert none["all_targets_met"] is None
    missed = benchlib.section({"a": [3]}, targets={"t": ("medians.a", "<=", 2)})
    doc = benchlib.result_document(
        "x", rounds=3, benchmarks={"a": missed}, timestamp="t", commit={}, host={}, load_average={}
    )
    assert doc["all_targets_met"] is False


def test_task_times_from_stamped_output():
    lines = [
        (0.0, ""),
        (2.0, "PLAY [Validate] ****\n"),
        (2.5, "TASK [Check everything] ****\n"),
        (3.0, "ok: [localhost]\n"),
        (4.0, "TASK [role : Start etcd] ****\n"),
        (4.1, "changed: [c1-n1]\n"),
        (7.0, "RUNNING HANDLER [role : Restart etcd] ****\n"),
        (8.0, "PLAY [Next] ****\n"),
        (8.5, "TASK [Start etcd] ****\n"),
        (9.0, "PLAY RECAP ****\n"),
        (9.2, "c1-n1 : ok=1\n"),
    ]
    assert benchlib.task_times(lines) == [
        ("startup", 2.0),
        ("TASK Check everything", 1.5),
        ("TASK role : Start etcd", 3.0),
        ("HANDLER role : Restart etcd", 1.0),
        ("TASK Start etcd", 0.5),
    ]


def test_task_times_unfinished_output_and_top_tasks():
    assert benchlib.task_times([(0.0, ""), (1.0, "TASK [a] ***\n"), (3.0, "x\n")]) == [
        ("startup", 1.0),
        ("TASK a", 2.0),
    ]
    runs = [[("TASK a", 1.0), ("TASK b", 5.0), ("TASK a", 1.0)], [("TASK a", 3.0)], [("TASK b", 4.0)]]
    # a: 2, 3, 0 -> 2; b: 5, 0, 4 -> 4
    assert benchlib.top_tasks(runs, n=5) == [{"task": "TASK b", "median_s": 4.0}, {"task": "TASK a", "median_s": 2.0}]


def test_format_table():
    text = benchlib.format_table(["name", "value"], [["a", 1.23456], ["long name", None], ["b", 1234.5]])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "value"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a", "1.235"]
    assert lines[3].split() == ["long", "name", "-"]
    assert lines[4].split() == ["b", "1234.5"]
