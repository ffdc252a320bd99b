"""Process test: the operator's loss accounting against a real master (issue 10, item 2).

The real master process, fake worker sessions opened from this process with real gRPC and broken
on purpose (each one a loss detected by the stream), the master SIGKILLed and restarted on its
journal in the middle, and the operator's own code turning losses into Events: `get_master_status`
(paging with losses_after_seq) and `status.compute_status`, tick by tick, with one tick whose
status patch "fails" (its result is dropped). The cluster test
(tests/cluster/test_operator_loss_events.py) runs the same with the real operator and API server.

Imports: pytest, the standard library, morphml_operator, tests.cluster.operator_trials, proc_helpers.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from proc_helpers import TOKEN, free_port, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))
from morphml_operator.master_client import get_master_status
from morphml_operator.status import compute_status
from tests.cluster.operator_trials import lose_fake_workers

pytestmark = pytest.mark.process

SPEC = {"budget": {"maxTrials": 1000, "maxFailedTrials": 10}, "workers": {"replicas": 5}, "suspend": False,
        "objective": {"metric": "val_accuracy", "goal": "maximize"}}


class OperatorView:
    """What the operator keeps (the CR status) and the Events it posted, keyed as the API server keys them."""

    def __init__(self, address: str):
        self.address = address
        self.status: dict = {"phase": "Running"}
        self.events: dict[str, str] = {}  # Event name (key) -> reason; a second post of a key is a 409
        self.posts = 0

    def tick(self, patch_lands: bool = True) -> None:
        master = get_master_status(self.address, TOKEN, 5.0, losses_after_seq=int(self.status.get("lastLossSeq", 0)))
        new, events = compute_status(name="proc", spec=SPEC, generation=1, previous=self.status, master=master,
                                     workers_ready=5, workers_desired=5, now="2026-12-01T00:00:00Z")
        for event in events:
            if event.key:
                self.posts += 1
                self.events.setdefault(event.key, event.reason)
        if patch_lands:
            self.status = new


@pytest.mark.timeout(180)
def test_150_losses_across_a_master_restart_are_150_events_and_workers_lost_150(procs, tmp_path):
    # Each fake worker takes the same requeued trial; maxTaskLosses high so that it never fails
    # (ten failed trials would end the search, and later losses would be WorkerStopped).
    manifest = write_manifest(tmp_path / "m.yaml", max_trials=1000, max_failed=10, max_task_losses=1000)
    port = free_port()
    address = f"127.0.0.1:{port}"
    journal = tmp_path / "journal.db"
    master = procs.master(manifest, port, journal)
    view = OperatorView(address)

    def every_20(index: int) -> None:
        if index % 20 == 0:
            view.tick()

    def every_20_one_patch_failing(index: int) -> None:
        if index % 20 == 0:
            view.tick(patch_lands=index != 40)  # the tick after the 40th loss: its status patch fails

    assert lose_fake_workers(address, TOKEN, 75, "first", on_loss=every_20_one_patch_failing) == 75
    os.killpg(master.pid, signal.SIGKILL)
    master.wait()
    procs.master(manifest, port, journal, log_name="master2.log")
    # The restarted master keeps the numbering: the next loss is #76, and GetStatus after #60 has 61..75.
    view.tick()
    assert view.status["lastLossSeq"] == 75
    assert lose_fake_workers(address, TOKEN, 75, "second", on_loss=every_20) == 150
    view.tick()

    assert sorted(view.events, key=lambda k: int(k.rsplit("-", 1)[1])) == [f"worker-loss-{n}" for n in range(1, 151)]
    assert set(view.events.values()) == {"WorkerLost"}
    assert view.posts == 150 + 20  # the 20 losses of the dropped tick were posted again (and refused)
    assert (view.status["workersLost"], view.status["lastLossSeq"]) == (150, 150)
    # A fresh look (the operator restarted with this status) posts nothing new.
    before = view.posts
    view.tick()
    assert view.posts == before and view.status["workersLost"] == 150


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_backlog_past_one_page_is_read_page_by_page_in_one_tick(procs, tmp_path):
    """520 losses before the operator looks: the master answers 500 per call; one tick reads both pages."""
    manifest = write_manifest(tmp_path / "m.yaml", max_trials=1000, max_failed=10, max_task_losses=1000)
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs.master(manifest, port, tmp_path / "journal.db")
    view = OperatorView(address)
    assert lose_fake_workers(address, TOKEN, 520, "backlog") == 520
    view.tick()
    assert len(view.events) == view.posts == 520
    assert set(view.events.values()) == {"WorkerLost"}
    assert (view.status["workersLost"], view.status["lastLossSeq"]) == (520, 520)
