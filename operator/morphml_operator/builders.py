"""Pure builders: a NASExperiment (its name, namespace and defaulted spec) -> Kubernetes manifests.

Every function here returns plain dicts and touches nothing: no API calls, no clock, no randomness
(the token is passed in). The handlers call these, `kopf.adopt` the result (ownerReferences) and
send it to the API. Unit tests pin the output (tests/unit/test_builders.py).

Names for an experiment called NAME:
    NAME-token      Secret with the experiment's auth token (key `token`)
    NAME-journal    PersistentVolumeClaim holding the master's SQLite journal
    NAME-experiment ConfigMap with the manifest, mounted at /etc/morphml/experiment.yaml
    NAME-pods       ServiceAccount of master and workers: no API rights, no token mounted
    NAME-master     master Pod, its Service (gRPC on 50051) and the NetworkPolicy guarding it
    NAME-worker     worker Deployment

Imports: the standard library and PyYAML only (no kopf, no kubernetes client), so the builders can
be tested and reused anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

MASTER_PORT = 50051
MASTER_METRICS_PORT = 9464  # the master's Prometheus /metrics (morphml master --metrics-port)
# The master's web dashboard (morphml master --dashboard-port; its API needs the experiment's token).
# Not in the NetworkPolicy's ingress: reached with `kubectl port-forward`, which policies do not see.
MASTER_DASHBOARD_PORT = 8080
WORKER_HEALTH_PORT = 50052
EXPERIMENT_PATH = "/etc/morphml/experiment.yaml"
TOKEN_DIR = "/etc/morphml/token"
TOKEN_PATH = f"{TOKEN_DIR}/token"
JOURNAL_DIR = "/var/lib/morphml"
JOURNAL_PATH = f"{JOURNAL_DIR}/journal.db"
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 1000  # the `morphml` user of Dockerfile.master and Dockerfile.worker

EXPERIMENT_LABEL = "morphml.io/experiment"
COMPONENT_LABEL = "app.kubernetes.io/component"
# On the master pod: a digest of each spec section the running master was started with (JSON).
MASTER_SPEC_ANNOTATION = "morphml.io/master-spec"
# The spec sections a master reads at start (budget, faultTolerance from its manifest) or its pod
# is built from (master: image, resources). A change to one restarts the master, which resumes
# from the journal with it. (master.persistence is immutable: the CRD refuses a change.)
# (spec.artifacts, read at start too, cannot change: the CRD refuses it.)
MASTER_SPEC_SECTIONS = ("budget", "faultTolerance", "master")
# The keys of spec.artifacts.s3.credentialsSecret, passed to the master as environment variables
# of the same names (what boto3 reads; morphml.distributed.s3store.SECRET_KEYS).
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
EVENT_SOURCE = "morphml-operator"


@dataclasses.dataclass(frozen=True)
class PodDefaults:
    """What the operator fills in where the spec leaves it out (from the operator's settings)."""

    master_image: str = "morphml-master:0.1.0"
    worker_image: str = "morphml-worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # Seconds a worker gets between SIGTERM and SIGKILL: enough to stop, hand its running trial
    # back to the master (Deregister) and exit; a finished-but-unreported result is sent too.
    worker_grace_seconds: int = 60
    master_grace_seconds: int = 30


# --------------------------------------------------------------------------- names and labels


def token_secret_name(name: str) -> str:
    return f"{name}-token"


def journal_pvc_name(name: str) -> str:
    return f"{name}-journal"


def experiment_configmap_name(name: str) -> str:
    return f"{name}-experiment"


def service_account_name(name: str) -> str:
    return f"{name}-pods"


def master_name(name: str) -> str:
    """The master Pod's and the master Service's name."""
    return f"{name}-master"


def worker_deployment_name(name: str) -> str:
    return f"{name}-worker"


def master_address(name: str) -> str:
    """host:port workers dial: the master Service, resolved in the experiment's namespace."""
    return f"{master_name(name)}:{MASTER_PORT}"


def labels(name: str, component: str | None = None) -> dict[str, str]:
    """Labels on everything an experiment owns; `component` is master, worker, journal, ..."""
    result = {
        "app.kubernetes.io/name": "morphml",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "morphml-operator",
        EXPERIMENT_LABEL: name,
    }
    if component:
        result[COMPONENT_LABEL] = component
    return result


def selector(name: str, component: str) -> dict[str, str]:
    """The labels that select one component of one experiment (stable: never change them)."""
    return {EXPERIMENT_LABEL: name, COMPONENT_LABEL: component}


def selector_string(name: str, component: str) -> str:
    """`selector` as a label selector string, e.g. for status.workers.selector."""
    return ",".join(f"{key}={value}" for key, value in selector(name, component).items())


def _metadata(name: str, namespace: str, object_name: str, component: str) -> dict[str, Any]:
    return {"name": object_name, "namespace": namespace, "labels": labels(name, component)}


# --------------------------------------------------------------------------- small objects


def build_token_secret(name: str, namespace: str, token: str) -> dict:
    """The Secret holding the experiment's token; only the master and its workers mount it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, namespace, token_secret_name(name), "token"),
        "type": "Opaque",
        "stringData": {"token": token},
    }


def build_journal_pvc(name: str, namespace: str, spec: Mapping[str, Any]) -> dict:
    """The claim the master keeps its journal on, so a new master pod resumes the search."""
    persistence = (spec.get("master") or {}).get("persistence") or {}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": persistence.get("size", "1Gi")}},
    }
    if persistence.get("storageClassName"):
        claim["storageClassName"] = persistence["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(name, namespace, journal_pvc_name(name), "journal"),
        "spec": claim,
    }


def experiment_document(name: str, namespace: str, spec: Mapping[str, Any]) -> dict:
    """The manifest the master reads: the experiment as the user applied it, defaults included."""
    return {
        "apiVersion": "morphml.io/v1alpha1",
        "kind": "NASExperiment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def build_experiment_configmap(name: str, namespace: str, spec: Mapping[str, Any]) -> dict:
    """The ConfigMap mounted into the master pod at /etc/morphml/experiment.yaml."""
    text = yaml.safe_dump(experiment_document(name, namespace, spec), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, experiment_configmap_name(name), "experiment"),
        "data": {"experiment.yaml": text},
    }


def build_service_account(name: str, namespace: str) -> dict:
    """The identity of the experiment's pods: bound to no Role, and its token is not mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(name, namespace, service_account_name(name), "pods"),
        "automountServiceAccountToken": False,
    }


