"""Builders: a NASExperiment spec -> the manifests the operator creates. Expected outputs spelled out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morphml.experiment import load_manifest
from morphml_operator import builders
from morphml_operator.builders import PodDefaults

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"
LABELS = {
    "app.kubernetes.io/name": "morphml",
    "app.kubernetes.io/instance": "digits",
    "app.kubernetes.io/managed-by": "morphml-operator",
    "morphml.io/experiment": "digits",
}


@pytest.fixture
def spec() -> dict:
    """digits.yaml's spec with the CRD defaults applied, as the API server hands it to the operator."""
    return load_manifest(DIGITS).spec


def gpu_spec(spec: dict, gpus: int) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(spec))
    spec["workers"]["gpusPerWorker"] = gpus
    return spec


def test_token_secret():
    assert builders.build_token_secret("digits", "ml", "s3cret") == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "digits-token", "namespace": "ml",
                     "labels": {**LABELS, "app.kubernetes.io/component": "token"}},
        "type": "Opaque",
        "stringData": {"token": "s3cret"},
    }


def test_journal_pvc_uses_size_and_storage_class(spec):
    spec["master"]["persistence"] = {"size": "5Gi", "storageClassName": "fast"}
    assert builders.build_journal_pvc("digits", "ml", spec)["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }


def test_journal_pvc_default_leaves_storage_class_to_the_cluster(spec):
    assert builders.build_journal_pvc("digits", "ml", spec)["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }


def test_experiment_configmap_holds_a_manifest_the_master_can_load(spec):
    configmap = builders.build_experiment_configmap("digits", "ml", spec)
    assert configmap["metadata"]["name"] == "digits-experiment"
    experiment = load_manifest(configmap["data"]["experiment.yaml"])
    assert (experiment.name, experiment.namespace, experiment.spec) == ("digits", "ml", spec)


def test_service_account_has_no_token_mounted():
    account = builders.build_service_account("digits", "ml")
    assert account["metadata"]["name"] == "digits-pods"
    assert account["automountServiceAccountToken"] is False


def test_master_service_selects_the_master_pod_on_grpc():
    service = builders.build_master_service("digits", "ml")
    assert service["metadata"]["name"] == "digits-master"
    assert service["spec"] == {
        "type": "ClusterIP",
        "selector": {"morphml.io/experiment": "digits", "app.kubernetes.io/component": "master"},
        "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP"},
                  {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"},
                  {"name": "dashboard", "port": 8080, "targetPort": "dashboard", "protocol": "TCP"}],
    }
    assert "annotations" not in service["metadata"]
    master = builders.build_master_pod("digits", "ml", {})
    assert service["spec"]["selector"].items() <= master["metadata"]["labels"].items()
    assert {p["name"] for p in master["spec"]["containers"][0]["ports"]} == {"grpc", "metrics", "dashboard"}
    annotated = builders.build_master_service("digits", "ml", scrape_annotations=True)
    assert annotated["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                                                    "prometheus.io/path": "/metrics"}


def test_master_pod_runs_exactly_the_master_command(spec):
    container = builders.build_master_pod("digits", "ml", spec)["spec"]["containers"][0]
    assert container["command"] + container["args"] == [
        "morphml", "master", "/etc/morphml/experiment.yaml",
        "--port", "50051",
        "--journal", "/var/lib/morphml/journal.db",
        "--token-file", "/etc/morphml/token/token",
        "--metrics-port", "9464",
        "--dashboard-port", "8080",
    ]
    assert container["image"] == "morphml-master:0.1.0"


def test_master_pod_mounts_manifest_token_and_journal(spec):
    pod = builders.build_master_pod("digits", "ml", spec)
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["/etc/morphml/experiment.yaml"]["subPath"] == "experiment.yaml"
    assert volumes[mounts["/etc/morphml/experiment.yaml"]["name"]]["configMap"] == {"name": "digits-experiment"}
    assert volumes[mounts["/etc/morphml/token"]["name"]]["secret"]["secretName"] == "digits-token"
    assert volumes[mounts["/var/lib/morphml"]["name"]]["persistentVolumeClaim"] == {"claimName": "digits-journal"}


def test_master_pod_probes_the_grpc_health_service(spec):
    container = builders.build_master_pod("digits", "ml", spec)["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "morphml.Master"}
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}


@pytest.mark.parametrize("kind", ["master", "worker"])
def test_pods_run_locked_down(spec, kind):
    if kind == "master":
        pod_spec = builders.build_master_pod("digits", "ml", spec)["spec"]
    else:
        pod_spec = builders.build_worker_deployment("digits", "ml", spec, 2)["spec"]["template"]["spec"]
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod_spec["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod_spec["serviceAccountName"] == "digits-pods"
    assert pod_spec["automountServiceAccountToken"] is False


def test_worker_deployment_for_cpu_workers(spec):
    deployment = builders.build_worker_deployment("digits", "ml", spec, 2)
    assert deployment["metadata"]["name"] == "digits-worker"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {
        "matchLabels": {"morphml.io/experiment": "digits", "app.kubernetes.io/component": "worker"}}
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["command"] + container["args"] == [
        "morphml", "worker", "--master", "digits-master:50051",
        "--token-file", "/etc/morphml/token/token", "--gpus", "0", "--health-port", "50052",
    ]
    assert container["readinessProbe"]["grpc"] == {"port": 50052, "service": "morphml.Worker"}
    assert container["livenessProbe"]["grpc"] == {"port": 50052, "service": ""}
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    assert {"name": "CUDA_VISIBLE_DEVICES", "value": ""} in container["env"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    assert "tolerations" not in pod_spec and "nodeSelector" not in pod_spec
    assert pod_spec["terminationGracePeriodSeconds"] == 60


def test_worker_deployment_requests_and_limits_gpus(spec):
    deployment = builders.build_worker_deployment("digits", "ml", gpu_spec(spec, 1), 3)
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    assert container["args"][-4:] == ["--gpus", "1", "--health-port", "50052"]
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert not any(e["name"] == "CUDA_VISIBLE_DEVICES" for e in container["env"])
    # A surge pod would wait for GPUs the pod it replaces still holds.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_worker_deployment_takes_image_resources_selector_tolerations_from_spec(spec):
    spec["workers"].update({
        "gpusPerWorker": 2,
        "image": "registry.example/morphml-worker:cuda",
        "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "16Gi"}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    })
    pod_spec = builders.build_worker_deployment("digits", "ml", spec, 1)["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["image"] == "registry.example/morphml-worker:cuda"
    assert container["resources"] == {"requests": {"cpu": "4", "nvidia.com/gpu": "2"},
                                      "limits": {"memory": "16Gi", "nvidia.com/gpu": "2"}}
    assert pod_spec["nodeSelector"] == {"gpu": "a100"}
    assert pod_spec["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    assert spec["workers"]["resources"] == {"requests": {"cpu": "4"}, "limits": {"memory": "16Gi"}}, "spec mutated"


def test_operator_defaults_fill_images_and_grace():
    defaults = PodDefaults(master_image="m:1", worker_image="w:1", image_pull_policy="Always", worker_grace_seconds=90)
    master = builders.build_master_pod("digits", "ml", {}, defaults)["spec"]["containers"][0]
    worker = builders.build_worker_deployment("digits", "ml", {}, 1, defaults)["spec"]["template"]["spec"]
    assert (master["image"], master["imagePullPolicy"]) == ("m:1", "Always")
    assert (worker["containers"][0]["image"], worker["terminationGracePeriodSeconds"]) == ("w:1", 90)


@pytest.mark.parametrize(
    ("suspend", "phase", "expected"),
    [(False, None, 2), (False, "Running", 2), (True, "Running", 0), (False, "Succeeded", 0), (False, "Failed", 0)],
)
def test_desired_worker_replicas(spec, suspend, phase, expected):
    spec["suspend"] = suspend
    assert builders.desired_worker_replicas(spec, phase) == expected


def test_every_owned_object_is_named_after_the_experiment(spec):
    objects = [
        builders.build_service_account("digits", "ml"),
        builders.build_token_secret("digits", "ml", "t"),
        builders.build_experiment_configmap("digits", "ml", spec),
        builders.build_journal_pvc("digits", "ml", spec),
        builders.build_master_service("digits", "ml"),
        builders.build_master_network_policy("digits", "ml"),
        builders.build_master_pod("digits", "ml", spec),
        builders.build_worker_deployment("digits", "ml", spec, 2),
    ]
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ServiceAccount", "digits-pods"),
        ("Secret", "digits-token"),
        ("ConfigMap", "digits-experiment"),
        ("PersistentVolumeClaim", "digits-journal"),
        ("Service", "digits-master"),
        ("NetworkPolicy", "digits-master"),
        ("Pod", "digits-master"),
        ("Deployment", "digits-worker"),
    ]
    assert all(o["metadata"]["namespace"] == "ml" and o["metadata"]["labels"]["morphml.io/experiment"] == "digits"
               for o in objects)


def test_selector_string_matches_the_worker_pod_labels():
    assert builders.selector_string("digits", "worker") == (
        "morphml.io/experiment=digits,app.kubernetes.io/component=worker")


def test_cpu_worker_with_several_trials_gets_slots(spec):
    spec["workers"]["trialsPerWorker"] = 3
    container = builders.build_worker_deployment("digits", "ml", spec, 1)["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-6:] == ["--gpus", "0", "--slots", "3", "--health-port", "50052"]
    gpu_deployment = builders.build_worker_deployment("digits", "ml", gpu_spec(spec, 2), 1)
    gpu = gpu_deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--slots" not in gpu["args"]  # a GPU worker runs one trial per GPU


def test_master_network_policy_admits_only_workers_and_the_operator():
    policy = builders.build_master_network_policy("digits", "ml")
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"morphml.io/experiment": "digits", "app.kubernetes.io/component": "master"}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"morphml.io/experiment": "digits",
                                                 "app.kubernetes.io/component": "worker"}}},
                {"namespaceSelector": {},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "morphml",
                                                 "app.kubernetes.io/component": "operator"}}},
            ],
            "ports": [{"protocol": "TCP", "port": 50051}],
        }, {
            "ports": [{"protocol": "TCP", "port": 9464}],  # metrics: from anywhere
        }],
    }
    worker_labels = builders.build_worker_deployment("digits", "ml", {}, 1)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= worker_labels.items()


