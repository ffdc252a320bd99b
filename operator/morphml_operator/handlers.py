"""kopf handlers for NASExperiment: thin glue between the API, the builders and the master.

Run it with `kopf run -m morphml_operator.handlers --all-namespaces --liveness=http://0.0.0.0:8080/healthz`
(what the Helm chart's Deployment does).

The shape, in full:
- `configure` (startup): kopf's settings from the typed OperatorSettings, and the API client.
- `create_or_resume`, `spec_changed`: `reconcile`, i.e. `ensure_*` every object the experiment
  owns. Each ensure is idempotent (create, or leave / bring up to date what exists), so running it
  twice, after an operator restart, or concurrently with the timer changes nothing. A master whose
  pod was built from other budget / faultTolerance / master sections than the spec now has is
  deleted (it comes back with them and resumes from the journal).
- `poll` (timer, every status_interval_seconds): reconcile again (a deleted master pod comes
  back; replicas follow spec and phase), ask the master for GetStatus with the losses after
  status.lastLossSeq, post one Event per new loss (named after its number, before the status that
  remembers it), write the status and the other Events `status.compute_status` chose. Once
  terminal: workers at 0 at once (the GPUs are free); the master pod stays, serving GetStatus and
  the finished experiment's files (`morphml results`) until the experiment is deleted, and is
  re-created like any other time when it goes away (a master on a finished journal reports the
  terminal phase and starts nothing).
- `worker_pod_event` (worker pods): a worker pod deleted, failed, evicted or unready past
  worker_unready_seconds (`pod_loss.decide`) is reported to the master with WorkerGone at once,
  so its trials are re-leased without waiting for heartbeats; a master that does not answer is
  asked again with backoff (`report_pod_lost`, timer threads).
- `experiment_event` (NASExperiments' watch stream): the phase table behind the operator's
  `morphml_operator_experiments{phase}` gauge (morphml_operator.metrics); each handler above is
  wrapped to count its errors in `morphml_operator_reconcile_errors_total{handler}`.
Deletion needs no handler: everything carries an ownerReference and the garbage collector removes it.

Imports: kopf, the kubernetes client, morphml_operator.{builders, pod_loss, settings, status, master_client,
metrics}.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes
from kubernetes.client.rest import ApiException

from . import builders, pod_loss
from .master_client import MasterUnreachable, get_master_status, report_worker_gone
from .metrics import OperatorMetrics
from .settings import OperatorSettings
from .status import TERMINAL_PHASES, Event, compute_status

GROUP, VERSION, PLURAL = "morphml.io", "v1alpha1", "nasexperiments"
TEMPLATE_HASH_ANNOTATION = "morphml.io/template-hash"

SETTINGS = OperatorSettings.from_env()
# Prometheus: experiments by phase (from the watch stream), handler errors (docs/observability.md).
METRICS = OperatorMetrics()
# What kopf hands a handler as `logger`.
Logger = logging.Logger | logging.LoggerAdapter[Any]


# --------------------------------------------------------------------------- startup


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: Logger, **_: Any) -> None:
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
    if SETTINGS.metrics_port:
        try:
            port = METRICS.serve(SETTINGS.metrics_port, SETTINGS.metrics_host)
            logger.info("operator metrics on http://%s:%d/metrics", SETTINGS.metrics_host, port)
        except OSError as error:  # metrics are not worth stopping the operator for
            logger.error("operator metrics not served: MORPHML_OPERATOR_METRICS_HOST/PORT=%s:%d: %s",
                         SETTINGS.metrics_host, SETTINGS.metrics_port, error)


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api()


def _apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- ensure functions


def _read_or_create(body: kopf.Body, manifest: dict, create: Any, read: Any) -> Any:
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


def ensure_service_account(body: kopf.Body) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _read_or_create(body, builders.build_service_account(name, namespace),
                    core.create_namespaced_service_account, core.read_namespaced_service_account)


def ensure_token_secret(body: kopf.Body) -> str:
    """The experiment's token: made once, never rotated while the experiment lives.

    The API server stores a Secret's stringData as data (base64) and never returns stringData,
    so the token is read from data, on a fresh create as on a read.
    """
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    secret = _read_or_create(body, builders.build_token_secret(name, namespace, secrets.token_urlsafe(32)),
                             core.create_namespaced_secret, core.read_namespaced_secret)
    return _secret_token(secret)


def _secret_token(secret: Any) -> str:
    try:
        return base64.b64decode(secret.data["token"]).decode()
    except (TypeError, KeyError):
        raise kopf.TemporaryError(f"Secret {secret.metadata.name} has no key `token` in data (edited by hand?); "
                                  "restore it, or delete and re-create the experiment", delay=10) from None


def ensure_experiment_configmap(body: kopf.Body) -> None:
    """The manifest the master reads at start, kept equal to the spec (a restarted master reads it)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    desired = builders.build_experiment_configmap(name, namespace, body["spec"])
    existing = _read_or_create(body, desired, core.create_namespaced_config_map, core.read_namespaced_config_map)
    if (existing.data or {}) != desired["data"]:
        core.patch_namespaced_config_map(builders.experiment_configmap_name(name), namespace, {"data": desired["data"]})


