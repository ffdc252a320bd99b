"""Builders, security side (issue 6): master and worker pods are locked down, get a writable
/tmp (emptyDir) under their read-only root, bind to their own pod IP, and never see an API token.

Imports: pytest, morphml.experiment, morphml_operator.builders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from morphml.experiment import load_manifest
from morphml_operator import builders

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def pod_spec(kind: str) -> dict:
    spec = load_manifest(DIGITS).spec
    if kind == "master":
        return builders.build_master_pod("digits", "ml", spec)["spec"]
    return builders.build_worker_deployment("digits", "ml", spec, 2)["spec"]["template"]["spec"]


@pytest.mark.parametrize("kind", ["master", "worker"])
def test_containers_are_non_root_read_only_unprivileged_with_no_capabilities(kind):
    spec = pod_spec(kind)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged", False) is False
    assert "hostNetwork" not in spec and "hostPID" not in spec and "hostIPC" not in spec


@pytest.mark.parametrize("kind", ["master", "worker"])
def test_tmp_is_a_writable_empty_dir_and_home_points_there(kind):
    spec = pod_spec(kind)
    volumes = {v["name"]: v for v in spec["volumes"]}
    container = spec["containers"][0]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}} and not tmp.get("readOnly")
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    # Nothing else writable except the master's journal claim.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == ({"/tmp", "/var/lib/morphml"} if kind == "master" else {"/tmp"})


@pytest.mark.parametrize("kind", ["master", "worker"])
def test_servers_bind_the_pod_ip_from_the_downward_api(kind):
    env = pod_spec(kind)["containers"][0]["env"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in env


@pytest.mark.parametrize("kind", ["master", "worker"])
def test_no_api_token_and_the_experiment_token_read_only(kind):
    spec = pod_spec(kind)
    assert spec["automountServiceAccountToken"] is False
    token = next(v for v in spec["volumes"] if v["name"] == "token")
    assert token["secret"]["secretName"] == "digits-token" and token["secret"]["defaultMode"] == 0o440
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "token")
    assert mount["readOnly"] is True


def test_service_account_of_the_pods_mounts_no_token():
    assert builders.build_service_account("digits", "ml")["automountServiceAccountToken"] is False
