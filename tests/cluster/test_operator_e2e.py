"""The operator end to end on the real node: `helm install` of the real chart, the kopf operator,
the masters and the workers as containers from the images the suite builds (issue 5, acceptance
1-4, 7; issue 14 item 4).

One operator (conftest's `operator` fixture) serves the whole module (installed once, uninstalled
at the end); each test runs its experiments in its own namespace. Experiments that train digits
for real run the `morphml-worker` image (`worker_image`); the others run `sleep_epochs` trials of a
known length in the test image (`quick_trials`). Imports: pytest, PyYAML, the standard library,
morphml_operator, tests.cluster.operator_trials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from .operator_trials import (
    EVALUATOR,
    WORKER_RESOURCES,
    finished_once,
    image,
    journal_file,
    next_lease,
    read_journal,
)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "morphml"
DIGITS = ROOT / "examples" / "digits.yaml"
OWNED_KINDS = ("pods,deployments,replicasets,services,secrets,configmaps,persistentvolumeclaims,serviceaccounts,"
               "networkpolicies")


#: Workers that train digits with torch: the test's small requests, room for torch's memory.
TRAINING_RESOURCES = {"requests": dict(WORKER_RESOURCES["requests"]), "limits": {"memory": "3Gi"}}


def digits(name: str = "digits", worker_image: str | None = None, **changes) -> dict:
    """examples/digits.yaml with `changes` merged into its spec (one level deep); its workers run
    `worker_image` (default: the worker image, so the test must request `worker_image`)."""
    manifest = yaml.safe_load(DIGITS.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"].setdefault("workers", {}).update(
        {"image": worker_image or image("worker"), "resources": TRAINING_RESOURCES})
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest["spec"].get(key), dict):
            manifest["spec"][key].update(value)
        else:
            manifest["spec"][key] = value
    return manifest


def operator_log(kube, operator) -> str:
    """The log of the operator pod running now (a test may have replaced the fixture's pod)."""
    namespace, pod = operator
    live = [p["metadata"]["name"] for p in kube.pods(namespace, "app.kubernetes.io/component=operator")
            if not p["metadata"].get("deletionTimestamp")]
    return kube.pod_log(namespace, pod if pod in live or not live else live[0])[-6000:]


def experiment(kube, namespace: str, name: str) -> dict:
    return kube.kubectl_json("get", "nasexperiment", name, "-n", namespace)


def wait_status(kube, operator, namespace, name, predicate, timeout, message):
    try:
        return kube.wait_for(lambda: predicate(experiment(kube, namespace, name).get("status", {})),
                             timeout, 1.0, message)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None


def owned_objects(kube, namespace: str, name: str) -> list[str]:
    items = kube.kubectl_json("get", OWNED_KINDS, "-n", namespace, "-l", f"morphml.io/experiment={name}")["items"]
    return [f"{i['kind']}/{i['metadata']['name']}" for i in items]


@pytest.mark.timeout(240)
def test_helm_install_runs_the_operator_as_a_ready_pod_of_the_node(kube, operator):
    namespace, pod_name = operator
    pod = kube.kubectl_json("get", "pod", pod_name, "-n", namespace)
    assert kube.pod_ready(pod)
    if kube.node is not None:
        assert pod["spec"]["nodeName"] == kube.node.name
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["kopf"] and "--module=morphml_operator.handlers" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_digits_goes_pending_running_succeeded_and_frees_its_workers(kube, operator, worker_image, kube_namespace):
    ns = kube_namespace
    manifest = digits(optimizer={"populationSize": 4, "generations": 2, "elitism": 1, "tournamentSize": 2},
                      budget={"maxTrials": 6, "maxFailedTrials": 2}, evaluation={"epochs": 6})
    kube.apply(manifest, ns)
    phases: list[str] = []

    def record(status):
        phase = status.get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        return phase == "Succeeded"

    wait_status(kube, operator, ns, "digits", record, 480, "digits to succeed")
    assert phases[-1] == "Succeeded" and "Running" in phases, phases
    assert phases.index("Running") < phases.index("Succeeded")
    assert set(phases) <= {"Pending", "Running", "Succeeded"}, phases

    status = experiment(kube, ns, "digits")["status"]
    assert status["trials"]["done"] == 6 and status["trialsSummary"] == "6/6"
    assert status["best"]["metric"] == "val_accuracy" and status["best"]["value"] >= 0.9, status["best"]
    assert status["startTime"] <= status["completionTime"]
    assert status["observedGeneration"] == experiment(kube, ns, "digits")["metadata"]["generation"]

    # GPUs (here CPUs) are freed: workers at 0 and their pods gone; the master pod stays (it serves
    # the results, `morphml results`) and the journal claim is kept.
    kube.wait_for(lambda: kube.kubectl_json("get", "deployment", "digits-worker", "-n", ns)["spec"]["replicas"] == 0,
                  30, 0.5, "workers scaled to 0")
    kube.wait_for(lambda: not kube.pods(ns, "morphml.io/experiment=digits,app.kubernetes.io/component=worker"),
                  90, 1.0, "the worker pods to go")
    masters = kube.pods(ns, "morphml.io/experiment=digits,app.kubernetes.io/component=master")
    assert [p["metadata"]["name"] for p in masters if kube.pod_ready(p)] == ["digits-master"], masters
    assert kube.kubectl_json("get", "pvc", "digits-journal", "-n", ns)["metadata"]["name"] == "digits-journal"

    def printed_table():
        # The Workers column follows the Deployment's ready count, which the operator reads on
        # its next status tick after the pods are gone.
        lines = kube.kubectl("get", "nasexperiments", "-n", ns).stdout.splitlines()
        return lines if len(lines) > 1 and lines[1].split()[2:3] == ["0/0"] else None

    table = kube.wait_for(printed_table, 30, 0.5, "the printed Workers column to reach 0/0")
    assert table[0].split() == ["NAME", "PHASE", "WORKERS", "TRIALS", "BEST", "AGE"]
    row = table[1].split()
    assert row[:4] == ["digits", "Succeeded", "0/0", "6/6"], table
    assert float(row[4]) >= 0.9, table

    events = kube.kubectl_json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=digits")["items"]
    reasons = {e["reason"] for e in events}
    assert {"Started", "NewBest", "Succeeded"} <= reasons, reasons


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_scale_to_three_workers_registers_three_and_delete_removes_everything(kube, operator, kube_namespace):
    ns = kube_namespace
    # A budget it will not reach while the test looks; one short epoch per trial.
    manifest = quick_trials("scaled", 2, budget={"maxTrials": 500, "maxFailedTrials": 50},
                            optimizer={"populationSize": 20, "generations": 100, "elitism": 1, "tournamentSize": 2},
                            workers={"replicas": 1})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "scaled", lambda s: s.get("phase") == "Running", 180, "the search to run")

    kube.kubectl("scale", "nasexperiment", "scaled", "--replicas", "3", "-n", ns)
    kube.wait_for(lambda: kube.kubectl_json("get", "deployment", "scaled-worker", "-n", ns)["spec"]["replicas"] == 3,
                  30, 0.5, "the worker Deployment to have 3 replicas")
    status = wait_status(kube, operator, ns, "scaled",
                         lambda s: s if (s.get("workers") or {}).get("registered") == 3 else None,
                         180, "three workers registered with the master")
    assert status["workers"]["desired"] == 3
    assert status["workersSummary"].endswith("/3")
    worker_pods = kube.pods(ns, "morphml.io/experiment=scaled,app.kubernetes.io/component=worker")
    assert len([p for p in worker_pods if not p["metadata"].get("deletionTimestamp")]) == 3

    assert sorted(owned_objects(kube, ns, "scaled")) != []
    kube.kubectl("delete", "nasexperiment", "scaled", "-n", ns, "--wait=true", timeout=120)
    kube.wait_for(lambda: owned_objects(kube, ns, "scaled") == [], 120, 1.0,
                  "every object the experiment owned to be deleted")


