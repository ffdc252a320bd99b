"""The master's status shows the Pareto front of a multi-objective search (size and each
objective's best value on it, with its trial), in-process and over gRPC's ExperimentStatus."""

from __future__ import annotations

import json
import queue

import pytest

from morphml.cli import progress_line
from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, LeaseMessage
from morphml.distributed.journal import Journal
from morphml.distributed.master import status_to_proto
from morphml.optimizers import MultiObjectiveEvolution, RandomSearch
from morphml.space import Layer, SearchSpace

pytestmark = pytest.mark.unit

TWO = [{"metric": "val_accuracy", "goal": "maximize"}, {"metric": "params", "goal": "minimize"}]


def space() -> SearchSpace:
    return SearchSpace("s").add_layers(Layer.flatten(), Layer.dense(units=[8, 16, 32, 64, 128])).bind([1, 8, 8], 10)


def drive(tmp_path, optimizer, results: list[tuple[float, int]]) -> ExperimentCoordinator:
    settings = ExperimentSettings(max_trials=len(results), heartbeat_interval=1.0)
    coord = ExperimentCoordinator(optimizer, settings, Journal(tmp_path / "j.db"), ManualClock())
    worker_id, _ = coord.register("w", 0, len(results))
    outbox: queue.Queue = coord.connect(worker_id)
    sent = []
    while not outbox.empty():
        item = outbox.get_nowait()
        if isinstance(item, LeaseMessage):
            sent.append(item)
    assert len(sent) == len(results)
    for message, (accuracy, params) in zip(sent, results, strict=True):
        coord.report_result(message.task_id, message.attempt, True, {"val_accuracy": accuracy, "params": params})
    return coord


def test_status_carries_the_front_size_and_each_objectives_best_trade_off(tmp_path):
    optimizer = MultiObjectiveEvolution(space(), population_size=5, sample_size=2, max_trials=5, seed=1, objectives=TWO)
    # front: (0.9, 900), (0.8, 300), (0.5, 100); (0.7, 400) and (0.6, 950) are dominated
    coord = drive(tmp_path, optimizer, [(0.9, 900), (0.7, 400), (0.8, 300), (0.5, 100), (0.6, 950)])
    st = coord.status()
    assert st["pareto"]["size"] == 3
    by_metric = {b["metric"]: b for b in st["pareto"]["best"]}
    assert by_metric["val_accuracy"]["value"] == 0.9 and by_metric["params"]["value"] == 100
    assert by_metric["val_accuracy"]["trial_id"] == "t000001" and by_metric["params"]["trial_id"] == "t000004"
    assert st["best"]["trial_id"] == "t000001"  # best (and kubectl's Best column) = the first objective
    message = status_to_proto(st)
    assert message.pareto.size == 3
    assert [(b.metric, b.goal, b.value, b.trial_id) for b in message.pareto.best] == [
        ("val_accuracy", "maximize", 0.9, "t000001"),
        ("params", "minimize", 100.0, "t000004"),
    ]
    assert "| front 3 |" in progress_line(st, 0.0, 0)
    json.dumps(st)  # the status stays plain data


def test_one_objective_has_no_front_in_the_status(tmp_path):
    coord = drive(tmp_path, RandomSearch(space(), seed=1, max_trials=2), [(0.9, 900), (0.7, 400)])
    st = coord.status()
    assert st["pareto"] is None
    assert not status_to_proto(st).HasField("pareto")
    assert "front" not in progress_line(st, 0.0, 0)
