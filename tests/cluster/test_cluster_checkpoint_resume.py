"""Issue 12, acceptance 2 (cluster half) and 6: a worker pod deleted while its trial is past its
first checkpoint; the trial is re-leased to the other worker, which resumes at the checkpoint's
epoch (journal event `resumed` at k > 0, one continuous learning curve), and the trial is counted
once: in the journal and in the `trials.csv` that `morphml results` fetches from the finished
experiment, whose best model scores its recorded accuracy. Then the master pod of the finished
experiment is deleted: the operator makes it again, the new master reports Succeeded from the
journal (it starts nothing) and `morphml results` still works.

One trial of real training (the worker image, digits, one checkpoint per epoch:
`spec.artifacts.checkpointIntervalEpochs: 1`) on 2 CPU workers. The journal is read on the host
(the claim's hostPath volume, `operator_trials.journal_file`), as the other cluster tests do.

Imports: pytest, PyYAML, the standard library, this package's modules, tests.architectures, morphml (journal,
proto client).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.architectures import FIXED_CNN

from .kube import Kube
from .operator_trials import finished_once, image, journal_file, read_journal
from .results_check import assert_best_model_scores_its_recorded_accuracy, fetch_results_with_the_cli, trials_rows

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

ROOT = Path(__file__).resolve().parents[2]
NAME = "resume"
EPOCHS = 8
#: Small requests: the node has the machine's CPUs; torch needs room for its memory.
WORKER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "3Gi"}}


def manifest() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    doc["metadata"]["name"] = NAME
    doc["spec"].update({
        "searchSpace": {"layers": FIXED_CNN},
        "optimizer": {"algorithm": "random", "seed": 5},
        "evaluation": {"dataset": {"name": "digits"}, "epochs": EPOCHS, "batchSize": 32, "learningRate": 0.003,
                       "optimizer": "adam", "timeoutSeconds": 600},
        "budget": {"maxTrials": 1, "maxFailedTrials": 1},
        "artifacts": {"checkpointIntervalEpochs": 1},
        "workers": {"replicas": 2, "gpusPerWorker": 0, "resources": WORKER_RESOURCES, "image": image("worker")},
    })
    return doc


def _status(kube: Kube, ns: str) -> dict[str, Any]:
    return kube.kubectl_json("get", "nasexperiment", NAME, "-n", ns).get("status", {})  # type: ignore[no-any-return]


def _events(path: Path, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    from morphml.distributed.journal import Journal

    journal = Journal.open_read_only(path)
    try:
        return journal.events(kinds)
    finally:
        journal.close()


def _journal_path(kube: Kube, ns: str) -> Path | None:
    try:
        path = journal_file(kube, ns, NAME)
    except (AssertionError, KeyError):  # the claim not bound yet
        return None
    return path if path.exists() else None


def _master_phase(kube: Kube, ns: str) -> str:
    from morphml_operator.master_client import get_master_status

    token = base64.b64decode(kube.kubectl_json("get", "secret", f"{NAME}-token", "-n", ns)["data"]["token"]).decode()
    pod = kube.kubectl_json("get", "pod", f"{NAME}-master", "-n", ns)
    return str(get_master_status(f"{pod['status']['podIP']}:50051", token)["phase"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trial_resumes_from_its_checkpoint_on_another_worker_after_its_pod_is_deleted(
        real_kube: Kube, operator: tuple[str, str], worker_image: Any, real_namespace: str, tmp_path: Path) -> None:
    kube, ns = real_kube, real_namespace
    spec = manifest()
    t0 = time.monotonic()
    kube.apply(spec, ns)
    timings: dict[str, float] = {}

    # Both workers registered (the other one takes the re-lease at once) and the trial's first
    # checkpoint journaled (the master fsyncs it before it acknowledges the upload).
    def first_checkpoint() -> tuple[Path, dict[str, Any]] | None:
        if (_status(kube, ns).get("workers") or {}).get("registered") != 2:
            return None
        path = _journal_path(kube, ns)
        saved = _events(path, ("checkpoint_saved",)) if path else []
        return (path, saved[0]) if path and saved else None

    path, saved = kube.wait_for(first_checkpoint, 420, 0.1, "2 workers registered and a first checkpoint")
    timings["first_checkpoint"] = time.monotonic() - t0
    task_id = saved["task_id"]
    assert saved["attempt"] == 1 and saved["detail"]["epoch"] >= 1, saved
    victim = next(a["worker_name"] for a in read_journal(path)["attempts"] if a["task_id"] == task_id)
    # Deleted as `kubectl delete pod` does; a short grace so the pod does not train on for 25 s
    # beside the worker that takes over (the operator reports it gone at the deletionTimestamp).
    kube.kubectl("delete", "pod", victim, "-n", ns, "--grace-period=1", "--wait=false")

    status = kube.wait_for(lambda: (s := _status(kube, ns)) and s.get("phase") in ("Succeeded", "Failed") and s,
                           420, 1.0, f"{NAME} to end")
    timings["ended"] = time.monotonic() - t0
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["done"] == 1 and status["best"]["trialId"] == task_id, status

    journal = read_journal(path)
    requeue = next(r for r in journal["requeues"] if r["task_id"] == task_id and r["attempt"] == 1)
    assert requeue["detected_by"] == "pod_gone", requeue
    second = next(a for a in journal["attempts"] if a["task_id"] == task_id and a["attempt"] == 2)
    assert second["worker_name"] != victim, journal["attempts"]

    # Resumed at the latest checkpoint the first attempt had journaled when the trial was re-leased.
    history = _events(path, ("checkpoint_saved", "resumed"))
    resumed = [e for e in history if e["kind"] == "resumed" and e["task_id"] == task_id]
    assert [e["attempt"] for e in resumed] == [2], resumed
    epoch = resumed[0]["detail"]["epoch"]
    before = [e["detail"]["epoch"] for e in history
              if e["kind"] == "checkpoint_saved" and e["attempt"] == 1 and e["seq"] < resumed[0]["seq"]]
    assert 0 < epoch < EPOCHS and epoch == max(before), (epoch, before)

    from morphml.distributed.journal import Journal

    reader = Journal.open_read_only(path)
    try:
        steps: dict[int, list[int]] = {}
        for point in reader.curves(task_id):
            steps.setdefault(point["attempt"], []).append(point["step"])
        (task,) = [t for t in reader.load_tasks() if t.task_id == task_id]
    finally:
        reader.close()
    # One continuous run: 1..epoch from the first attempt, epoch+1..EPOCHS from the second.
    assert steps[2] == list(range(epoch + 1, EPOCHS + 1)), steps
    assert steps[1][:epoch] == list(range(1, epoch + 1)), steps
    assert task.state.value == "succeeded" and task.finished_attempt == 2, task
    assert task.metrics["epochs"] == EPOCHS and task.metrics["resumed_from_epoch"] == epoch, task.metrics
    accepted, twice = finished_once(journal)
    assert accepted == [task_id] and twice == [], journal["results"]

    # Counted once in what the user fetches, and the fetched model is the trained one.
    out = tmp_path / "runs" / NAME
    fetch_results_with_the_cli(kube, ns, NAME, out)
    timings["fetched"] = time.monotonic() - t0
    assert [(r["trial_id"], r["status"], r["epochs"]) for r in trials_rows(out)] == [(task_id, "succeeded",
                                                                                      str(EPOCHS))]
    doc = assert_best_model_scores_its_recorded_accuracy(out, spec["spec"]["evaluation"])
    assert doc["trial_id"] == task_id

    # The finished experiment's master pod deleted: made again, Succeeded from the journal, still serving.
    selector = f"morphml.io/experiment={NAME},app.kubernetes.io/component=master"
    old_uid = kube.pods(ns, selector)[0]["metadata"]["uid"]
    kube.kubectl("delete", "pod", f"{NAME}-master", "-n", ns, "--wait=false")
    kube.wait_for(lambda: [p for p in kube.pods(ns, selector) if p["metadata"]["uid"] != old_uid and kube.pod_ready(p)],
                  120, 0.5, "the operator to make the finished experiment's master again")
    assert _master_phase(kube, ns) == "Succeeded"
    again = tmp_path / "again"
    fetch_results_with_the_cli(kube, ns, NAME, again)
    assert trials_rows(again) == trials_rows(out)
    assert _status(kube, ns)["phase"] == "Succeeded"
    assert kube.kubectl_json("get", "deployment", f"{NAME}-worker", "-n", ns)["spec"]["replicas"] == 0
    timings["refetched"] = time.monotonic() - t0
    print(f"\ncheckpoint resume: first checkpoint at epoch {saved['detail']['epoch']}, {victim} deleted, resumed at "
          f"epoch {epoch} on {second['worker_name']}; from apply: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
    kube.kubectl("delete", "nasexperiment", NAME, "-n", ns, "--wait=true", timeout=120)
