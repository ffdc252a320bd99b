"""Least privilege, pinned with `kubectl auth can-i` against the real API server (issue 5/6).

The chart's operator ServiceAccount can do exactly what morphml_operator.handlers (and kopf) use;
an experiment's pods' ServiceAccount (`NAME-pods`, used by master and workers) can do nothing.
"Exactly" and "nothing" are checked twice: spot checks with `kubectl auth can-i VERB RESOURCE`, and
the whole rule list (`kubectl auth can-i --list`) compared with OPERATOR_RULES / with what any
authenticated identity gets (self reviews, discovery). docs/kubernetes.md shows the same matrix.
Imports: pytest, the standard library, morphml_operator.builders.
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
    ("get", "nodes"), ("list", "namespaces"), ("delete", "networkpolicies.networking.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
]
POD_ACCOUNT_DENIED = [
    (verb, resource)
    for resource in ("pods", "pods/exec", "pods/log", "secrets", "configmaps", "services", "endpoints",
                     "persistentvolumeclaims", "serviceaccounts/token", "events", "deployments.apps",
                     "nasexperiments.morphml.io", "nasexperiments.morphml.io/status", "leases.coordination.k8s.io",
                     "networkpolicies.networking.k8s.io", "nodes", "namespaces")
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
] + [("*", "*")]
# What the operator's rules grant, resource -> verbs (helm/morphml/templates/_helpers.tpl, morphml.rules).
OPERATOR_RULES = {
    "nasexperiments.morphml.io": {"get", "list", "watch", "patch"},
    "nasexperiments.morphml.io/status": {"get", "patch"},
    "nasexperiments.morphml.io/finalizers": {"update"},
    "pods": {"get", "list", "watch", "create", "delete"},
    "services": {"get", "create"}, "persistentvolumeclaims": {"get", "create"},
    "serviceaccounts": {"get", "create"}, "secrets": {"get", "create"},
    "configmaps": {"get", "create", "patch"},
    "deployments.apps": {"get", "create", "patch", "update"},
    "networkpolicies.networking.k8s.io": {"get", "create"},
    "events": {"create"}, "events.events.k8s.io": {"create"},
}


def digits_suspended() -> dict:
    """examples/digits.yaml, suspended (no workers train): enough to see the operator create things."""
    import yaml

    manifest = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    manifest["spec"]["suspend"] = True
    return manifest


def granted_rules(kube, account: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` for `account` in `namespace`: resource -> verbs (URL rules left out)."""
    lines = kube.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={account}").stdout.splitlines()
    rules: dict[str, set[str]] = {}
    for line in lines[1:]:
        if not line.strip() or line.startswith(" "):
            continue  # a non-resource URL (discovery, healthz): no resource in the first column
        resource, verbs = line.split()[0], line[line.rindex("[") + 1:line.rindex("]")].split()
        rules.setdefault(resource, set()).update(verbs)
    return rules


def baseline_rules(kube, namespace: str) -> dict[str, set[str]]:
    """What any authenticated ServiceAccount bound to nothing gets (self reviews, discovery)."""
    return granted_rules(kube, f"system:serviceaccount:{namespace}:bound-to-nothing", namespace)


def can_i(kube, verb: str, resource: str, account: str, namespace: str) -> bool:
    resource, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    done = kube.kubectl("auth", "can-i", verb, resource, *extra, "-n", namespace, f"--as={account}", check=False)
    return done.stdout.strip() == "yes"


@pytest.mark.timeout(240)
def test_operator_can_do_exactly_what_its_handlers_use(kube, kube_namespace, morphml_images):
    ns = kube_namespace
    kube.helm("install", "rbac-check", str(CHART), "--namespace", ns,
              "--set", f"image.tag={morphml_images['master'].tag}", "--set", "image.pullPolicy=Never",
              "--set", f"operator.watchNamespaces={{{ns}}}", "--set", "operator.statusIntervalSeconds=30",
              timeout=120)
    try:
        account = f"system:serviceaccount:{ns}:rbac-check-morphml-operator"
        allowed = [(verb, res) for verb, res in OPERATOR_ALLOWED if not can_i(kube, verb, res, account, ns)]
        assert allowed == [], f"operator lacks {allowed}"
        denied = [(verb, res) for verb, res in OPERATOR_DENIED if can_i(kube, verb, res, account, ns)]
        assert denied == [], f"operator has more than it needs: {denied}"
        baseline = baseline_rules(kube, ns)
        extra = {res: verbs - baseline.get(res, set()) for res, verbs in granted_rules(kube, account, ns).items()}
        assert {res: verbs for res, verbs in extra.items() if verbs} == OPERATOR_RULES
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
        # The pods the operator made run as NAME-pods with no API token: the matrix below is theirs.
        kube.wait_for(lambda: kube.kubectl("get", "pod", "digits-master", "-n", ns, check=False).returncode == 0,
                      60, 0.5, "the master pod")
        master = kube.kubectl_json("get", "pod", "digits-master", "-n", ns)
        template = kube.kubectl_json("get", "deployment", "digits-worker", "-n", ns)["spec"]["template"]["spec"]
        for pod_spec in (master["spec"], template):
            assert pod_spec["serviceAccountName"] == "digits-pods"
            assert pod_spec["automountServiceAccountToken"] is False
            # ... and locked down as the API server stored them (issue 6).
            assert pod_spec["securityContext"]["runAsNonRoot"] is True
            assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            context = pod_spec["containers"][0]["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
        operator_pod = pods[0]
        assert operator_pod["spec"]["securityContext"]["runAsNonRoot"] is True
        context = operator_pod["spec"]["containers"][0]["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    finally:
        kube.helm("uninstall", "rbac-check", "--namespace", ns, "--wait", "--timeout", "60s", check=False)


@pytest.mark.timeout(240)
def test_experiment_pods_service_account_can_do_nothing(kube, kube_namespace):
    from morphml_operator import builders

    ns = kube_namespace
    kube.apply(builders.build_service_account("digits", ns), ns)
    account = f"system:serviceaccount:{ns}:digits-pods"
    granted = [(verb, res) for verb, res in POD_ACCOUNT_DENIED if can_i(kube, verb, res, account, ns)]
    assert granted == []
    # Nothing at all beyond what every authenticated identity has.
    assert granted_rules(kube, account, ns) == baseline_rules(kube, ns)