@pytest.mark.timeout(300)
def test_gpu_experiment_worker_requests_a_gpu_and_is_scheduled(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = quick_trials("gpu", 2, workers={"replicas": 1, "gpusPerWorker": 1},
                            budget={"maxTrials": 500, "maxFailedTrials": 50})
    kube.apply(manifest, ns)
    selector = "morphml.io/experiment=gpu,app.kubernetes.io/component=worker"

    def scheduled_worker():
        pods = [p for p in kube.pods(ns, selector) if not p["metadata"].get("deletionTimestamp")]
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    try:
        pod = kube.wait_for(scheduled_worker, 120, 0.5, "the GPU worker pod to be scheduled")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None
    resources = pod["spec"]["containers"][0]["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1" and str(resources["limits"]["nvidia.com/gpu"]) == "1"
    if kube.node is not None:
        assert pod["spec"]["nodeName"] == kube.node.name
    assert pod["spec"]["containers"][0]["args"][-4:-2] == ["--gpus", "1"]
    kube.kubectl("delete", "nasexperiment", "gpu", "-n", ns, "--wait=true", timeout=120)


def count_owned(kube, namespace: str, name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in owned_objects(kube, namespace, name):
        kind = entry.split("/")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_operator_restart_duplicates_nothing_and_suspend_resume_move_the_workers(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = quick_trials("longrun", 2, budget={"maxTrials": 500, "maxFailedTrials": 50},
                            optimizer={"populationSize": 20, "generations": 100, "elitism": 1, "tournamentSize": 2},
                            workers={"replicas": 2})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "longrun", lambda s: (s.get("trials") or {}).get("done", 0) >= 1, 240,
                "a first finished trial")

    # The operator pod is replaced (kopf resumes every experiment): still one of everything.
    operator_ns, operator_pod = operator
    operator_deleted_at = time.time()
    kube.kubectl("delete", "pod", operator_pod, "-n", operator_ns, "--wait=true", timeout=90)
    pods = kube.wait_pods_ready(operator_ns, "app.kubernetes.io/component=operator", 1, timeout=90)
    operator = (operator_ns, pods[0]["metadata"]["name"])
    before = experiment(kube, ns, "longrun")["status"]["trials"]["done"]
    wait_status(kube, operator, ns, "longrun", lambda s: s["trials"]["done"] > before, 120,
                "progress seen by the new operator")
    print(f"\noperator pod deleted: the new operator's status shows progress after "
          f"{time.time() - operator_deleted_at:.1f} s")
    counts = count_owned(kube, ns, "longrun")
    assert {k: counts.get(k, 0) for k in ("Secret", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment",
                                          "ServiceAccount", "NetworkPolicy")} == {
        "Secret": 1, "ConfigMap": 1, "PersistentVolumeClaim": 1, "Service": 1, "Deployment": 1, "ServiceAccount": 1,
        "NetworkPolicy": 1}
    masters = [p for p in kube.pods(ns, "morphml.io/experiment=longrun,app.kubernetes.io/component=master")
               if not p["metadata"].get("deletionTimestamp")]
    assert len(masters) == 1

    # Suspend: workers to 0, phase Suspended; resume: back to 2 and Running.
    kube.kubectl("patch", "nasexperiment", "longrun", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_status(kube, operator, ns, "longrun",
                lambda s: s.get("phase") == "Suspended" and s["workers"]["desired"] == 0, 60, "Suspended")
    assert kube.kubectl_json("get", "deployment", "longrun-worker", "-n", ns)["spec"]["replicas"] == 0
    kube.kubectl("patch", "nasexperiment", "longrun", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_status(kube, operator, ns, "longrun",
                lambda s: s.get("phase") == "Running" and s["workers"]["ready"] == 2, 120, "Running with 2 workers")
    reasons = {e["reason"] for e in kube.kubectl_json("get", "events", "-n", ns,
                                                      "--field-selector", "involvedObject.name=longrun")["items"]}
    assert {"Started", "Suspended", "Resumed"} <= reasons, reasons
    assert "WorkerLost" not in reasons, reasons  # suspending stops workers on purpose

    # The master pod deleted: a new one resumes from the journal; the Trials column never goes back.
    selector = "morphml.io/experiment=longrun,app.kubernetes.io/component=master"
    old_uid = kube.pods(ns, selector)[0]["metadata"]["uid"]
    done_before = experiment(kube, ns, "longrun")["status"]["trials"]["done"]
    master_deleted_at = time.time()
    kube.kubectl("delete", "pod", "longrun-master", "-n", ns, "--wait=false")
    shown: list[int] = []

    def resumed():
        shown.append(experiment(kube, ns, "longrun")["status"]["trials"]["done"])
        fresh = [p for p in kube.pods(ns, selector) if p["metadata"]["uid"] != old_uid and kube.pod_ready(p)]
        return fresh and shown[-1] > done_before

    try:
        kube.wait_for(resumed, 180, 1.0, "a new master pod that resumes the search")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator_log(kube, operator)}") from None
    print(f"master pod deleted: a new master resumed and the status showed new progress after "
          f"{time.time() - master_deleted_at:.1f} s (done {done_before} -> {shown[-1]})")
    assert shown == sorted(shown), f"done trials went backwards: {shown}"
    master_log = kube.pod_log(ns, "longrun-master")
    assert "restored" in master_log, master_log[-2000:]
    # None ran twice after its finish was journaled: one accepted result per trial, across both masters.
    journal = read_journal(journal_file(kube, ns, "longrun"))
    finished, twice = finished_once(journal)
    assert twice == [] and len(finished) >= done_before, (twice, len(finished), done_before)
    kube.kubectl("delete", "nasexperiment", "longrun", "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_raising_the_budget_of_a_running_search_extends_it(kube, operator, kube_namespace):
    ns = kube_namespace
    manifest = quick_trials("extended", 3, budget={"maxTrials": 8, "maxFailedTrials": 4},
                            optimizer={"populationSize": 4, "generations": 10, "elitism": 1, "tournamentSize": 2})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "extended", lambda s: s.get("phase") == "Running", 240, "Running")
    kube.kubectl("patch", "nasexperiment", "extended", "-n", ns, "--type=merge",
                 "-p", '{"spec":{"budget":{"maxTrials":12}}}')
    status = wait_status(kube, operator, ns, "extended",
                         lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None, 420, "the end")
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == 12 and status["trialsSummary"] == "12/12", status["trials"]
    reasons = {e["reason"] for e in kube.kubectl_json("get", "events", "-n", ns,
                                                      "--field-selector", "involvedObject.name=extended")["items"]}
    assert "MasterRestarting" in reasons, reasons
    restarting = kube.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                   "involvedObject.name=extended,reason=MasterRestarting")["items"]
    assert [e["message"].split()[0] for e in restarting] == ["spec.budget"], restarting


def master_status_reader(kube, ns: str, name: str):
    """A function returning the master's GetStatus (as a dict), called with the experiment's token."""
    import base64

    from morphml_operator.master_client import get_master_status

    token = base64.b64decode(kube.kubectl_json("get", "secret", f"{name}-token", "-n", ns)["data"]["token"]).decode()

    def read() -> dict:
        pod = kube.kubectl_json("get", "pod", f"{name}-master", "-n", ns)
        return get_master_status(f"{pod['status']['podIP']}:50051", token)

    return read


def quick_trials(name: str, seconds: int, evaluator: str = EVALUATOR, **changes) -> dict:
    """digits.yaml with the `sleep_epochs` evaluator (or `evaluator`) in the test image: each trial
    takes `seconds` s, no torch. `workers.resources` in `changes` replaces the small default."""
    workers = dict(changes.pop("workers", {}))
    workers = {"resources": WORKER_RESOURCES, **workers}
    manifest = digits(name, worker_image=image("testworker"), **changes)
    manifest["spec"]["workers"].update(workers)
    manifest["spec"]["evaluation"].update({"epochs": seconds, "evaluator": evaluator})
    return manifest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_pod_deleted_mid_trial_is_re_leased_via_pod_gone_within_two_seconds(kube, operator, kube_namespace):
    """Acceptance 1 (issue 6): measured from the master's journal, not from the test's view."""
    ns = kube_namespace
    # Generational GA, 3 per generation, 4 workers: one worker is always free to take the re-lease
    # at once (with every worker busy a re-leased trial waits for a free slot, by design).
    trial_seconds = 6
    manifest = quick_trials("podloss", trial_seconds, workers={"replicas": 4},
                            optimizer={"populationSize": 3, "generations": 10, "elitism": 0, "tournamentSize": 2},
                            budget={"maxTrials": 9, "maxFailedTrials": 2})
    kube.apply(manifest, ns)
    wait_status(kube, operator, ns, "podloss", lambda s: s.get("phase") == "Running", 180, "Running")
    master_status = master_status_reader(kube, ns, "podloss")

    path = journal_file(kube, ns, "podloss")

    def young_lease_and_a_free_worker():
        status = master_status()
        alive = [w for w in status["workers"] if w["state"] not in ("dead", "registering")]
        busy = [w for w in alive if w["running"]]
        if len(alive) != 4 or len(busy) != 3:
            return None
        leased_at = {(a["task_id"], a["attempt"]): a["leased_at"] for a in read_journal(path)["attempts"]}
        for worker in busy:
            lease = worker["running"][0]
            age = time.time() - leased_at.get((lease["task_id"], lease["attempt"]), 0)
            if age < 2.0:
                return worker, lease
        return None

    chosen, lease = kube.wait_for(young_lease_and_a_free_worker, 120, 0.2,
                                  "3 workers busy with a trial leased < 2 s ago, 1 worker free")
    victim = chosen["worker_name"]
    time.sleep(1.0)  # well into the trial (6 s), well before its end
    deleted_at = time.time()
    kube.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")

    status = wait_status(kube, operator, ns, "podloss",
                         lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None, 180, "the search to end")
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == 9 and status["trialsSummary"] == "9/9", status["trials"]

    journal = read_journal(journal_file(kube, ns, "podloss"))
    victim_attempt = next(a for a in journal["attempts"]
                          if a["task_id"] == lease["task_id"] and a["attempt"] == lease["attempt"])
    assert victim_attempt["worker_name"] == victim
    assert victim_attempt["leased_at"] < deleted_at < victim_attempt["leased_at"] + trial_seconds, victim_attempt
    requeue = next(r for r in journal["requeues"]
                   if r["task_id"] == lease["task_id"] and r["attempt"] == lease["attempt"])
    assert requeue["detected_by"] == "pod_gone", requeue
    relet = next_lease(journal, lease["task_id"], lease["attempt"])
    assert relet is not None and relet["worker_name"] != victim, journal["attempts"]
    latency = relet["leased_at"] - deleted_at
    print(f"\npod deleted mid-trial: detected via {requeue['detected_by']} after "
          f"{requeue['detected_at'] - deleted_at:.3f} s, re-leased to {relet['worker_name']} after {latency:.3f} s")
    assert 0 <= requeue["detected_at"] - deleted_at <= latency <= 2.0, (requeue, relet, deleted_at)

    finished, twice = finished_once(journal)
    assert twice == [], f"trials finished more than once: {twice}"
    assert [r for r in journal["results"] if not r["ok"]] == []  # no retry used up by the pod's loss
    assert len(finished) == 9 and lease["task_id"] in finished
    assert {t["state"] for t in journal["tasks"]} == {"succeeded"}, journal["tasks"]
    # The victim's own attempt never counted (its late result, if any, is recorded as stale).
    assert not [r for r in journal["results"] if r["task_id"] == lease["task_id"]
                and r["attempt"] == lease["attempt"] and r["disposition"] == "accepted"]
    kube.kubectl("delete", "nasexperiment", "podloss", "-n", ns, "--wait=true", timeout=120)


def live_lease(master_status) -> tuple[dict, dict] | None:
    """(a worker running a trial, that trial's lease) from the master's status."""
    for worker in master_status()["workers"]:
        if worker["state"] != "dead" and worker["running"]:
            return worker, worker["running"][0]
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rogue_worker_without_the_token_is_refused_on_the_cluster(kube, operator, kube_namespace, tmp_path):
    """Acceptance 5 (issue 6): a process started by the test against the master pod's address."""
    import subprocess
    import sys

    import grpc

    from morphml.distributed.proto import worker_pb2 as pb
    from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

    ns = kube_namespace
    kube.apply(quick_trials("guarded", 8, workers={"replicas": 1}, optimizer={"algorithm": "random", "seed": 3},
                            budget={"maxTrials": 3, "maxFailedTrials": 1}), ns)
    wait_status(kube, operator, ns, "guarded", lambda s: s.get("phase") == "Running", 180, "Running")
    master_status = master_status_reader(kube, ns, "guarded")
    _, lease = kube.wait_for(lambda: live_lease(master_status), 60, 0.2, "a trial running")
    address = f"{kube.kubectl_json('get', 'pod', 'guarded-master', '-n', ns)['status']['podIP']}:50051"

    bad = tmp_path / "token"
    bad.write_text("not-the-experiment-token\n")
    env = {k: v for k, v in os.environ.items() if k != "MORPHML_TOKEN"}
    wrong = subprocess.run([sys.executable, "-m", "morphml.cli", "worker", "--master", address, "--name", "rogue",
                            "--token-file", str(bad)], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "UNAUTHENTICATED" in wrong.stderr + wrong.stdout, wrong
    missing = subprocess.run([sys.executable, "-m", "morphml.cli", "worker", "--master", address, "--name", "rogue"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "MORPHML_TOKEN" in missing.stderr + missing.stdout, missing

    forged = pb.TrialResult(worker_id="rogue/1", worker_name="rogue", ok=True, metrics_json='{"val_accuracy": 1.0}',
                            lease=pb.LeaseRef(task_id=lease["task_id"], attempt=lease["attempt"]))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)
        for metadata in ((), (("authorization", "Bearer not-the-experiment-token"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ReportResult(forged, metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:
                stub.Register(pb.RegisterRequest(worker_name="rogue", slots=1), metadata=metadata, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = master_status()
    assert "rogue" not in {w["worker_name"] for w in status["workers"]}
    assert status["succeeded"] == 0 and status["running"] == 1, status  # the forged result counted nowhere
    kube.kubectl("delete", "nasexperiment", "guarded", "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_result_for_a_lease_held_by_another_worker_is_refused_even_with_the_token(kube, operator, kube_namespace):
    """Acceptance 5, second half: the token admits a process, it does not let it finish others' trials."""
    import base64

    import grpc

    from morphml.distributed.auth import token_metadata
    from morphml.distributed.proto import worker_pb2 as pb
    from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

    ns = kube_namespace
    kube.apply(quick_trials("forged", 8, workers={"replicas": 1}, optimizer={"algorithm": "random", "seed": 3},
                            budget={"maxTrials": 2, "maxFailedTrials": 1}), ns)
    wait_status(kube, operator, ns, "forged", lambda s: s.get("phase") == "Running", 180, "Running")
    master_status = master_status_reader(kube, ns, "forged")
    _, lease = kube.wait_for(lambda: live_lease(master_status), 60, 0.2, "a trial running")
    address = f"{kube.kubectl_json('get', 'pod', 'forged-master', '-n', ns)['status']['podIP']}:50051"
    token = base64.b64decode(kube.kubectl_json("get", "secret", "forged-token", "-n", ns)["data"]["token"]).decode()
    forged = pb.TrialResult(worker_id="rogue/1", worker_name="rogue", ok=True, metrics_json='{"val_accuracy": 1.0}',
                            lease=pb.LeaseRef(task_id=lease["task_id"], attempt=lease["attempt"]))
    with grpc.insecure_channel(address) as channel:
        try:
            ack = pb_grpc.MasterStub(channel).ReportResult(forged, metadata=token_metadata(token), timeout=5)
            disposition = ack.disposition
        except grpc.RpcError as error:
            disposition = error.code().name
    assert disposition != "accepted", "a result for another worker's lease was counted"
    status = master_status()
    assert status["succeeded"] == 0 and status["running"] == 1, status
    kube.kubectl("delete", "nasexperiment", "forged", "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_pod_unready_past_the_threshold_is_reported_gone(kube, operator, kube_namespace):
    """The unready path (issue 6): a worker that is alive, heartbeating and connected, but whose pod
    turned unready, loses its trials to the pod path after the operator's worker_unready_seconds (5).

    The pod is a real `morphml worker` container (the test image) with an exec readiness probe on a
    file in its /tmp that the test removes (`kubectl exec`): the process stays healthy, so neither
    the stream nor the heartbeats can be what fires.
    """
    ns = kube_namespace
    kube.apply(quick_trials("flaky", 30, workers={"replicas": 1}, optimizer={"algorithm": "random", "seed": 5},
                            budget={"maxTrials": 50, "maxFailedTrials": 5}), ns)
    wait_status(kube, operator, ns, "flaky", lambda s: s.get("phase") == "Running", 180, "Running")
    worker = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "flaky-extra-worker",
                     "labels": {"morphml.io/experiment": "flaky", "app.kubernetes.io/component": "worker"}},
        "spec": {
            "automountServiceAccountToken": False, "restartPolicy": "Always", "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "worker", "image": image("testworker"), "imagePullPolicy": "Never",
                "command": ["sh", "-c", 'touch /tmp/ready && exec morphml "$@"', "sh"],
                "args": ["worker", "--master", "flaky-master:50051", "--token-file", "/etc/morphml/token/token",
                         "--gpus", "0"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "HOME", "value": "/tmp"}],
                "resources": WORKER_RESOURCES,
                "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]},
                                   "periodSeconds": 1, "failureThreshold": 1},
                "volumeMounts": [{"name": "token", "mountPath": "/etc/morphml/token", "readOnly": True}],
            }],
            "volumes": [{"name": "token", "secret": {"secretName": "flaky-token"}}],
        },
    }
    kube.apply(worker, ns)
    master_status = master_status_reader(kube, ns, "flaky")

    def extra_worker_busy():
        pod = kube.kubectl_json("get", "pod", "flaky-extra-worker", "-n", ns)
        mine = [w for w in master_status()["workers"] if w["worker_name"] == "flaky-extra-worker" and w["running"]]
        return mine[0]["running"][0] if mine and kube.pod_ready(pod) else None

    lease = kube.wait_for(extra_worker_busy, 120, 0.3, "the extra worker Ready and running a trial")
    kube.kubectl("exec", "flaky-extra-worker", "-n", ns, "--", "rm", "/tmp/ready")
    unready_at = time.time()

    def loss():
        return next((lost for lost in master_status()["losses"] if lost["worker_name"] == "flaky-extra-worker"), None)

    recorded = kube.wait_for(loss, 60, 0.3, "the master to record the unready worker's loss")
    delay = recorded["detected_at"] - unready_at
    print(f"\nworker pod unready: reported gone via {recorded['detected_by']} {delay:.2f} s "
          "after its probe started failing")
    assert recorded["detected_by"] == "pod_gone", recorded
    assert {"task_id": lease["task_id"], "attempt": lease["attempt"]} in recorded["requeued"], recorded
    # Probe (1 s) + the operator's 5 s threshold (+1 s: lastTransitionTime has whole seconds) + slack.
    assert 4.0 <= delay <= 12.0, delay
    pod = kube.kubectl_json("get", "pod", "flaky-extra-worker", "-n", ns)
    assert not pod["metadata"].get("deletionTimestamp")  # nobody deleted it: the unready path fired
    kube.kubectl("delete", "pod", "flaky-extra-worker", "-n", ns, "--wait=false")
    kube.kubectl("delete", "nasexperiment", "flaky", "-n", ns, "--wait=true", timeout=120)
