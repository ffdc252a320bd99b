"""kopf handlers for NASExperiment: thin glue between the API, the builders and the master.

Run it with `kopf run -m morphml_operator.handlers --all-namespaces --liveness=http://0.0.0.0:8080/healthz`
(what the Helm chart's Deployment does).

The shape, in full:
- `configure` (startup): kopf's settings from the typed OperatorSettings, and the API client.
- `reconcile` (create, resume, spec update): `ensure_*` every object the experiment owns. Each
  ensure is idempotent (create, or leave / bring up to date what exists), so running it twice,
  after an operator restart, or concurrently with the timer changes nothing.
- `poll` (timer, every status_interval_seconds): reconcile again (a deleted master pod comes
  back; replicas follow spec and phase), ask the master for GetStatus, write the status and post
  the Events `status.compute_status` chose. Once terminal: workers at 0, master pod deleted.
- `worker_pod_event` (worker pods): a worker pod deleted, failed, evicted or unready past
  worker_unready_seconds (`pod_loss.decide`) is reported to the master with WorkerGone at once,
  so its trials are re-leased without waiting for heartbeats.
Deletion needs no handler: everything carries an ownerReference and the garbage collector removes it.

Imports: kopf, the kubernetes client, morphml_operator.{builders, pod_loss, settings, status, master_client}.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import secrets
import threading
import time
from typing import Any, Mapping

import kopf
import kubernetes
from kubernetes.client.rest import ApiException

from . import builders, pod_loss
from .master_client import MasterUnreachable, get_master_status, report_worker_gone
from .settings import OperatorSettings
from .status import TERMINAL_PHASES, compute_status

GROUP, VERSION, PLURAL = "morphml.io", "v1alpha1", "nasexperiments"
TEMPLATE_HASH_ANNOTATION = "morphml.io/template-hash"
CONFIG_HASH_ANNOTATION = "morphml.io/experiment-hash"

SETTINGS = OperatorSettings.from_env()


# --------------------------------------------------------------------------- startup


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    """The one place kopf's behaviour is set, from OperatorSettings."""
    settings.persistence.finalizer = SETTINGS.finalizer
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=SETTINGS.annotation_prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=SETTINGS.annotation_prefix, key="last-handled-configuration")
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 30
    settings.networking.request_timeout = SETTINGS.request_timeout_seconds
    settings.posting.level = getattr(logging, SETTINGS.posting_level)
    # No runtime observation of CRDs and namespaces: the CRD exists before the operator starts (the
    # chart installs crds/ first) and the namespaces are fixed, so the operator needs no
    # cluster-wide list/watch of customresourcedefinitions and namespaces (least privilege).
    settings.scanning.disabled = True
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    logger.info("morphml operator settings: %s", SETTINGS)


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api()


def _apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- ensure functions


