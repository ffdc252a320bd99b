"""The operator end to end on the real node (issue 14, acceptance 2; item 5's NetworkPolicy test):
``helm install`` of the real chart, the operator as a pod from the ``morphml-master`` image built in
this run, a short digits experiment whose master and workers run as containers from the
``morphml-master`` / ``morphml-worker`` images, to Succeeded with each trial counted once in the
journal; then (issue 12, acceptance 6) `morphml results` fetches its trained best model, which
scores its recorded val_accuracy.

The images come from ``tests.cluster.images`` (built if the tree changed, then imported into the
node's containerd: the worker archive, ~3 GB with torch, takes minutes), once per session
(conftest's ``morphml_images``, ``worker_image``; the chart from its ``operator`` fixture). The
journal claim is bound by the suite's hostPath volume binder (``tests.cluster.provisioner``): the
node has no provisioner.

Imports: pytest, PyYAML, the standard library, this package's modules.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import images
from .kube import Kube
from .operator_trials import finished_once, image, journal_file, read_journal
from .results_check import assert_best_model_scores_its_recorded_accuracy, fetch_results_with_the_cli, trials_rows

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "morphml"
DIGITS = ROOT / "examples" / "digits.yaml"
MASTER_PORT = 50051
METRICS_PORT = 9464
#: Small requests: the node has the machine's CPUs (2 here), and the default worker asks for one each.
WORKER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "3Gi"}}


def digits(name: str, trials: int, epochs: int = 1) -> dict[str, Any]:
    """examples/digits.yaml, shortened: ``trials`` trials of ``epochs`` epochs on 2 CPU workers."""
    manifest: dict[str, Any] = yaml.safe_load(DIGITS.read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["optimizer"].update({"populationSize": trials, "generations": 1, "elitism": 1, "tournamentSize": 2})
    spec["evaluation"]["epochs"] = epochs
    spec["budget"] = {"maxTrials": trials, "maxFailedTrials": 2}
    # The worker image by name: the chart's default tag is computed from the tree when the chart is
    # installed, and the tree may change (other work in progress) before the image is built.
    spec["workers"] = {"replicas": 2, "gpusPerWorker": 0, "resources": WORKER_RESOURCES, "image": image("worker")}
    return manifest


@pytest.fixture(scope="module")
def built_images(morphml_images: dict[str, images.BuiltImage],
                 worker_image: images.BuiltImage) -> dict[str, images.BuiltImage]:
    """Both images from the Dockerfiles, built (or cached) for this tree, in the node's containerd."""
    return {"master": morphml_images["master"], "worker": worker_image}


def _status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.kubectl_json("get", "nasexperiment", name, "-n", ns).get("status", {})
    return status


def _ended(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    status = _status(kube, ns, name)
    return status if status.get("phase") in ("Succeeded", "Failed") else None


def _running_pods(kube: Kube, ns: str, selector: str) -> list[dict[str, Any]]:
    return [p for p in kube.pods(ns, selector) if not p["metadata"].get("deletionTimestamp")
            and p["status"].get("phase") == "Running"
            and all(c.get("state", {}).get("running") for c in p["status"].get("containerStatuses", [{}]))]


def _container_images(kube: Kube, pods: list[dict[str, Any]]) -> dict[str, str]:
    """pod name -> the image containerd runs its (first) container from, read from ``ctr containers list``."""
    listing = kube.node.ctr("containers", "list")  # type: ignore[attr-defined]
    by_id = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) >= 2}
    out = {}
    for pod in pods:
        container_id = pod["status"]["containerStatuses"][0]["containerID"].split("//", 1)[1]
        out[pod["metadata"]["name"]] = by_id.get(container_id, f"<{container_id} not in ctr containers list>")
    return out