def ensure_journal_pvc(body: kopf.Body) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _read_or_create(body, builders.build_journal_pvc(name, namespace, body["spec"]),
                    core.create_namespaced_persistent_volume_claim, core.read_namespaced_persistent_volume_claim)


def ensure_master_service(body: kopf.Body) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    _read_or_create(body, builders.build_master_service(name, namespace, SETTINGS.metrics_scrape_annotations),
                    core.create_namespaced_service, core.read_namespaced_service)


def ensure_master_network_policy(body: kopf.Body) -> None:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    networking = kubernetes.client.NetworkingV1Api()
    _read_or_create(body, builders.build_master_network_policy(name, namespace),
                    networking.create_namespaced_network_policy, networking.read_namespaced_network_policy)


def ensure_master_pod(body: kopf.Body, restart_for_spec: bool = True) -> tuple[Any, str | None]:
    """The master pod, created when missing (a new one resumes from the journal).

    Returns (pod, why): `why` says which spec sections (budget, faultTolerance, master) the running
    master was started without (`builders.master_restart_reason`); the pod is then deleted, so the
    next reconcile starts a master that reads them (and resumes from the journal). Level-triggered, from the pod's own
    annotation: a change the operator missed while it was down is applied too. With
    `restart_for_spec` False (a finished search: the API server refuses spec changes then, and
    there is nothing left to apply one to) a master that differs is left serving.
    """
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    core = _core()
    pod = _read_or_create(body, builders.build_master_pod(name, namespace, body["spec"], SETTINGS.pod_defaults),
                          core.create_namespaced_pod, core.read_namespaced_pod)
    if pod.metadata.deletion_timestamp:
        return pod, None
    if pod.status and pod.status.phase in ("Failed", "Succeeded"):
        # An evicted or otherwise ended master does not restart by itself; a new pod resumes the journal.
        core.delete_namespaced_pod(pod.metadata.name, namespace)
        return pod, None
    if not restart_for_spec:
        return pod, None
    annotation = (pod.metadata.annotations or {}).get(builders.MASTER_SPEC_ANNOTATION)
    why = builders.master_restart_reason(annotation, body["spec"])
    if why:
        # Preconditions: the timer and the update handler may both see the old pod; only the
        # delete that finds it as read goes through (the other gets 409), so it restarts once.
        preconditions = kubernetes.client.V1Preconditions(uid=pod.metadata.uid,
                                                          resource_version=pod.metadata.resource_version)
        try:
            core.delete_namespaced_pod(pod.metadata.name, namespace,
                                       body=kubernetes.client.V1DeleteOptions(preconditions=preconditions))
        except ApiException as error:
            if error.status in (404, 409):
                return pod, None
            raise
    return pod, why


