"""``jimray bench scaling``: CPU split between workers and reads, efficiencies, the oversubscription note, and one
tiny end-to-end run (1 and 2 workers on two simulated nodes, in a subprocess: its own Ray cluster)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import typer

from jimray.bench import scaling


def test_parse_workers():
    assert scaling.parse_workers("4,1, 2,2") == (1, 2, 4)
    for bad in ("", "0,1", "a"):
        with pytest.raises(typer.BadParameter):
            scaling.parse_workers(bad)


@pytest.mark.parametrize(("nodes", "expected"), [
    ([1.0, 1.0], {1: 1.0, 2: 0.5, 4: 0.25}),  # one node left whole for Ray Data's 1-CPU read tasks
    ([2.0, 2.0], {1: 2.0, 2: 1.0, 4: 0.5}),
    ([2.0], {1: 1.0, 2: 0.5, 4: 0.25}),
])
def test_worker_cpus_leave_one_cpu_for_reads(nodes, expected):
    for workers, cpus in expected.items():
        assert scaling.worker_cpus(workers, nodes) == pytest.approx(cpus)
        assert workers * cpus <= sum(nodes) - 1.0 + 1e-9


def test_efficiency_against_the_smallest_count():
    rows = [{"workers": 1, "seconds_train": 10.0}, {"workers": 2, "seconds_train": 5.0},
            {"workers": 4, "seconds_train": 5.0}]
    scaling.add_efficiency(rows, {"train": "seconds_train"})
    assert [r["eff_train"] for r in rows] == pytest.approx([1.0, 1.0, 0.5])


def test_notes_say_when_workers_outnumber_cores():
    results = {"settings": scaling._settings_record(scaling.Settings(workers=(1, 2, 4))),
               "cluster": {"nodes": 2, "cpus_by_node": [1.0, 1.0], "simulated": True, "gradient_numel": 10,
                           "cores": 2}}
    assert "Workers outnumber the machine's 2 cores for n = 4" in scaling.notes(results)
    results["cluster"]["cores"] = 8
    assert "outnumber" not in scaling.notes(results)


@pytest.mark.ray
@pytest.mark.slow  # ~60-75 s on the shared 2-core machine: two Ray Train runs at ~20 s of start-up each
def test_tiny_study_end_to_end(tmp_path):
    env = os.environ | {"HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}
    (tmp_path / "home").mkdir()
    args = ["bench", "scaling", "--workers", "1,2", "--tiny", "--box", "16", "--per-class", "2", "--k", "2",
            "--rounds", "1", "--no-probe", "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "jimray", *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert record["command"].startswith("jimray bench scaling --workers 1,2") and record["date"]
    assert record["cluster"]["nodes"] == 2 and record["cluster"]["simulated"]
    assert [r["workers"] for r in record["totals"]] == [1, 2]
    assert [(r["workers"], r["round"]) for r in record["rounds"]] == [(1, 1), (2, 1)]
    for row in record["totals"] + record["rounds"]:
        for key in ("embed_per_s", "pairs_per_s", "seconds_embed", "seconds_cluster", "seconds_train",
                    "eff_embed", "eff_train", "eff_round"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert all(r["subtomograms"] == 12 for r in record["rounds"])  # every subtomogram embedded once per round
    assert record["totals"][0]["eff_round"] == pytest.approx(1.0)
    markdown = (tmp_path / "out" / "scaling.md").read_text()
    assert "Command: `jimray bench scaling" in markdown and "| 2 | 1 | 12 |" in markdown
    assert "Load average (1 min) at the start" in markdown
