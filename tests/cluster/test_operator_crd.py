"""The NASExperiment CRD on a real kube-apiserver: accepted, explained, defaulted, scaled, and
refusing every bad manifest of tests/unit/test_manifest_bad.py with the same field named.

No operator runs here: these pin what the API server itself does with the CRD (issue 5,
acceptance 5 and 6). Imports: pytest, PyYAML, morphml.experiment, the shared bad-manifest table.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from morphml.experiment import load_manifest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "nasexperiments.morphml.io.yaml"
CHART = ROOT / "helm" / "morphml"
DIGITS = ROOT / "examples" / "digits.yaml"


def _load_bad_manifest_table():
    table = ROOT / "tests" / "unit" / "test_manifest_bad.py"
    spec = importlib.util.spec_from_file_location("morphml_bad_manifest_table", table)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.BAD_MANIFESTS


BAD_MANIFESTS = _load_bad_manifest_table()


@pytest.fixture(scope="module")
def crd(kube):
    """The CRD installed from crds/ and Established (idempotent: helm may have installed it already)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    wait_established(kube)
    return CRD


def wait_established(kube) -> None:
    def established():
        crd = kube.kubectl_json("get", "crd", "nasexperiments.morphml.io")
        conditions = crd.get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    kube.wait_for(established, 60, 0.2, "the NASExperiment CRD to be Established")


@pytest.mark.timeout(120)
def test_crd_is_accepted_and_established(kube, crd):
    crd_object = kube.kubectl_json("get", "crd", "nasexperiments.morphml.io")
    conditions = {c["type"]: c["status"] for c in crd_object["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"
    assert "NonStructuralSchema" not in conditions


@pytest.mark.timeout(60)
def test_kubectl_explain_describes_the_optimizer(kube, crd):
    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    explained = kube.wait_for(lambda: kube.kubectl("explain", "nasexperiment.spec.optimizer", check=False).stdout,
                              60, 0.5, "kubectl explain to know NASExperiment")
    assert "elitism" in explained and "tournamentSize" in explained
    assert "Best candidates copied unchanged into the next generation" in explained
    short = kube.kubectl("explain", "nasexp.spec.faultTolerance.missedHeartbeats").stdout
    assert "declared dead" in short


@pytest.mark.timeout(60)
def test_api_server_defaults_match_morphml_run(kube, crd, kube_namespace):
    """The API server's structural defaulting and load_manifest's give the same spec."""
    created = json.loads(kube.kubectl("create", "--dry-run=server", "-o", "json", "-n", kube_namespace,
                                      "-f", str(DIGITS)).stdout)
    assert created["spec"] == load_manifest(DIGITS).spec
    minimal = {
        "apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": "tiny"},
        "spec": {"searchSpace": {"layers": [{"block": {"layers": [{"type": "dense", "units": [8]}]}}]},
                 "evaluation": {"dataset": {"name": "synthetic"}}},
    }
    created = json.loads(kube.kubectl("create", "--dry-run=server", "-o", "json", "-n", kube_namespace, "-f", "-",
                                      input=json.dumps(minimal)).stdout)
    assert created["spec"] == load_manifest(minimal).spec


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=lambda case: case.name)
def test_api_server_refuses_bad_manifest_naming_the_field(kube, crd, kube_namespace, case):
    refused = kube.kubectl("create", "--dry-run=server", "-n", kube_namespace, "-f", "-",
                           input=json.dumps(case.manifest()), check=False)
    assert refused.returncode != 0, f"the API server accepted {case.name}"
    assert case.field in refused.stderr, refused.stderr


@pytest.mark.timeout(60)
def test_scale_subresource_sets_worker_replicas(kube, crd, kube_namespace):
    kube.kubectl("create", "-n", kube_namespace, "-f", str(DIGITS))
    kube.kubectl("scale", "nasexperiment", "digits", "--replicas", "3", "-n", kube_namespace)
    assert kube.kubectl_json("get", "nasexp", "digits", "-n", kube_namespace)["spec"]["workers"]["replicas"] == 3
    refused = kube.kubectl("scale", "nasexperiment", "digits", "--replicas", "-1", "-n", kube_namespace, check=False)
    assert refused.returncode != 0


@pytest.mark.timeout(60)
def test_printer_columns_show_status(kube, crd, kube_namespace):
    kube.kubectl("create", "-n", kube_namespace, "-f", str(DIGITS))
    status = {"status": {"phase": "Running", "workersSummary": "2/2", "trialsSummary": "12/24",
                         "best": {"value": 0.97, "summary": "0.9700 conv16k3-pool2-fc64"},
                         "trials": {"failed": 1}}}
    kube.kubectl("patch", "nasexperiment", "digits", "-n", kube_namespace, "--subresource=status",
                 "--type=merge", "-p", json.dumps(status))
    table = kube.kubectl("get", "nasexperiments", "-n", kube_namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "WORKERS", "TRIALS", "BEST", "AGE"]
    assert table[1].split()[:6] == ["digits", "Running", "2/2", "12/24", "0.9700", "conv16k3-pool2-fc64"]
    wide = kube.kubectl("get", "nasexp", "-o", "wide", "-n", kube_namespace).stdout.splitlines()
    assert "FAILED" in wide[0].split()


@pytest.mark.timeout(120)
def test_helm_lint_and_server_dry_run_of_the_chart(kube, crd, kube_namespace):
    lint = kube.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout
    for extra in ([], ["--set", f"operator.watchNamespaces={{{kube_namespace}}}"]):
        rendered = kube.helm("template", "morphml", str(CHART), "--namespace", kube_namespace, "--include-crds",
                             *extra).stdout
        kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
        assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
        kube.kubectl("apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=rendered)


@pytest.mark.timeout(60)
def test_search_definition_is_immutable_but_budget_and_workers_change(kube, crd, kube_namespace):
    ns = kube_namespace
    kube.kubectl("create", "-n", ns, "-f", str(DIGITS))
    for field, patch in [
        ("spec.optimizer", {"optimizer": {"populationSize": 10}}),
        ("spec.searchSpace", {"searchSpace": {"layers": [{"type": "flatten"}, {"type": "dense", "units": [8]}]}}),
        ("spec.evaluation", {"evaluation": {"epochs": 2}}),
        ("spec.objective", {"objective": {"metric": "val_loss", "goal": "minimize"}}),
    ]:
        refused = kube.kubectl("patch", "nasexperiment", "digits", "-n", ns, "--type=merge",
                               "-p", json.dumps({"spec": patch}), check=False)
        assert refused.returncode != 0 and field in refused.stderr, (field, refused.stderr)
        assert "cannot change once the experiment exists" in refused.stderr
    kube.kubectl("patch", "nasexperiment", "digits", "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"budget": {"maxTrials": 40}, "workers": {"replicas": 4}, "suspend": True}}))
    spec = kube.kubectl_json("get", "nasexperiment", "digits", "-n", ns)["spec"]
    assert (spec["budget"]["maxTrials"], spec["workers"]["replicas"], spec["suspend"]) == (40, 4, True)