def ensure_worker_deployment(body: kopf.Body, replicas: int) -> Any:
    """The worker Deployment with `replicas` and the pod template the spec asks for now."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    apps = _apps()
    desired = builders.build_worker_deployment(name, namespace, body["spec"], replicas, SETTINGS.pod_defaults)
    template_hash = _digest(desired["spec"]["template"])
    desired["metadata"].setdefault("annotations", {})[TEMPLATE_HASH_ANNOTATION] = template_hash
    existing = _read_or_create(body, desired, apps.create_namespaced_deployment, apps.read_namespaced_deployment)
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


def reconcile(body: kopf.Body, phase: str | None) -> dict:
    """Ensure everything the experiment owns; returns what the status needs (token, master pod, deployment).

    The ConfigMap is brought up to date before the master pod: a master restarted for a changed
    spec reads the new manifest. The master pod is ensured in every phase: after the end it
    serves the results (`morphml results`) and the status until the experiment is deleted; only
    the workers go (`builders.desired_worker_replicas` is 0 then).
    """
    ensure_service_account(body)
    token = ensure_token_secret(body)
    ensure_experiment_configmap(body)
    ensure_journal_pvc(body)
    ensure_master_service(body)
    ensure_master_network_policy(body)
    master_pod, restart_reason = ensure_master_pod(body, restart_for_spec=phase not in TERMINAL_PHASES)
    if restart_reason:
        # kopf.event, not kopf.info: a milestone is posted whatever the log posting level.
        kopf.event(body, type="Normal", reason="MasterRestarting",
                   message=f"{restart_reason}: the master restarts with the spec and resumes from the journal")
        master_pod = None  # being deleted: not the master to ask
    deployment = ensure_worker_deployment(body, builders.desired_worker_replicas(body["spec"], phase))
    return {"token": token, "master_pod": master_pod, "deployment": deployment}


# --------------------------------------------------------------------------- handlers


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@METRICS.counted("create_or_resume")
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
@METRICS.counted("spec_changed")
def spec_changed(body: kopf.Body, status: kopf.Status, **_: Any) -> None:
    """A spec change applies now, not at the next tick (docs/kubernetes.md, "Which spec fields apply live").

    workers.* and suspend reach the worker Deployment (replicas at once, a new pod template by a
    rolling update); budget, faultTolerance and master.* restart the master, which resumes from the
    journal with them (`ensure_master_pod`). The fields a running search cannot take (searchSpace,
    optimizer, evaluation, objective, master.persistence) the API server refuses (CEL rules).
    """
    reconcile(body, status.get("phase"))


@kopf.on.event(GROUP, VERSION, PLURAL)
def experiment_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Keeps the experiments-by-phase gauge: every watch event carries the status.phase it has now."""
    uid = body.get("metadata", {}).get("uid", "")
    if event.get("type") == "DELETED":
        METRICS.forget(uid)
    else:
        METRICS.observe_phase(uid, (body.get("status") or {}).get("phase"))


def _master_address(pod: Any) -> str | None:
    if pod is None or not pod.status or not pod.status.pod_ip:
        return None
    name = pod.metadata.labels.get(builders.EXPERIMENT_LABEL, "")
    return SETTINGS.master_address_template.format(
        pod_ip=pod.status.pod_ip, service=builders.master_name(name), namespace=pod.metadata.namespace,
        port=builders.MASTER_PORT)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.status_interval_seconds, initial_delay=1.0)
@METRICS.counted("poll")
def poll(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch,
         logger: Logger, **_: Any) -> None:
    """Reconcile, read the master's status, write the CR status, post milestone Events."""
    if meta.get("deletionTimestamp"):
        return  # being deleted (e.g. foreground cascade): recreating children would fight the GC
    old_phase = status.get("phase")
    owned = reconcile(body, old_phase)
    master_status, master_error = None, ""
    address = _master_address(owned["master_pod"])
    last_loss = int(status.get("lastLossSeq", 0) or 0)
    if address:
        try:
            master_status = get_master_status(address, owned["token"], SETTINGS.master_rpc_timeout_seconds,
                                              losses_after_seq=last_loss)
        except MasterUnreachable as error:
            master_error = str(error)
    else:
        master_error = "the master pod has no IP yet"
    if master_status is not None:
        _check_loss_numbering(master_status, last_loss, logger)
    deployment = owned["deployment"]
    ready = int((deployment.status.ready_replicas if deployment.status else 0) or 0)
    new_status, events = compute_status(
        name=meta["name"], spec=spec, generation=meta.get("generation"), previous=dict(status),
        master=master_status, workers_ready=ready, workers_desired=int(deployment.spec.replicas or 0),
        now=_now(), master_error=master_error)
    # Worker-loss Events before the status that remembers their numbers (lastLossSeq): a status
    # patch that fails after this only makes the next tick post them again, and a keyed Event
    # exists once (the API server refuses the second copy). Posting first can duplicate nothing;
    # patching first could lose an Event (the operator dies between the two).
    post_keyed_events(body, [event for event in events if event.key])
    if new_status["phase"] in TERMINAL_PHASES and old_phase not in TERMINAL_PHASES:
        # Free the GPUs now, not on the next tick. The master pod stays (a few hundred millicores
        # and MiB, no GPU): it serves best/ and trials.csv to `morphml results` and the status.
        ensure_worker_deployment(body, 0)
        new_status["workers"]["desired"] = 0
        new_status["workersSummary"] = f"{ready}/0"
        logger.info("search %s: workers scaled to 0; the master keeps serving the results",
                    new_status["phase"])
    for key, value in new_status.items():
        patch.status[key] = value
    for event in events:
        if not event.key:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def _check_loss_numbering(master_status: Mapping[str, Any], last_loss: int, logger: Logger) -> None:
    """Say so when the master's loss numbers cannot be what this status counted from."""
    latest = int(master_status.get("loss_seq", 0) or 0)
    if latest < last_loss:
        # A new journal (its claim was deleted and made again): its losses are numbered from 1
        # again and get no Event until they pass what this experiment already counted.
        logger.warning("the master's latest loss is #%d, below the #%d already posted: a new journal?",
                       latest, last_loss)


