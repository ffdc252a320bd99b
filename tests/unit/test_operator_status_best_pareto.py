"""The CR status carries the best trial's checkpoint key and the Pareto front (size, best trade-off
per objective), taken from the master's GetStatus as it crosses the wire (status_to_proto -> the
operator's dict), while the printer columns stay as they are (issue 12 results, issue 13 item 3)."""

from __future__ import annotations

import pytest

from morphml.distributed.master import status_to_proto
from morphml_operator.master_client import _as_dict
from morphml_operator.status import compute_status

pytestmark = pytest.mark.unit

SPEC = {"budget": {"maxTrials": 8}, "objectives": [{"metric": "val_accuracy", "goal": "maximize"},
                                                   {"metric": "params", "goal": "minimize"}],
        "workers": {"replicas": 1}}


def coordinator_status(best=None, pareto=None) -> dict:
    """What ExperimentCoordinator.status() returns, the keys status_to_proto reads."""
    return {"phase": "Running", "succeeded": 3, "failed": 0, "running": 1, "pending": 0, "budget": 8,
            "stale_results": 0, "retries": 0, "experiment_name": "digits", "message": "", "metric": "val_accuracy",
            "goal": "maximize", "loss_seq": 0, "stopped": 0, "workers": [], "losses": [], "best": best,
            "pareto": pareto}


BEST = {"trial_id": "t000003", "metric": 0.9722, "summary": "dense64", "arch_json": "{}", "metrics": {"epochs": 4},
        "arch_hash": "abc", "checkpoint": "checkpoints/t000003/epoch-0004.pt"}
FRONT = {"size": 2, "best": [
    {"metric": "val_accuracy", "goal": "maximize", "value": 0.9722, "trial_id": "t000003"},
    {"metric": "params", "goal": "minimize", "value": 1210.0, "trial_id": "t000001"}]}


def status_from(master: dict | None, previous: dict | None = None) -> dict:
    status, _ = compute_status(name="digits", spec=SPEC, generation=1, previous=previous, master=master,
                               workers_ready=1, workers_desired=1, now="2026-12-01T22:00:00Z")
    return status


def wire(st: dict) -> dict:
    return _as_dict(status_to_proto(st))


def test_best_trial_id_and_its_checkpoint_key_reach_the_cr_status():
    status = status_from(wire(coordinator_status(best=BEST)))
    assert status["best"]["trialId"] == "t000003"
    assert status["best"]["checkpoint"] == "checkpoints/t000003/epoch-0004.pt"
    assert status["best"]["summary"] == "0.9722 dense64"  # the Best column as before


def test_a_best_without_checkpoint_has_no_checkpoint_field():
    status = status_from(wire(coordinator_status(best={**BEST, "checkpoint": None})))
    assert "checkpoint" not in status["best"]


def test_pareto_front_size_and_best_per_objective_reach_the_cr_status():
    status = status_from(wire(coordinator_status(best=BEST, pareto=FRONT)))
    assert status["pareto"] == {"size": 2, "best": [
        {"metric": "val_accuracy", "goal": "maximize", "value": 0.9722, "trialId": "t000003"},
        {"metric": "params", "goal": "minimize", "value": 1210.0, "trialId": "t000001"}]}
    # Kept while the master is unreachable, like the counts and the best.
    assert status_from(None, previous=status)["pareto"] == status["pareto"]


def test_one_objective_has_no_pareto_in_status():
    assert "pareto" not in status_from(wire(coordinator_status(best=BEST)))
