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
    runs, retrained, settings = bench_multifidelity.merged([a, b])
    assert runs == {"morphml-asha": {0: [(0.5, 1, 1.0)], 1: [(0.7, 1, 3.0)]}, "morphml-full": {1: [(0.8, 1, 4.0)]}}
    assert retrained == {} and settings == {}  # files from before the settings were saved


def test_merged_keeps_the_retrained_values_of_the_file_a_seed_came_from(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"morphml-asha": {"0": [[0.5, 1, 1.0]], "1": [[0.6, 1, 2.0]]},
                             "_chosen": {"morphml-asha": {"0": "{}", "1": "{}"}},
                             "_retrained": {"morphml-asha": {"0": [0.4, 0.5, 0.6], "1": [0.1]}}}))
    b.write_text(json.dumps({"morphml-asha": {"1": [[0.7, 1, 3.0]]}}))  # seed 1 again, not retrained
    runs, retrained, _ = bench_multifidelity.merged([a, b])
    assert set(runs) == {"morphml-asha"} and runs["morphml-asha"][1] == [(0.7, 1, 3.0)]
    assert retrained == {"morphml-asha": {0: [0.4, 0.5, 0.6]}}


def test_targets_count_the_seeds_where_each_is_met(capsys):
    best = {"morphml-full": {0: 0.80, 1: 0.80, 2: 0.80},
            "morphml-asha": {0: 0.796, 1: 0.794, 2: 0.81},  # within 0.005 in seeds 0 and 2
            "optuna-hyperband": {0: 0.79, 1: 0.80, 2: 0.82}}  # ASHA >= it in seed 0 only
    bench_multifidelity.targets(best)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "by best val_accuracy:"
    assert out[1].startswith("  target ASHA within 0.005 of full fidelity: met in 2 of 3 seeds")
    assert out[2].startswith("  target ASHA >= Optuna+Hyperband: met in 1 of 3 seeds")


def test_from_json_prints_the_table_without_training(tmp_path, capsys):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({m: {"0": [[0.7, 1, 1.0], [0.8, 1, 1.0]]} for m in bench_multifidelity.METHODS}))
    assert bench_multifidelity.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0 best: morphml-full 0.8000" in out
    assert "| morphml-asha " in out
    assert "retrained" not in out  # a file from before --retrain has no such figures


def test_from_json_prints_the_retrained_figures_and_their_targets(tmp_path, capsys):
    path = tmp_path / "runs.json"
    doc = {m: {"0": [[0.7, 1, 1.0], [0.8, 1, 1.0]]} for m in bench_multifidelity.METHODS}
    doc["_retrained"] = {m: {"0": [0.70, 0.78, 0.74]} for m in bench_multifidelity.METHODS}
    doc["_retrained"]["morphml-full"] = {"0": [0.76, 0.76, 0.80]}
    path.write_text(json.dumps(doc))
    assert bench_multifidelity.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0 retrained: morphml-full 0.7600, morphml-asha 0.7400" in out
    assert "by the retrained accuracy of the chosen architecture:" in out
    assert "target ASHA within 0.005 of full fidelity: met in 0 of 1 seeds" in out
    assert "target ASHA >= Optuna+Hyperband: met in 1 of 1 seeds" in out
    assert "| morphml-full      | 1     | 0.7600 (0.7600-0.7600)" in out


def test_from_json_reports_the_settings_the_runs_had_not_the_defaults(tmp_path, capsys):
    path = tmp_path / "runs.json"
    doc = {m: {"0": [[0.7, 1, 1.0], [0.8, 1, 1.0]]} for m in ("morphml-full", "morphml-asha")}
    doc["_settings"] = {"epochs": 27, "min_resource": 1, "full_trials": 18, "fraction": 3, "workers": 2}
    path.write_text(json.dumps(doc))
    assert bench_multifidelity.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "E=27 epochs per full trial" in out and "full run 18 trials = 486 epochs" in out
    assert "multi-fidelity budget 162 epochs" in out


def test_from_json_refuses_files_run_with_different_settings_naming_the_option(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, epochs in ((a, 27), (b, 9)):
        path.write_text(json.dumps({"morphml-asha": {"0": [[0.5, 1, 1.0]]},
                                    "_settings": {"epochs": epochs, "full_trials": 18}}))
    with pytest.raises(SystemExit, match=r"b.json: ran with --epochs 9, .*a.json with 27"):
        bench_multifidelity.merged([a, b])