def post_keyed_events(body: kopf.Body, events: list[Event]) -> None:
    """Post each Event under a name made from its key; one that already exists was posted before.

    Raises kopf.TemporaryError when the API refuses one otherwise: nothing after it is posted and
    the caller has not written the status yet, so the next tick tries the same Events again.
    """
    if not events:
        return
    name, namespace, uid = body["metadata"]["name"], body["metadata"]["namespace"], body["metadata"]["uid"]
    core = _core()
    now = _now()
    for event in events:
        manifest = builders.build_event(name, namespace, uid, event.key, event.type, event.reason, event.message, now)
        try:
            core.create_namespaced_event(namespace, manifest)  # type: ignore[arg-type]  # a dict is sent as is
        except ApiException as error:
            if error.status == 409:
                continue  # posted by an earlier tick whose status patch did not land
            raise kopf.TemporaryError(f"posting Event {manifest['metadata']['name']} ({event.reason}): "
                                      f"{error.status} {error.reason}",
                                      delay=SETTINGS.status_interval_seconds) from None


# Pods whose unready state is waiting for a re-check (uid -> timer): no watch event comes when
# an unready pod merely stays unready, so the handler looks again once the threshold has passed.
_RECHECKS: dict[str, threading.Timer] = {}
_RECHECKS_LOCK = threading.Lock()


@kopf.on.event("", "v1", "pods", labels={builders.COMPONENT_LABEL: "worker"})
@METRICS.counted("worker_pod_event")
def worker_pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """A worker pod lost: tell its master at once (WorkerGone) so its trials are re-leased.

    "Lost" is `pod_loss.decide`: deleted or terminating (deleted, evicted, scaled down), Failed
    or Succeeded, or Ready before and unready for longer than worker_unready_seconds. Waiting for
    missed heartbeats would leave the pod's trials stuck for heartbeatInterval x missedHeartbeats.
    A pod going away is reported once; an unready episode once per episode (the master may see
    the same worker register again after it recovers).
    """
    handle_worker_pod(event.get("type"), dict(body), memo, logger)


def handle_worker_pod(event_type: str | None, pod: dict, memo: Any, logger: Logger) -> None:
    post_oom_events(pod, memo, logger)
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
    # Marked before the call: later events of this pod (or episode) start no second report; the
    # report itself retries until the master answers (report_pod_lost).
    memo["reported_unready" if unready else "reported_gone"] = True
    report_pod_lost(uid, experiment, namespace, pod["metadata"]["name"], decision.reason, logger)


def post_oom_events(pod: dict, memo: Any, logger: Logger) -> None:
    """One Warning Event `WorkerOOMKilled` on the experiment per OOM kill of a worker container
    (`pod_loss.oom_kills`: the whole container killed, so `kubectl describe nasexperiment` says out
    of memory and at which limit). A trial runner killed inside a live container is the worker's
    to report (kind "oom" in the journal). Keyed by pod, container and kill number: posted once
    however many watch events show the same termination (409 = posted before)."""
    kills = [kill for kill in pod_loss.oom_kills(pod) if kill.key not in memo.setdefault("oom_events", set())]
    if not kills:
        return
    experiment = (pod["metadata"].get("labels") or {}).get(builders.EXPERIMENT_LABEL)
    namespace = pod["metadata"]["namespace"]
    if not experiment:
        return
    try:
        body: Any = kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, experiment)
    except ApiException as error:
        if error.status == 404:
            return  # the experiment is gone: nobody to tell
        raise
    uid = body["metadata"]["uid"]
    for kill in kills:
        manifest = builders.build_event(experiment, namespace, uid, f"oom-{kill.key}", "Warning", "WorkerOOMKilled",
                                        kill.message, _now())
        try:
            _core().create_namespaced_event(namespace, manifest)  # type: ignore[arg-type]  # a dict is sent as is
        except ApiException as error:
            if error.status != 409:
                logger.warning("posting the OOM Event of %s: %s %s", pod["metadata"].get("name"), error.status,
                               error.reason)
                continue  # the next watch event of this pod tries again
        memo["oom_events"].add(kill.key)
        logger.warning("%s", kill.message)