def changed(spec: dict, **sections) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(spec))
    for section, value in sections.items():
        spec[section] = {**(spec.get(section) or {}), **value}
    return spec


def test_master_pod_records_the_spec_sections_it_was_started_with(spec):
    pod = builders.build_master_pod("digits", "ml", spec)
    annotation = pod["metadata"]["annotations"][builders.MASTER_SPEC_ANNOTATION]
    assert set(yaml.safe_load(annotation)) == {"budget", "faultTolerance", "master"}
    assert builders.master_restart_reason(annotation, spec) is None
    # Fields that reach the workers or the Deployment do not restart the master.
    scaled = changed(spec, workers={"replicas": 7, "image": "morphml-worker:0.2.0"})
    scaled["suspend"] = True
    assert builders.master_restart_reason(annotation, scaled) is None


@pytest.mark.parametrize(("sections", "expected"), [
    ({"budget": {"maxTrials": 99}}, "spec.budget changed"),
    ({"faultTolerance": {"heartbeatIntervalSeconds": 2}}, "spec.faultTolerance changed"),
    ({"master": {"image": "morphml-master:0.2.0"}}, "spec.master changed"),
    ({"master": {"resources": {"limits": {"memory": "8Gi"}}}, "budget": {"maxFailedTrials": 1}},
     "spec.budget, spec.master changed"),
])
def test_a_changed_master_section_is_named(spec, sections, expected):
    pod = builders.build_master_pod("digits", "ml", spec)
    annotation = pod["metadata"]["annotations"][builders.MASTER_SPEC_ANNOTATION]
    assert builders.master_restart_reason(annotation, changed(spec, **sections)) == expected


@pytest.mark.parametrize("annotation", [None, "", "not json", "[1, 2]"])
def test_a_master_pod_that_does_not_record_its_spec_is_restarted_once(spec, annotation):
    # Made by an older operator: what it runs is unknown, so a later change would go unapplied.
    reason = builders.master_restart_reason(annotation, spec)
    assert reason and "does not record the spec" in reason


def test_keyed_event_is_named_after_its_key_and_points_at_the_experiment():
    event = builders.build_event("digits", "ml", "0123456789abcdef", "worker-loss-7", "Warning", "WorkerLost",
                                 "worker digits-worker-x lost (detected by stream); 1 trial back in the queue",
                                 "2026-12-01T10:00:00Z")
    assert event["metadata"]["name"] == "digits.worker-loss-7.01234567"
    assert event["involvedObject"] == {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "name": "digits",
                                       "namespace": "ml", "uid": "0123456789abcdef"}
    assert (event["type"], event["reason"], event["count"]) == ("Warning", "WorkerLost", 1)
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-12-01T10:00:00Z"
    # Another experiment of the same name (a new uid) gets its own Event for its loss #7.
    assert builders.event_name("digits", "fedcba98", "worker-loss-7") != event["metadata"]["name"]
