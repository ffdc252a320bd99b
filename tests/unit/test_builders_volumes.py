"""spec.workers.volumes: a user's PersistentVolumeClaims (datasets) mounted into every worker pod,
validated by the CRD the way `morphml run` and the API server both do."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from morphml.experiment import ManifestError, load_manifest
from morphml_operator.builders import build_worker_deployment

pytestmark = pytest.mark.unit

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def manifest(volumes):
    document = yaml.safe_load(DIGITS.read_text())
    document["spec"]["workers"]["volumes"] = copy.deepcopy(volumes)
    return document


def test_claims_are_mounted_in_the_worker_container_as_data_volumes():
    spec = load_manifest(manifest([{"claimName": "cifar10-data", "mountPath": "/data", "readOnly": True},
                                   {"claimName": "scratch", "mountPath": "/scratch"}])).spec
    assert spec["workers"]["volumes"][1]["readOnly"] is False  # defaulted
    pod = build_worker_deployment("digits", "ns", spec, 1)["spec"]["template"]["spec"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "data-0", "mountPath": "/data", "readOnly": True} in mounts
    assert {"name": "data-1", "mountPath": "/scratch", "readOnly": False} in mounts
    data0 = {"name": "data-0", "persistentVolumeClaim": {"claimName": "cifar10-data", "readOnly": True}}
    assert data0 in pod["volumes"]
    assert {"name": "data-1", "persistentVolumeClaim": {"claimName": "scratch", "readOnly": False}} in pod["volumes"]
    # the worker's own mounts stay
    assert {m["name"] for m in mounts} == {"token", "tmp", "data-0", "data-1"}


def test_no_volumes_leaves_the_worker_pod_as_before():
    pod = build_worker_deployment("digits", "ns", load_manifest(DIGITS).spec, 1)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["token", "tmp"]


@pytest.mark.parametrize(("volumes", "field", "says"), [
    ([{"mountPath": "/data"}], "spec.workers.volumes[0].claimName", "Required value"),
    ([{"claimName": "data", "mountPath": "data"}], "spec.workers.volumes[0].mountPath", "must match"),
    ([{"claimName": "Data_1", "mountPath": "/data"}], "spec.workers.volumes[0].claimName", "must match"),
    ([{"claimName": "a", "mountPath": "/etc/morphml/x"}], "spec.workers.volumes[0].mountPath", "under /etc/morphml"),
    ([{"claimName": "a", "mountPath": "/tmp"}], "spec.workers.volumes[0].mountPath", "may not be /tmp"),
    ([{"claimName": "a", "mountPath": "/d"}, {"claimName": "b", "mountPath": "/d"}], "spec.workers.volumes",
     "its own mountPath"),
])
def test_bad_volumes_are_refused_naming_the_field(volumes, field, says):
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest(volumes))
    assert field in caught.value.fields and says in str(caught.value), str(caught.value)
