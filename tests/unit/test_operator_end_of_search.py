"""What the operator does when a search ends (issue 12): the workers go to 0 at once, the master
pod stays and keeps serving (GetStatus, and the finished experiment's files for `morphml results`),
a master pod that goes away after the end is made again, and a finished experiment's master is not
restarted for its spec. Plus the master side: a master started on a finished journal reports the
terminal phase and leases nothing.

The handlers run against an in-memory fake of the CoreV1 / AppsV1 / NetworkingV1 APIs (objects
stored as the manifests the builders make, read back as the client's models), with GetStatus and
kopf's Event posting replaced; no cluster, no kopf loop.
Imports: pytest, kopf, kubernetes (models and ApiException only), morphml_operator, morphml.distributed.
"""

from __future__ import annotations

import base64
import copy
import logging
import re
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from morphml_operator import builders, handlers

pytestmark = pytest.mark.unit

NAME, NAMESPACE = "digits", "ml"
MODELS = {"service_account": "V1ServiceAccount", "secret": "V1Secret", "config_map": "V1ConfigMap",
          "persistent_volume_claim": "V1PersistentVolumeClaim", "service": "V1Service",
          "network_policy": "V1NetworkPolicy", "pod": "V1Pod", "deployment": "V1Deployment"}
CALL = re.compile(r"(read|create|delete|patch|replace)_namespaced_(\w+)")


