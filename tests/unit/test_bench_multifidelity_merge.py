"""benchmarks/bench_multifidelity.py --from-json: the runs of several --json files merged by
method and seed, and issue 12's two targets counted seed by seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_multifidelity

pytestmark = pytest.mark.unit


def test_merged_takes_seeds_from_every_file_as_ints_and_a_later_file_wins(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"morphml-asha": {"0": [[0.5, 1, 1.0]], "1": [[0.6, 1, 2.0]]}}))
    b.write_text(json.dumps({"morphml-asha": {"1": [[0.7, 1, 3.0]]}, "morphml-full": {"1": [[0.8, 1, 4.0]]}}))
    runs = bench_multifidelity.merged([a, b])
    assert runs == {"morphml-asha": {0: [(0.5, 1, 1.0)], 1: [(0.7, 1, 3.0)]}, "morphml-full": {1: [(0.8, 1, 4.0)]}}


def test_targets_count_the_seeds_where_each_is_met(capsys):
    best = {"morphml-full": {0: 0.80, 1: 0.80, 2: 0.80},
            "morphml-asha": {0: 0.796, 1: 0.794, 2: 0.81},  # within 0.005 in seeds 0 and 2
            "optuna-hyperband": {0: 0.79, 1: 0.80, 2: 0.82}}  # ASHA >= it in seed 0 only
    bench_multifidelity.targets(best)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("target ASHA within 0.005 of full fidelity: met in 2 of 3 seeds")
    assert out[1].startswith("target ASHA >= Optuna+Hyperband: met in 1 of 3 seeds")


def test_from_json_prints_the_table_without_training(tmp_path, capsys):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({m: {"0": [[0.7, 1, 1.0], [0.8, 1, 1.0]]} for m in bench_multifidelity.METHODS}))
    assert bench_multifidelity.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0 best: morphml-full 0.8000" in out
    assert "| morphml-asha " in out
