"""handlers.post_oom_events (issue 14): a worker container killed for running out of memory gets one
Warning Event `WorkerOOMKilled` on its experiment, however many watch events show the same kill; a
second kill (after the kubelet's restart) gets its own; a pod of a deleted experiment posts nothing.

The Kubernetes API is a small in-memory fake (the CR read, Event creation with the API server's 409
for a name that exists); no cluster, no kopf loop.
Imports: pytest, kubernetes (ApiException only), morphml_operator.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from morphml_operator import builders, handlers

pytestmark = pytest.mark.unit

LOG = logging.getLogger("test")
OOM = {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-12-02T03:00:03Z"}}


class FakeKube:
    def __init__(self, experiment_exists: bool = True) -> None:
        self.experiment_exists = experiment_exists
        self.events: dict[str, dict] = {}
        self.creates = 0

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Any:
        if not self.experiment_exists:
            raise ApiException(status=404)
        return {"metadata": {"name": name, "namespace": namespace, "uid": "cr-uid-1"}}

    # CoreV1Api
    def create_namespaced_event(self, namespace: str, manifest: dict) -> None:
        self.creates += 1
        if manifest["metadata"]["name"] in self.events:
            raise ApiException(status=409)
        self.events[manifest["metadata"]["name"]] = manifest


@pytest.fixture
def kube(monkeypatch) -> FakeKube:
    fake = FakeKube()
    monkeypatch.setattr(handlers.kubernetes.client, "CustomObjectsApi", lambda: fake)
    monkeypatch.setattr(handlers, "_core", lambda: fake)
    return fake


def worker_pod(state: dict, last: dict | None = None, restarts: int = 0) -> dict:
    return {"metadata": {"name": "digits-worker-abc", "namespace": "ml", "uid": "pod-1",
                         "labels": {builders.EXPERIMENT_LABEL: "digits", builders.COMPONENT_LABEL: "worker"}},
            "spec": {"containers": [{"name": "worker", "resources": {"limits": {"memory": "512Mi"}}}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "worker", "restartCount": restarts, "state": state, "lastState": last or {}}]}}


def test_an_oom_killed_worker_container_gets_one_warning_event_on_its_experiment(kube):
    memo: dict = {}
    dead = worker_pod(OOM, restarts=0)
    restarted = worker_pod({"running": {}}, OOM, restarts=1)
    for pod in (dead, dead, restarted, restarted):  # the watch shows the same kill several times
        handlers.post_oom_events(pod, memo, LOG)

    [event] = kube.events.values()
    assert event["type"] == "Warning" and event["reason"] == "WorkerOOMKilled"
    assert event["involvedObject"]["name"] == "digits" and event["involvedObject"]["uid"] == "cr-uid-1"
    assert "OOMKilled" in event["message"] and "512Mi" in event["message"]
    assert kube.creates == 1  # the memo keeps later watch events from posting again


def test_a_second_kill_gets_its_own_event_and_a_new_operator_posts_none_twice(kube):
    handlers.post_oom_events(worker_pod({"running": {}}, OOM, restarts=1), {}, LOG)
    # An operator restarted with an empty memo sees the same kill: the API server's 409, no second Event.
    handlers.post_oom_events(worker_pod({"running": {}}, OOM, restarts=1), {}, LOG)
    assert len(kube.events) == 1
    handlers.post_oom_events(worker_pod({"running": {}}, OOM, restarts=2), {}, LOG)
    assert len(kube.events) == 2


def test_no_event_without_an_oom_kill_or_without_the_experiment(kube):
    handlers.post_oom_events(worker_pod({"running": {}}), {}, LOG)
    other = worker_pod({"running": {}}, {"terminated": {"reason": "Error", "exitCode": 1}}, restarts=1)
    handlers.post_oom_events(other, {}, LOG)
    kube.experiment_exists = False
    handlers.post_oom_events(worker_pod(OOM), {}, LOG)
    assert kube.events == {}


def test_the_pod_handler_posts_the_event_even_for_a_pod_already_reported_gone(kube, monkeypatch):
    monkeypatch.setattr(handlers, "report_pod_lost", lambda *args, **kwargs: None)
    handlers.handle_worker_pod("MODIFIED", worker_pod(OOM), {"reported_gone": True}, LOG)
    assert [e["reason"] for e in kube.events.values()] == ["WorkerOOMKilled"]