def build_master_service(name: str, namespace: str, scrape_annotations: bool = False) -> dict:
    """The stable address workers dial: NAME-master:50051; Prometheus scrapes its `metrics` port;
    `kubectl port-forward svc/NAME-master 8080:dashboard` opens the dashboard.

    `scrape_annotations`: the prometheus.io/* annotations an annotation-based scrape config reads."""
    metadata = _metadata(name, namespace, master_name(name), "master")
    if scrape_annotations:
        metadata["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(MASTER_METRICS_PORT),
                                   "prometheus.io/path": "/metrics"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name, "master"),
            "ports": [{"name": "grpc", "port": MASTER_PORT, "targetPort": "grpc", "protocol": "TCP"},
                      {"name": "metrics", "port": MASTER_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
                      {"name": "dashboard", "port": MASTER_DASHBOARD_PORT, "targetPort": "dashboard",
                       "protocol": "TCP"}],
        },
    }


def build_master_network_policy(name: str, namespace: str) -> dict:
    """Only the experiment's workers and the MorphML operator may reach the master's gRPC port;
    anyone may reach its metrics port.

    (The token is the first lock; this keeps every other pod in the cluster from even trying.
    It takes effect where the cluster's network plugin enforces NetworkPolicy.)
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name, namespace, master_name(name), "master"),
        "spec": {
            "podSelector": {"matchLabels": selector(name, "master")},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": selector(name, "worker")}},
                    {"namespaceSelector": {},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "morphml",
                                                     COMPONENT_LABEL: "operator"}}},
                ],
                "ports": [{"protocol": "TCP", "port": MASTER_PORT}],
            }, {
                # Metrics are counts and timings only (no token, no architectures): any scraper may read them.
                "ports": [{"protocol": "TCP", "port": MASTER_METRICS_PORT}],
            }],
        },
    }


# --------------------------------------------------------------------------- pods


def _pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_env(name: str) -> list[dict]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The address the pod's servers bind (master gRPC, worker health): the pod's own IP, not
        # every interface, so pods that share a host network namespace never collide on a port.
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MORPHML_EXPERIMENT", "value": name},
        # The root filesystem is read-only; caches (torch, matplotlib) go to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _s3_credentials_env(spec: Mapping[str, Any]) -> list[dict]:
    """The master's S3 credentials from spec.artifacts.s3.credentialsSecret (the master alone talks
    to S3: workers never get them). Not optional: a Secret or key that is missing keeps the pod
    from starting (CreateContainerConfigError names it) rather than starting a master that
    cannot store its checkpoints."""
    s3 = (spec.get("artifacts") or {}).get("s3") or {}
    secret = s3.get("credentialsSecret")
    if not secret:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in S3_CREDENTIAL_KEYS]


def _token_volume(name: str) -> dict:
    return {
        "name": "token",
        "secret": {"secretName": token_secret_name(name), "defaultMode": 0o440,
                   "items": [{"key": "token", "path": "token"}]},
    }


def _grpc_probe(port: int, service: str, period: int, failures: int, initial_delay: int = 0) -> dict:
    return {
        "grpc": {"port": port, "service": service},
        "initialDelaySeconds": initial_delay,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _resources(section: Mapping[str, Any], fallback: dict) -> dict:
    resources = section.get("resources") or {}
    return {key: dict(value) for key, value in resources.items()} if resources else dict(fallback)


def master_command() -> list[str]:
    """The master container's command (Dockerfile.master's entrypoint is `morphml`)."""
    return [
        "morphml", "master", EXPERIMENT_PATH,
        "--port", str(MASTER_PORT),
        "--journal", JOURNAL_PATH,
        "--token-file", TOKEN_PATH,
        "--metrics-port", str(MASTER_METRICS_PORT),
        "--dashboard-port", str(MASTER_DASHBOARD_PORT),
    ]


def worker_command(name: str, gpus: int, slots: int = 1) -> list[str]:
    """The worker container's command (Dockerfile.worker's entrypoint is `morphml`).

    `--slots` only when a CPU worker runs more than one trial at once; `--health-port` serves
    grpc.health.v1 for the kubelet's probes.
    """
    command = ["morphml", "worker", "--master", master_address(name), "--token-file", TOKEN_PATH, "--gpus", str(gpus)]
    if gpus == 0 and slots != 1:
        command += ["--slots", str(slots)]
    return command + ["--health-port", str(WORKER_HEALTH_PORT)]


def master_spec_digests(spec: Mapping[str, Any]) -> dict[str, str]:
    """{section: digest} of every MASTER_SPEC_SECTIONS section of `spec`, for MASTER_SPEC_ANNOTATION."""
    return {section: hashlib.sha256(json.dumps(spec.get(section) or {}, sort_keys=True).encode()).hexdigest()[:16]
            for section in MASTER_SPEC_SECTIONS}


def master_restart_reason(annotation: str | None, spec: Mapping[str, Any]) -> str | None:
    """Why a master pod carrying MASTER_SPEC_ANNOTATION `annotation` must restart for `spec`; None: it need not.

    "spec.budget, spec.master changed" names the sections that differ. A pod without a readable
    annotation (made by an operator from before it existed) cannot say what it runs, so it is
    restarted once too: keeping it would leave a later change unapplied without a word.
    """
    try:
        running = json.loads(annotation) if annotation else None
    except ValueError:
        running = None
    if not isinstance(running, dict):
        return "the master pod does not record the spec it runs (made by an older operator)"
    wanted = master_spec_digests(spec)
    changed = [f"spec.{section}" for section in MASTER_SPEC_SECTIONS if running.get(section) != wanted[section]]
    return f"{', '.join(changed)} changed" if changed else None


def build_master_pod(name: str, namespace: str, spec: Mapping[str, Any], defaults: PodDefaults = PodDefaults()) -> dict:
    """The master: runs the search, serves gRPC on 50051, journals to the PVC.

    A bare Pod (not a Deployment) because there must never be two masters writing one journal;
    the operator recreates it when it goes away, and the new one resumes from the journal.
    """
    master = spec.get("master") or {}
    container = {
        "name": "master",
        "image": master.get("image") or defaults.master_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": master_command()[:1],
        "args": master_command()[1:],
        "ports": [{"name": "grpc", "containerPort": MASTER_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": MASTER_METRICS_PORT, "protocol": "TCP"},
                  {"name": "dashboard", "containerPort": MASTER_DASHBOARD_PORT, "protocol": "TCP"}],
        "env": _pod_env(name) + _s3_credentials_env(spec),
        "resources": _resources(master, {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}),
        # Health service name "morphml.Master" turns SERVING once the journal is open and the
        # search is loaded; "" only says the process is up (enough for liveness).
        "readinessProbe": _grpc_probe(MASTER_PORT, "morphml.Master", period=5, failures=3),
        "livenessProbe": _grpc_probe(MASTER_PORT, "", period=10, failures=6, initial_delay=10),
        "securityContext": _container_security_context(),
        "volumeMounts": [
            {"name": "experiment", "mountPath": EXPERIMENT_PATH, "subPath": "experiment.yaml", "readOnly": True},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "journal", "mountPath": JOURNAL_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**_metadata(name, namespace, master_name(name), "master"),
                     "annotations": {MASTER_SPEC_ANNOTATION: json.dumps(master_spec_digests(spec), sort_keys=True)}},
        "spec": {
            "serviceAccountName": service_account_name(name),
            "automountServiceAccountToken": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": defaults.master_grace_seconds,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": [
                {"name": "experiment", "configMap": {"name": experiment_configmap_name(name)}},
                _token_volume(name),
                {"name": "journal", "persistentVolumeClaim": {"claimName": journal_pvc_name(name)}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }


def desired_worker_replicas(spec: Mapping[str, Any], phase: str | None) -> int:
    """Workers wanted now: none while suspended or once the search is over (frees the GPUs)."""
    if spec.get("suspend") or phase in ("Succeeded", "Failed"):
        return 0
    return int((spec.get("workers") or {}).get("replicas", 1))


def build_worker_deployment(
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    replicas: int,
    defaults: PodDefaults = PodDefaults(),
) -> dict:
    """The workers: each dials the master, trains the trials it is leased, one per GPU.

    gpusPerWorker > 0 requests and limits nvidia.com/gpu (the scheduler then places the pod on a
    node with free GPUs) and tolerates the usual GPU-node taint. Liveness is the master's job
    (heartbeats) and the operator's (pod gone); the kubelet probes the worker's own health port
    so a wedged worker process is restarted.
    """
    workers = spec.get("workers") or {}
    gpus = int(workers.get("gpusPerWorker", 0))
    command = worker_command(name, gpus, int(workers.get("trialsPerWorker", 1)))
    resources = _resources(workers, {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}})
    tolerations = [dict(t) for t in workers.get("tolerations") or []]
    if gpus > 0:
        # Quantities are strings in the API (the client refuses a bare int).
        resources.setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
        gpu_toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu_toleration not in tolerations:
            tolerations.append(gpu_toleration)
    env = _pod_env(name)
    if gpus == 0:
        env.append({"name": "CUDA_VISIBLE_DEVICES", "value": ""})
    mounts: list[dict[str, Any]] = [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                                    {"name": "tmp", "mountPath": "/tmp"}]
    volumes = [_token_volume(name), {"name": "tmp", "emptyDir": {}}]
    # spec.workers.volumes: the user's claims (datasets), mounted as data-0, data-1, ...
    for index, volume in enumerate(workers.get("volumes") or []):
        read_only = bool(volume.get("readOnly", False))
        mounts.append({"name": f"data-{index}", "mountPath": volume["mountPath"], "readOnly": read_only})
        volumes.append({"name": f"data-{index}",
                        "persistentVolumeClaim": {"claimName": volume["claimName"], "readOnly": read_only}})
    container = {
        "name": "worker",
        "image": workers.get("image") or defaults.worker_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": command[:1],
        "args": command[1:],
        "ports": [{"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"}],
        "env": env,
        # Unready after ~2 x 5 s of a wedged process; the operator then reports the pod gone after
        # its worker_unready_seconds, well before 3 missed 10 s heartbeats would.
        "readinessProbe": _grpc_probe(WORKER_HEALTH_PORT, "morphml.Worker", period=5, failures=2),
        "livenessProbe": _grpc_probe(WORKER_HEALTH_PORT, "", period=15, failures=4, initial_delay=10),
        "resources": resources,
        "securityContext": _container_security_context(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(name),
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": defaults.worker_grace_seconds,
        "securityContext": _pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if workers.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(workers["nodeSelector"])
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, worker_deployment_name(name), "worker"),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name, "worker")},
            # No surge: a surge pod would wait for GPUs the old pod still holds.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels(name, "worker")}, "spec": pod_spec},
        },
    }


# --------------------------------------------------------------------------- events


def event_name(name: str, uid: str, key: str) -> str:
    """The name of the one Event for `key` on experiment `name`.

    The uid is part of it so a new experiment of the same name gets its own Events."""
    return f"{name}.{key}.{uid[:8]}"


def build_event(name: str, namespace: str, uid: str, key: str, type_: str, reason: str, message: str,
                now: str) -> dict:
    """A core/v1 Event on the experiment, named after `key` so that posting it twice makes one Event.

    (kopf's own events get generated names; a worker loss must exist once however often the
    operator tries to post it.)
    """
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(name, uid, key), "namespace": namespace, "labels": labels(name)},
        "involvedObject": {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "name": name,
                           "namespace": namespace, "uid": uid},
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
        "reportingInstance": EVENT_SOURCE,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
