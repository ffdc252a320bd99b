"""Least privilege, pinned with `kubectl auth can-i` against the real API server (issue 5/6).

The chart's operator ServiceAccount can do exactly what morphml_operator.handlers (and kopf) use;
an experiment's pods' ServiceAccount (`NAME-pods`, used by master and workers) can do nothing.
Imports: pytest, the standard library.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "morphml"

OPERATOR_ALLOWED = [
    ("get", "nasexperiments.morphml.io"), ("list", "nasexperiments.morphml.io"),
    ("watch", "nasexperiments.morphml.io"), ("patch", "nasexperiments.morphml.io"),
    ("patch", "nasexperiments.morphml.io/status"), ("update", "nasexperiments.morphml.io/finalizers"),
    ("create", "pods"), ("delete", "pods"), ("watch", "pods"), ("list", "pods"), ("get", "pods"),
    ("create", "services"), ("get", "services"), ("create", "secrets"), ("get", "secrets"),
    ("create", "persistentvolumeclaims"), ("create", "serviceaccounts"),
    ("create", "configmaps"), ("patch", "configmaps"),
    ("create", "deployments.apps"), ("patch", "deployments.apps"), ("update", "deployments.apps"),
    ("create", "events"), ("create", "networkpolicies.networking.k8s.io"), ("get", "networkpolicies.networking.k8s.io"),
]
OPERATOR_DENIED = [
    ("list", "secrets"), ("watch", "secrets"), ("delete", "secrets"), ("update", "secrets"),
    ("delete", "nasexperiments.morphml.io"), ("create", "nasexperiments.morphml.io"),
    ("delete", "deployments.apps"), ("delete", "services"), ("delete", "persistentvolumeclaims"),
    ("create", "pods/exec"), ("update", "pods"), ("patch", "pods"),
    ("create", "roles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("get", "nodes"), ("list", "namespaces"), ("delete", "networkpolicies.networking.k8s.io"), ("create", "customresourcedefinitions.apiextensions.k8s.io"),
]
POD_ACCOUNT_DENIED = [
    ("get", "pods"), ("list", "pods"), ("get", "secrets"), ("get", "configmaps"),
    ("get", "nasexperiments.morphml.io"), ("patch", "nasexperiments.morphml.io/status"), ("create", "events"),
]


def digits_suspended() -> dict:
    """examples/digits.yaml, suspended (no workers train): enough to see the operator create things."""
    import yaml

    manifest = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    manifest["spec"]["suspend"] = True
    return manifest


def can_i(kube, verb: str, resource: str, account: str, namespace: str) -> bool:
    resource, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    done = kube.kubectl("auth", "can-i", verb, resource, *extra, "-n", namespace, f"--as={account}", check=False)
    return done.stdout.strip() == "yes"


@pytest.mark.timeout(240)
def test_operator_can_do_exactly_what_its_handlers_use(kube, kube_namespace):
    ns = kube_namespace
    kube.helm("install", "rbac-check", str(CHART), "--namespace", ns,
              "--set", f"operator.watchNamespaces={{{ns}}}", "--set", "operator.statusIntervalSeconds=30",
              timeout=120)
    try:
        account = f"system:serviceaccount:{ns}:rbac-check-morphml-operator"
        allowed = [(verb, res) for verb, res in OPERATOR_ALLOWED if not can_i(kube, verb, res, account, ns)]
        assert allowed == [], f"operator lacks {allowed}"
        denied = [(verb, res) for verb, res in OPERATOR_DENIED if can_i(kube, verb, res, account, ns)]
        assert denied == [], f"operator has more than it needs: {denied}"
        # watchNamespaces set: nothing outside those namespaces.
        assert not can_i(kube, "list", "nasexperiments.morphml.io", account, "default")
        assert not can_i(kube, "create", "pods", account, "default")
        # ... and the operator runs with only that: Ready, no Forbidden in its log.
        pods = kube.wait_pods_ready(ns, "app.kubernetes.io/instance=rbac-check", 1, timeout=90)
        kube.apply(digits_suspended(), ns)
        kube.wait_for(lambda: kube.kubectl("get", "deployment", "digits-worker", "-n", ns, check=False).returncode == 0,
                      60, 0.5, "the operator to create the worker Deployment")
        log = kube.pod_log(ns, pods[0]["metadata"]["name"])
        assert "Forbidden" not in log, log[-4000:]
    finally:
        kube.helm("uninstall", "rbac-check", "--namespace", ns, "--wait", "--timeout", "60s", check=False)


@pytest.mark.timeout(60)
def test_experiment_pods_service_account_can_do_nothing(kube, kube_namespace):
    from morphml_operator import builders

    ns = kube_namespace
    kube.apply(builders.build_service_account("digits", ns), ns)
    account = f"system:serviceaccount:{ns}:digits-pods"
    granted = [(verb, res) for verb, res in POD_ACCOUNT_DENIED if can_i(kube, verb, res, account, ns)]
    assert granted == []
