"""Every example in examples/ passes a server-side dry run against a real kube-apiserver with the
NASExperiment CRD installed (issue 11, acceptance 4, for the examples that need a GPU or a download).

`kubectl apply --dry-run=server` runs the whole admission path (schema, defaults, CEL rules) and
stores nothing. For the GPU example the objects the operator would build from it (worker
Deployment requesting nvidia.com/gpu with the dataset claim mounted, master Pod, ...) go through
the same dry run, so a worker pod spec the API server would refuse fails here, not on a GPU
cluster. The examples that can run here also run for real in tests/process/test_examples.py.

Uses the `kube` and `kube_namespace` fixtures only (tests/cluster/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from morphml.experiment import load_manifest
from morphml_operator import builders

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "nasexperiments.morphml.io.yaml"
EXAMPLES = ROOT / "examples"
MANIFESTS = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
GPU_EXAMPLE = "cifar10-gpu.yaml"


@pytest.fixture(scope="module")
def crd(kube):
    """The CRD from crds/ installed and Established (idempotent: another test may have installed it)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))

    def established():
        status = kube.kubectl_json("get", "crd", "nasexperiments.morphml.io").get("status", {})
        conditions = status.get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    kube.wait_for(established, 60, 0.2, "the NASExperiment CRD to be Established")
    return CRD


def dry_run(kube, namespace: str, text: str) -> list[dict]:
    """The objects as the API server would store them (none is stored)."""
    done = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=text)
    reply = json.loads(done.stdout)
    return reply["items"] if reply.get("kind") == "List" else [reply]


def test_the_gpu_example_is_in_the_list():
    assert GPU_EXAMPLE in MANIFESTS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", MANIFESTS)
def test_example_passes_a_server_side_dry_run_with_the_defaults_morphml_run_applies(kube, crd, kube_namespace,
                                                                                    name):
    text = (EXAMPLES / name).read_text()
    documents = [d for d in yaml.safe_load_all(text) if d]
    stored = dry_run(kube, kube_namespace, text)
    assert [(o["kind"], o["metadata"]["name"]) for o in stored] == \
        [(d["kind"], d["metadata"]["name"]) for d in documents]
    for document, obj in zip(documents, stored, strict=True):
        if document["kind"] == "NASExperiment":
            # The API server's defaulting and CEL rules agree with `morphml run`'s (same CRD file).
            assert obj["spec"] == load_manifest(document).spec


@pytest.mark.timeout(120)
def test_the_gpu_example_worker_requests_a_gpu_and_mounts_the_dataset_claim(kube, crd, kube_namespace):
    documents = [d for d in yaml.safe_load_all((EXAMPLES / GPU_EXAMPLE).read_text()) if d]
    experiment = load_manifest(next(d for d in documents if d["kind"] == "NASExperiment"))
    spec, name, ns = experiment.spec, experiment.name, kube_namespace
    assert spec["workers"]["gpusPerWorker"] == 1
    assert spec["evaluation"]["dataset"] == {"name": "torchvision", "torchvisionName": "CIFAR10",
                                             "root": "/data/torchvision"}
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in documents if d["kind"] == "Job")
    assert spec["workers"]["volumes"] == [{"claimName": claim["metadata"]["name"], "mountPath": "/data",
                                           "readOnly": True}]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    # What the operator would create for it, through the API server's admission (nothing is stored;
    # only the ServiceAccount is created for real: admission of a pod looks its account up).
    kube.apply(builders.build_service_account(name, ns))
    built = [builders.build_token_secret(name, ns, "dry-run-token"),
             builders.build_experiment_configmap(name, ns, spec), builders.build_journal_pvc(name, ns, spec),
             builders.build_master_service(name, ns), builders.build_master_network_policy(name, ns),
             builders.build_master_pod(name, ns, spec),
             builders.build_worker_deployment(name, ns, spec, spec["workers"]["replicas"])]
    stored = dry_run(kube, ns, json.dumps({"apiVersion": "v1", "kind": "List", "items": built}))
    assert len(stored) == len(built)
    deployment = next(o for o in stored if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 4
    pod = deployment["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["resources"]["limits"][builders.GPU_RESOURCE] == "1"
    assert worker["resources"]["requests"][builders.GPU_RESOURCE] == "1"
    assert worker["image"] == "morphml-worker-torchvision:0.1.0"
    mount = next(m for m in worker["volumeMounts"] if m["mountPath"] == "/data")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount.get("readOnly") is True
    assert volume["persistentVolumeClaim"] == {"claimName": "cifar10-data", "readOnly": True}