def _exec(kube: Kube, ns: str, pod: str, *args: str) -> tuple[int, str]:
    done = kube.kubectl("exec", pod, "-n", ns, "--", "/testbox", *args, check=False, timeout=30)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_digits_succeeds_with_operator_master_and_workers_running_from_the_built_images(
        real_kube: Kube, operator: tuple[str, str], built_images: dict[str, images.BuiltImage],
        real_namespace: str, tmp_path: Path) -> None:
    kube, ns = real_kube, real_namespace
    op_ns, op_pod = operator
    trials = 4
    t0 = time.monotonic()
    manifest = digits("digits", trials)
    kube.apply(manifest, ns)
    timings: dict[str, float] = {}

    # While it runs: the operator, the master and both workers are containers from the built images.
    def all_running() -> list[dict[str, Any]] | None:
        master = _running_pods(kube, ns, "morphml.io/experiment=digits,app.kubernetes.io/component=master")
        workers = _running_pods(kube, ns, "morphml.io/experiment=digits,app.kubernetes.io/component=worker")
        return master + workers if len(master) == 1 and len(workers) == 2 else None

    pods = kube.wait_for(all_running, 300, 0.5, "the master and 2 worker pods running")
    timings["pods_running"] = time.monotonic() - t0
    operator_pod = kube.kubectl_json("get", "pod", op_pod, "-n", op_ns)
    running = _container_images(kube, [operator_pod, *pods])
    master_ref, worker_ref = built_images["master"].ref, built_images["worker"].ref
    assert running[op_pod] == master_ref, running
    for pod in pods:
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        assert running[pod["metadata"]["name"]] == (master_ref if component == "master" else worker_ref), running
    assert master_ref.split("/")[-1].startswith("morphml-master:") and worker_ref.split("/")[-1].startswith(
        "morphml-worker:")

    kube.wait_for(lambda: (_status(kube, ns, "digits").get("workers") or {}).get("registered") == 2, 300, 0.5,
                  "both workers registered with the master")
    timings["workers_registered"] = time.monotonic() - t0
    status = kube.wait_for(lambda: _ended(kube, ns, "digits"), 600, 1.0, "digits to end")
    timings["succeeded"] = time.monotonic() - t0
    print(f"\nmorphml: digits ({trials} trials x 1 epoch, 2 workers) from apply: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == trials and status["trialsSummary"] == f"{trials}/{trials}", status
    assert status["best"]["metric"] == "val_accuracy" and 0 < status["best"]["value"] <= 1, status["best"]

    # The journal, on the hostPath volume: each trial finished (accepted) exactly once.
    journal = read_journal(journal_file(kube, ns, "digits"))
    accepted, twice = finished_once(journal)
    assert len(accepted) == trials and twice == [], journal["results"]
    assert journal["phase"] == "Succeeded", journal["phase"]

    # Issue 12, acceptance 6 (cluster): the documented command fetches the trained best model of
    # the finished experiment (its master still serves after the end), and it scores what the
    # trial recorded on the validation split.
    out = tmp_path / "runs" / "digits"
    t1 = time.monotonic()
    fetched = fetch_results_with_the_cli(kube, ns, "digits", out)
    print(f"morphml results digits: {time.monotonic() - t1:.1f} s", flush=True)
    assert "digits" in fetched and "Succeeded" in fetched, fetched
    doc = assert_best_model_scores_its_recorded_accuracy(out, manifest["spec"]["evaluation"])
    assert doc["trial_id"] == status["best"]["trialId"], (doc, status["best"])
    assert doc["metrics"]["val_accuracy"] == pytest.approx(status["best"]["value"], abs=1e-12)
    rows = trials_rows(out)
    assert sorted(r["trial_id"] for r in rows) == sorted(accepted), rows
    assert {r["status"] for r in rows} == {"succeeded"}, rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_experiments_network_policy_blocks_other_pods_from_the_master_port(
        real_kube: Kube, operator: tuple[str, str], real_namespace: str) -> None:
    kube, ns = real_kube, real_namespace
    # A budget it will not reach while the test looks.
    kube.apply(digits("guarded", 200), ns)
    testbox = kube.node.images["testbox"]  # type: ignore[attr-defined]
    worker_labels = {"morphml.io/experiment": "guarded", "app.kubernetes.io/component": "worker"}
    for name, labels in (("intruder", {"app": "intruder"}), ("lookalike", worker_labels)):
        kube.apply({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "spec": {"terminationGracePeriodSeconds": 1,
                             "containers": [{"name": "main", "image": testbox, "imagePullPolicy": "Never",
                                             "args": ["sleep", "3600"]}]}})
    kube.wait_for(lambda: (_status(kube, ns, "guarded").get("workers") or {}).get("registered") == 2, 300, 0.5,
                  "both workers registered with the master (they reach its port)")
    master = _running_pods(kube, ns, "morphml.io/experiment=guarded,app.kubernetes.io/component=master")[0]
    master_ip = master["status"]["podIP"]
    kube.wait_for(lambda: len(_running_pods(kube, ns, "app=intruder")) == 1, 60, 0.3, "the intruder pod running")
    kube.wait_for(lambda: len(_running_pods(kube, ns, "morphml.io/experiment=guarded,"
                                            "app.kubernetes.io/component=worker")) == 3, 60, 0.3, "the lookalike")
    # The intruder has a network: the master's metrics port (open to anyone) answers it with metrics.
    code, out = _exec(kube, ns, "intruder", "get", f"http://{master_ip}:{METRICS_PORT}/metrics")
    assert code == 0 and "morphml_" in out, out
    # ...but not the gRPC port; a pod with the workers' labels connects to it.
    # (kube-router programs the policy a moment after it appears; it was made with the master pod.)
    kube.wait_for(lambda: _exec(kube, ns, "intruder", "connect", f"{master_ip}:{MASTER_PORT}")[0] != 0, 30, 0.5,
                  "kube-router to block the intruder")
    code, out = _exec(kube, ns, "intruder", "connect", f"{master_ip}:{MASTER_PORT}")
    assert code != 0 and "connected to" not in out and f"connect {master_ip}:{MASTER_PORT}: " in out, out
    code, out = _exec(kube, ns, "lookalike", "connect", f"{master_ip}:{MASTER_PORT}")
    assert code == 0 and f"connected to {master_ip}:{MASTER_PORT}" in out, out
    # The intruder and the lookalike differ only in their labels, and the intruder reaches the
    # metrics port: the refusal is the policy's (the operator restores a deleted policy at once, so
    # "delete it and see" is no control here; test_real_node.py shows kube-router does the blocking).
    policy = kube.kubectl_json("get", "networkpolicy", "guarded-master", "-n", ns)
    assert policy["spec"]["podSelector"]["matchLabels"] == {"morphml.io/experiment": "guarded",
                                                           "app.kubernetes.io/component": "master"}, policy
    kube.kubectl("delete", "nasexperiment", "guarded", "-n", ns, "--wait=true", timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_master_container_killed_by_the_runtime_resumes_from_its_journal(
        real_kube: Kube, operator: tuple[str, str], real_namespace: str) -> None:
    kube, ns = real_kube, real_namespace
    trials = 12
    kube.apply(digits("killed", trials), ns)
    selector = "morphml.io/experiment=killed,app.kubernetes.io/component=master"
    kube.wait_for(lambda: (_status(kube, ns, "killed").get("trials") or {}).get("done", 0) >= 2, 600, 0.5,
                  "two trials done")
    path = journal_file(kube, ns, "killed")
    before, _ = finished_once(read_journal(path))
    master = _running_pods(kube, ns, selector)[0]
    container_id = master["status"]["containerStatuses"][0]["containerID"].split("//", 1)[1]
    killed_at = time.time()
    # SIGKILL from the runtime itself: no pod deletion, no grace period; the kubelet restarts the
    # container (restartPolicy Always) in the same pod, on the same journal volume.
    kube.node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)  # type: ignore[attr-defined]

    def restarted() -> dict[str, Any] | None:
        pods = _running_pods(kube, ns, selector)
        status = pods[0]["status"]["containerStatuses"][0] if pods else {}
        return status if status.get("restartCount", 0) >= 1 else None

    container = kube.wait_for(restarted, 120, 0.5, "the kubelet to restart the master container")
    assert pods_uid(kube, ns, selector) == master["metadata"]["uid"]  # the same pod: only the container died
    assert container["lastState"]["terminated"]["exitCode"] == 137, container
    assert container["containerID"].split("//", 1)[1] != container_id
    status = kube.wait_for(lambda: _ended(kube, ns, "killed"), 600, 1.0, "killed to end")
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == trials, status
    journal = read_journal(path)
    accepted, twice = finished_once(journal)
    assert len(accepted) == trials and twice == [], journal["results"]
    # What was done before the kill was kept, not run again: its results are the ones from before.
    first = {r["task_id"]: r["received_at"] for r in journal["results"] if r["disposition"] == "accepted" and r["ok"]}
    assert before and all(first[task] < killed_at for task in before), (before, first, killed_at)


def pods_uid(kube: Kube, ns: str, selector: str) -> str:
    pods = [p for p in kube.pods(ns, selector) if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return str(pods[0]["metadata"]["uid"])