class FakeApi:
    """CoreV1Api, AppsV1Api and NetworkingV1Api at once, for the calls the handlers make."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self._client = kubernetes.client.ApiClient()

    def model(self, kind: str, name: str) -> Any:
        return self._client._ApiClient__deserialize(copy.deepcopy(self.objects[(kind, name)]),  # type: ignore[attr-defined]
                                                    MODELS[kind])

    def __getattr__(self, attr: str) -> Any:
        match = CALL.fullmatch(attr)
        if not match or match.group(2) not in MODELS:
            raise AttributeError(attr)
        verb, kind = match.groups()

        def call(*args: Any, **_: Any) -> Any:
            if verb == "create":
                _namespace, manifest = args
                manifest = copy.deepcopy(manifest)
                name = manifest["metadata"]["name"]
                if (kind, name) in self.objects:
                    raise ApiException(status=409)
                if "stringData" in manifest:  # what the API server does with a Secret's stringData
                    manifest["data"] = {k: base64.b64encode(v.encode()).decode()
                                        for k, v in manifest.pop("stringData").items()}
                manifest["metadata"].update(uid=f"uid-{kind}-{len(self.calls)}", resourceVersion="1")
                self.objects[(kind, name)] = manifest
            else:
                name = args[0]
            self.calls.append((verb, kind, name))
            if (kind, name) not in self.objects:
                raise ApiException(status=404)
            if verb == "delete":
                del self.objects[(kind, name)]
                return None
            if verb == "patch":
                _merge(self.objects[(kind, name)], args[2])
            if verb == "replace":
                body = self._client.sanitize_for_serialization(args[2])
                self.objects[(kind, name)] = body
            return self.model(kind, name)

        return call

    def deleted(self, kind: str) -> list[str]:
        return [name for verb, k, name in self.calls if verb == "delete" and k == kind]


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


SPEC = {"budget": {"maxTrials": 4, "maxFailedTrials": 2}, "workers": {"replicas": 2},
        "evaluation": {"epochs": 1}, "objective": {"metric": "val_accuracy", "goal": "maximize"}}


def body() -> kopf.Body:
    return kopf.Body({"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment",
                      "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "uid-experiment", "generation": 1},
                      "spec": copy.deepcopy(SPEC)})


def master_answer(phase: str) -> dict:
    return {"phase": phase, "succeeded": 4 if phase == "Succeeded" else 1, "failed": 0, "stopped": 0,
            "running": 0 if phase == "Succeeded" else 1, "workers": [], "message": f"search {phase}",
            "best": {"trial_id": "t000002", "metric": 0.97, "summary": "conv32"}, "loss_seq": 0}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> dict:
    fake = FakeApi()
    asked: list[str] = []
    events: list[str] = []
    answer = {"phase": "Running"}
    monkeypatch.setattr(handlers, "_core", lambda: fake)
    monkeypatch.setattr(handlers, "_apps", lambda: fake)
    monkeypatch.setattr(handlers.kubernetes.client, "NetworkingV1Api", lambda: fake)
    monkeypatch.setattr(handlers, "get_master_status",
                        lambda address, *_, **__: asked.append(address) or master_answer(answer["phase"]))
    monkeypatch.setattr(handlers.kopf, "event", lambda _body, **kw: events.append(kw["reason"]))
    monkeypatch.setattr(handlers, "post_keyed_events", lambda *_: None)
    return {"fake": fake, "asked": asked, "events": events, "answer": answer}


def running_pod(fake: FakeApi, name: str, phase: str = "Running") -> None:
    pod = fake.objects[("pod", name)]
    pod["status"] = {"phase": phase, "podIP": "10.0.0.7"}


def tick(status: dict) -> dict:
    """One timer tick (`poll`) on an experiment with `status`; returns the status it writes."""
    patch = kopf.Patch()
    experiment = body()
    handlers.poll(body=experiment, spec=experiment["spec"], status=status, meta=experiment["metadata"], patch=patch,
                  logger=logging.getLogger("test"))
    return {**status, **dict(patch.get("status") or {})}


def deployment_replicas(fake: FakeApi) -> int:
    return int(fake.objects[("deployment", builders.worker_deployment_name(NAME))]["spec"]["replicas"])


def test_the_end_scales_the_workers_to_zero_and_keeps_the_master_serving(api):
    fake = api["fake"]
    status = tick({})  # first tick: everything made; the master pod has no IP yet
    running_pod(fake, builders.master_name(NAME))
    status = tick({**status, "phase": "Running"})
    assert status["phase"] == "Running" and deployment_replicas(fake) == 2

    api["answer"]["phase"] = "Succeeded"
    status = tick(status)
    assert status["phase"] == "Succeeded" and status["workers"]["desired"] == 0
    assert deployment_replicas(fake) == 0  # the GPUs are free at once
    assert fake.deleted("pod") == [] and ("pod", builders.master_name(NAME)) in fake.objects
    assert "Succeeded" in api["events"]

    # Later ticks: the master is still asked (status and results stay available), nothing changes.
    asked = len(api["asked"])
    status = tick(status)
    assert len(api["asked"]) == asked + 1
    assert status["phase"] == "Succeeded" and status["best"]["trialId"] == "t000002"
    master_ready = next(c for c in status["conditions"] if c["type"] == "MasterReady")
    assert master_ready["status"] == "True", master_ready
    assert fake.deleted("pod") == [] and deployment_replicas(fake) == 0


def test_a_master_pod_gone_after_the_end_is_made_again(api):
    fake = api["fake"]
    handlers.reconcile(body(), None)
    del fake.objects[("pod", builders.master_name(NAME))]  # deleted by hand, evicted, node lost
    owned = handlers.reconcile(body(), "Succeeded")
    assert ("pod", builders.master_name(NAME)) in fake.objects and owned["master_pod"] is not None
    assert deployment_replicas(fake) == 0


def test_an_ended_master_pod_after_the_end_is_replaced(api):
    fake = api["fake"]
    handlers.reconcile(body(), None)
    running_pod(fake, builders.master_name(NAME), phase="Failed")  # e.g. evicted
    handlers.reconcile(body(), "Failed")
    assert fake.deleted("pod") == [builders.master_name(NAME)]
    handlers.reconcile(body(), "Failed")
    assert ("pod", builders.master_name(NAME)) in fake.objects


def test_a_finished_experiments_master_is_not_restarted_for_its_spec(api):
    fake = api["fake"]
    handlers.reconcile(body(), None)
    # A master made from other budget/faultTolerance/master sections (or by an older operator).
    del fake.objects[("pod", builders.master_name(NAME))]["metadata"]["annotations"][builders.MASTER_SPEC_ANNOTATION]
    handlers.reconcile(body(), "Succeeded")
    assert fake.deleted("pod") == []
    owned = handlers.reconcile(body(), "Running")  # while the search runs, it is restarted
    assert fake.deleted("pod") == [builders.master_name(NAME)] and owned["master_pod"] is None
    assert "MasterRestarting" in api["events"]


class OneShotOptimizer:
    """Ask/tell with a fixed number of candidates (the coordinator's optimizer contract)."""

    def __init__(self, total: int = 3) -> None:
        self.total, self.next, self.told = total, 0, []

    def ask(self, n: int) -> list:
        out = []
        while len(out) < n and self.next < self.total:
            graph = type("Graph", (), {"arch_hash": f"h{self.next}", "to_json": lambda self: {"nodes": [], "edges": []},
                                       "summary": lambda self: "arch"})()
            out.append(type("Candidate", (), {"id": f"c{self.next}", "graph": graph, "generation": 0})())
            self.next += 1
        return out

    def tell(self, candidate_id: str, metrics: dict) -> None:
        self.told.append(candidate_id)

    def is_finished(self) -> bool:
        return self.next >= self.total

    def state_dict(self) -> dict:
        return {"next": self.next, "told": list(self.told)}

    def load_state_dict(self, state: dict) -> None:
        self.next, self.told = state["next"], list(state["told"])


def test_a_master_started_on_a_finished_journal_reports_the_end_and_leases_nothing(tmp_path):
    from morphml.distributed.clock import ManualClock
    from morphml.distributed.coordinator import (
        ExperimentCoordinator,
        ExperimentSettings,
        LeaseMessage,
        ShutdownMessage,
    )
    from morphml.distributed.journal import Journal

    def coordinator() -> ExperimentCoordinator:
        return ExperimentCoordinator(OneShotOptimizer(), ExperimentSettings(max_trials=1), Journal(tmp_path / "j.db"),
                                     ManualClock())

    first = coordinator()
    worker_id, _ = first.register("w", 0, 1)
    lease = first.connect(worker_id).get_nowait()
    assert isinstance(lease, LeaseMessage)
    assert first.report_result(lease.task_id, lease.attempt, True, {"val_accuracy": 0.9}) == "accepted"
    assert first.done and first.phase == "Succeeded"
    first.journal.close()

    again = coordinator()  # the master pod made again after the end, on the same claim
    assert again.done and again.phase == "Succeeded" and again.status()["phase"] == "Succeeded"
    assert again.succeeded == 1 and again.best.task_id == lease.task_id
    worker_id, _ = again.register("w2", 0, 1)
    box = again.connect(worker_id)
    sent = [box.get_nowait() for _ in range(box.qsize())]
    assert [type(m) for m in sent] == [ShutdownMessage], sent  # told to go, not given a trial
    assert list(again.leases.tasks) == [lease.task_id]
    again.journal.close()