# Pod uid -> the timer of its next WorkerGone attempt (at most one chain of retries per pod).
_GONE_RETRIES: dict[str, threading.Timer] = {}
_GONE_RETRIES_LOCK = threading.Lock()


def report_pod_lost(uid: str, experiment: str, namespace: str, pod_name: str, reason: str, logger: Logger,
                    attempt: int = 0, started: float | None = None) -> None:
    """Tell the master WorkerGone now, and again with backoff until it answers (`pod_loss.gone_retry_delay`).

    The first attempt runs in the caller (no delay on the common path); retries run on timer
    threads, not in a handler. A master that is restarting, frozen or cut off would otherwise
    never hear of the pod, and its trials would wait for missed heartbeats.
    """
    started = time.monotonic() if started is None else started
    try:
        outcome = _tell_master_gone(uid, experiment, namespace, pod_name, reason, logger)
    except Exception as error:  # the API server itself failed us: try again like an unreachable master
        logger.warning("reporting worker pod %s gone: %s", pod_name, error)
        outcome = pod_loss.GONE_UNREACHABLE
    elapsed = time.monotonic() - started
    delay = pod_loss.gone_retry_delay(outcome, attempt, elapsed, SETTINGS.worker_gone_retry_seconds)
    with _GONE_RETRIES_LOCK:
        _GONE_RETRIES.pop(uid, None)
        if delay is None:
            if outcome == pod_loss.GONE_UNREACHABLE:
                logger.error("gave up telling the master that worker pod %s is gone after %d attempts in %.0f s; "
                             "its trials wait for missed heartbeats", pod_name, attempt + 1, elapsed)
            return

        def retry() -> None:
            try:
                report_pod_lost(uid, experiment, namespace, pod_name, reason, logger, attempt + 1, started)
            except Exception:  # a timer thread has no caller to raise to
                logger.exception("reporting worker pod %s gone", pod_name)

        timer = threading.Timer(delay, retry)
        timer.daemon = True
        _GONE_RETRIES[uid] = timer
        timer.start()


def _tell_master_gone(uid: str, experiment: str, namespace: str, pod_name: str, reason: str,
                      logger: Logger) -> str:
    """One WorkerGone attempt; returns a pod_loss.GONE_* outcome."""
    core = _core()
    try:
        secret = core.read_namespaced_secret(builders.token_secret_name(experiment), namespace)
    except ApiException as error:
        if error.status == 404:
            return pod_loss.GONE_NOBODY  # the experiment is going away
        raise
    if reason.startswith("pod unready"):
        try:
            current = core.read_namespaced_pod(pod_name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
        else:
            body = kubernetes.client.ApiClient().sanitize_for_serialization(current)
            if body["metadata"].get("uid") == uid and pod_loss.ready_condition(body)[0]:
                return pod_loss.GONE_RECOVERED
    try:
        master_pod = core.read_namespaced_pod(builders.master_name(experiment), namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        master_pod = None
    address = _master_address(master_pod)
    if not address:
        # No master right now: restarting (a new pod resumes the journal) or gone for good.
        return pod_loss.GONE_NOBODY if _experiment_over(experiment, namespace) else pod_loss.GONE_UNREACHABLE
    try:
        reply = report_worker_gone(address, _secret_token(secret), pod_name, reason,
                                   SETTINGS.master_rpc_timeout_seconds)
    except MasterUnreachable as error:
        logger.warning("could not tell the master that %s is gone (will retry): %s", pod_name, error)
        return pod_loss.GONE_UNREACHABLE
    logger.info("worker pod %s lost (%s): master requeued %s", pod_name, reason, reply.get("requeued"))
    return pod_loss.GONE_ANSWERED


def _experiment_over(experiment: str, namespace: str) -> bool:
    """The experiment is deleted or finished (its master is not coming back)."""
    try:
        obj: Any = kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, experiment)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return (obj.get("status") or {}).get("phase") in TERMINAL_PHASES or bool(obj["metadata"].get("deletionTimestamp"))


def _schedule_recheck(uid: str, namespace: str, name: str, delay: float, memo: Any, logger: Logger) -> None:
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