def _create(body: Mapping[str, Any], manifest: dict, create, read) -> Any:
    """What exists under `manifest`'s name, created (owned by the experiment) when missing.

    Read first: the timer calls this for every object every few seconds, and a read is cheaper for
    the API server than a create refused with 409. A create that loses a race reads the winner.
    """
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        return read(name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
    kopf.adopt(manifest, owner=body)
    try:
        return create(namespace, manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        return read(name, namespace)


def ensure_service_account(body: Mapping[str, Any]) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _create(body, builders.build_service_account(name, namespace),
            core.create_namespaced_service_account, core.read_namespaced_service_account)


def ensure_token_secret(body: Mapping[str, Any]) -> str:
    """The experiment's token: made once, never rotated while the experiment lives."""
    import base64

    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    secret = _create(body, builders.build_token_secret(name, namespace, secrets.token_urlsafe(32)),
                     core.create_namespaced_secret, core.read_namespaced_secret)
    if secret.data and "token" in secret.data:
        return base64.b64decode(secret.data["token"]).decode()
    return secret.string_data["token"]


def ensure_experiment_configmap(body: Mapping[str, Any]) -> bool:
    """The manifest the master reads; True when its content changed (the master must restart to see it)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    desired = builders.build_experiment_configmap(name, namespace, body["spec"])
    existing = _create(body, desired, core.create_namespaced_config_map, core.read_namespaced_config_map)
    if (existing.data or {}) == desired["data"]:
        return False
    core.patch_namespaced_config_map(builders.experiment_configmap_name(name), namespace, {"data": desired["data"]})
    return True


def ensure_journal_pvc(body: Mapping[str, Any]) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _create(body, builders.build_journal_pvc(name, namespace, body["spec"]),
            core.create_namespaced_persistent_volume_claim, core.read_namespaced_persistent_volume_claim)


def ensure_master_service(body: Mapping[str, Any]) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _create(body, builders.build_master_service(name, namespace),
            core.create_namespaced_service, core.read_namespaced_service)


def ensure_master_network_policy(body: Mapping[str, Any]) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    networking = kubernetes.client.NetworkingV1Api()
    _create(body, builders.build_master_network_policy(name, namespace),
            networking.create_namespaced_network_policy, networking.read_namespaced_network_policy)


def ensure_master_pod(body: Mapping[str, Any]) -> Any:
    """The master pod, created when missing (a new one resumes from the journal)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    pod = _create(body, builders.build_master_pod(name, namespace, body["spec"], SETTINGS.pod_defaults),
                  core.create_namespaced_pod, core.read_namespaced_pod)
    if pod.status and pod.status.phase in ("Failed", "Succeeded") and not pod.metadata.deletion_timestamp:
        # An evicted or otherwise ended master does not restart by itself; a new pod resumes the journal.
        core.delete_namespaced_pod(pod.metadata.name, namespace)
    return pod


def delete_master_pod(body: Mapping[str, Any], reason: str, logger: logging.Logger) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    try:
        _core().delete_namespaced_pod(builders.master_name(name), namespace)
        logger.info("deleted the master pod: %s", reason)
    except ApiException as error:
        if error.status != 404:
            raise


def ensure_worker_deployment(body: Mapping[str, Any], replicas: int) -> Any:
    """The worker Deployment with `replicas` and the pod template the spec asks for now."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    apps = _apps()
    desired = builders.build_worker_deployment(name, namespace, body["spec"], replicas, SETTINGS.pod_defaults)
    template_hash = _digest(desired["spec"]["template"])
    desired["metadata"].setdefault("annotations", {})[TEMPLATE_HASH_ANNOTATION] = template_hash
    existing = _create(body, desired, apps.create_namespaced_deployment, apps.read_namespaced_deployment)
    annotations = existing.metadata.annotations or {}
    if existing.spec.replicas == replicas and annotations.get(TEMPLATE_HASH_ANNOTATION) == template_hash:
        return existing
    patch: dict[str, Any] = {"spec": {"replicas": replicas}}
    if annotations.get(TEMPLATE_HASH_ANNOTATION) != template_hash:
        # The template changed (image, GPUs, resources): replace it whole, not merged, so fields the
        # spec dropped (a toleration, a node selector) really go away.
        existing.spec.template = desired["spec"]["template"]
        existing.spec.replicas = replicas
        existing.metadata.annotations = {**annotations, TEMPLATE_HASH_ANNOTATION: template_hash}
        return apps.replace_namespaced_deployment(existing.metadata.name, namespace, existing)
    return apps.patch_namespaced_deployment(existing.metadata.name, namespace, patch)


def reconcile(body: Mapping[str, Any], phase: str | None) -> dict:
    """Ensure everything the experiment owns; returns what the status needs (token, master pod, deployment)."""
    ensure_service_account(body)
    token = ensure_token_secret(body)
    config_changed = ensure_experiment_configmap(body)
    ensure_journal_pvc(body)
    ensure_master_service(body)
    ensure_master_network_policy(body)
    master_pod = None if phase in TERMINAL_PHASES else ensure_master_pod(body)
    deployment = ensure_worker_deployment(body, builders.desired_worker_replicas(body["spec"], phase))
    return {"token": token, "master_pod": master_pod, "deployment": deployment, "config_changed": config_changed}


# --------------------------------------------------------------------------- handlers


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def create_or_resume(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
    """Bring every owned object into existence (again, after an operator restart)."""
    phase = status.get("phase")
    reconcile(body, phase)
    if not phase:
        patch.status["phase"] = "Pending"
        patch.status["message"] = "master pod created; waiting for it to serve"
        patch.status["trialsSummary"] = f"0/{body['spec']['budget']['maxTrials']}"
        patch.status["workersSummary"] = f"0/{builders.desired_worker_replicas(body['spec'], None)}"


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def spec_changed(body: kopf.Body, status: kopf.Status, old: Any, new: Any, logger: logging.Logger, **_: Any) -> None:
    """replicas and suspend reach the Deployment now; a new budget reaches the master by a restart.

    The master reads its manifest at start and resumes from the journal, so restarting it with
    the updated ConfigMap is how a changed budget takes effect (no trial is lost or re-run).
    """
    phase = status.get("phase")
    owned = reconcile(body, phase)
    budget_changed = (old or {}).get("budget") != (new or {}).get("budget")
    if owned["config_changed"] and budget_changed and phase not in TERMINAL_PHASES:
        delete_master_pod(body, "spec.budget changed; the new master resumes from the journal with it", logger)
        # kopf.event, not kopf.info: a milestone is posted whatever the log posting level.
        kopf.event(body, type="Normal", reason="BudgetChanged",
                   message=f"budget now {body['spec']['budget']}; master restarting to apply it")


def _master_address(pod: Any) -> str | None:
    if pod is None or not pod.status or not pod.status.pod_ip:
        return None
    name = pod.metadata.labels.get(builders.EXPERIMENT_LABEL, "")
    return SETTINGS.master_address_template.format(
        pod_ip=pod.status.pod_ip, service=builders.master_name(name), namespace=pod.metadata.namespace,
        port=builders.MASTER_PORT)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.status_interval_seconds, initial_delay=1.0)
def poll(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch,
         logger: logging.Logger, **_: Any) -> None:
    """Reconcile, read the master's status, write the CR status, post milestone Events."""
    if meta.get("deletionTimestamp"):
        return  # being deleted (e.g. foreground cascade): recreating children would fight the GC
    old_phase = status.get("phase")
    owned = reconcile(body, old_phase)
    master_status, master_error = None, ""
    address = _master_address(owned["master_pod"])
    if address:
        try:
            master_status = get_master_status(address, owned["token"], SETTINGS.master_rpc_timeout_seconds)
        except MasterUnreachable as error:
            master_error = str(error)
    elif old_phase not in TERMINAL_PHASES:
        master_error = "the master pod has no IP yet"
    deployment = owned["deployment"]
    ready = int((deployment.status.ready_replicas if deployment.status else 0) or 0)
    new_status, events = compute_status(
        name=meta["name"], spec=spec, generation=meta.get("generation"), previous=dict(status),
        master=master_status, workers_ready=ready, workers_desired=int(deployment.spec.replicas or 0),
        now=_now(), master_error=master_error)
    if new_status["phase"] in TERMINAL_PHASES and old_phase not in TERMINAL_PHASES:
        # Free the GPUs now, not on the next tick; the journal PVC and status.best keep the result.
        ensure_worker_deployment(body, 0)
        new_status["workers"]["desired"] = 0
        new_status["workersSummary"] = f"{ready}/0"
        delete_master_pod(body, f"search {new_status['phase']}", logger)
    for key, value in new_status.items():
        patch.status[key] = value
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


# Pods whose unready state is waiting for a re-check (uid -> timer): no watch event comes when
# an unready pod merely stays unready, so the handler looks again once the threshold has passed.
_RECHECKS: dict[str, threading.Timer] = {}
_RECHECKS_LOCK = threading.Lock()


@kopf.on.event("", "v1", "pods", labels={builders.COMPONENT_LABEL: "worker"})
def worker_pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """A worker pod lost: tell its master at once (WorkerGone) so its trials are re-leased.

    "Lost" is `pod_loss.decide`: deleted or terminating (deleted, evicted, scaled down), Failed
    or Succeeded, or Ready before and unready for longer than worker_unready_seconds. Waiting for
    missed heartbeats would leave the pod's trials stuck for heartbeatInterval x missedHeartbeats.
    A pod going away is reported once; an unready episode once per episode (the master may see
    the same worker register again after it recovers).
    """
    handle_worker_pod(event.get("type"), dict(body), memo, logger)


def handle_worker_pod(event_type: str | None, pod: dict, memo: Any, logger: logging.Logger) -> None:
    if memo.get("reported_gone"):
        return
    decision = pod_loss.decide(event_type, pod, time.time(), SETTINGS.worker_unready_seconds,
                               bool(memo.get("was_ready")))
    if decision.ready:
        memo["was_ready"] = True
        memo["reported_unready"] = False
    uid = pod["metadata"].get("uid", "")
    if decision.recheck_in is not None:
        _schedule_recheck(uid, pod["metadata"]["namespace"], pod["metadata"]["name"], decision.recheck_in, memo, logger)
        return
    if decision.reason is None:
        return
    unready = decision.reason.startswith("pod unready")
    if unready and memo.get("reported_unready"):
        return
    labels = pod["metadata"].get("labels") or {}
    experiment, namespace = labels.get(builders.EXPERIMENT_LABEL), pod["metadata"]["namespace"]
    if not experiment:
        return
    core = _core()
    try:
        master_pod = core.read_namespaced_pod(builders.master_name(experiment), namespace)
        secret = core.read_namespaced_secret(builders.token_secret_name(experiment), namespace)
    except ApiException as error:
        if error.status == 404:
            return  # the experiment is over or going away: nobody to tell
        raise
    import base64

    address = _master_address(master_pod)
    if not address:
        return
    token = base64.b64decode(secret.data["token"]).decode()
    memo["reported_unready" if unready else "reported_gone"] = True
    pod_name = pod["metadata"]["name"]
    try:
        reply = report_worker_gone(address, token, pod_name, decision.reason, SETTINGS.master_rpc_timeout_seconds)
    except MasterUnreachable as error:
        logger.warning("could not tell the master that %s is gone: %s", pod_name, error)
        return
    logger.info("worker pod %s lost (%s): master requeued %s", pod_name, decision.reason, reply.get("requeued"))


def _schedule_recheck(uid: str, namespace: str, name: str, delay: float, memo: Any, logger: logging.Logger) -> None:
    def recheck() -> None:
        with _RECHECKS_LOCK:
            _RECHECKS.pop(uid, None)
        try:
            pod = _core().read_namespaced_pod(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return  # gone: its DELETED event reports it
            logger.warning("re-reading unready worker pod %s: %s", name, error)
            return
        body = kubernetes.client.ApiClient().sanitize_for_serialization(pod)
        if body["metadata"].get("uid") != uid:
            return  # a new pod of the same name
        try:
            handle_worker_pod(None, body, memo, logger)
        except Exception:  # a timer thread has no caller to raise to
            logger.exception("checking unready worker pod %s", name)

    with _RECHECKS_LOCK:
        if uid in _RECHECKS:
            return
        timer = threading.Timer(max(0.1, delay) + 0.2, recheck)
        timer.daemon = True
        _RECHECKS[uid] = timer
        timer.start()
