"""spec.artifacts.s3 validated: by the CRD schema (what kubectl apply and morphml run refuse) and by
S3Settings.from_spec (what the master maps), each error naming the field; the credentials Secret
reaches the master pod only, as environment variables. No S3 server here (test_s3store.py has it)."""

from __future__ import annotations

import copy

import pytest

from morphml.distributed.checkpoints import ArtifactSettings
from morphml.distributed.s3store import S3Settings
from morphml.experiment import ManifestError, load_manifest
from morphml_operator import builders

BASE = {
    "apiVersion": "morphml.io/v1alpha1",
    "kind": "NASExperiment",
    "metadata": {"name": "digits-s3", "namespace": "ml"},
    "spec": {
        "searchSpace": {"layers": [{"type": "flatten"}, {"type": "dense", "units": [16]}]},
        "evaluation": {"dataset": {"name": "digits"}},
    },
}


def manifest(s3: dict | None = None, **artifacts) -> dict:
    document = copy.deepcopy(BASE)
    section = dict(artifacts)
    if s3 is not None:
        section["s3"] = s3
    document["spec"]["artifacts"] = section
    return document


def test_absent_artifacts_default_to_the_masters_volume_with_checkpoints_every_epoch():
    experiment = load_manifest(copy.deepcopy(BASE))
    assert experiment.spec["artifacts"] == {"checkpointIntervalEpochs": 1, "keep": "best"}
    settings = ArtifactSettings.from_spec(experiment.spec["artifacts"])
    assert settings.s3 is None and settings.checkpoint_interval == 1 and settings.keep == "best"


def test_a_full_s3_section_reaches_the_settings():
    experiment = load_manifest(manifest({"endpoint": "http://s3.example:8333/", "bucket": "nas-runs",
                                         "prefix": "/teams/vision/", "credentialsSecret": "s3-creds"}))
    settings = ArtifactSettings.from_spec(experiment.spec["artifacts"])
    assert settings.s3 == S3Settings(bucket="nas-runs", endpoint="http://s3.example:8333", prefix="teams/vision",
                                     credentials_secret="s3-creds", region="us-east-1")
    assert settings.s3.url() == "s3://nas-runs/teams/vision"


@pytest.mark.parametrize(("s3", "field"), [
    ({"endpoint": "http://x:1"}, "spec.artifacts.s3.bucket"),
    ({"bucket": "Has_Upper"}, "spec.artifacts.s3.bucket"),
    ({"bucket": "ok-bucket", "endpoint": "ftp://host"}, "spec.artifacts.s3.endpoint"),
    ({"bucket": "ok-bucket", "endpoint": "http://host/bucket/path"}, "spec.artifacts.s3.endpoint"),
    ({"bucket": "ok-bucket", "prefix": "a/../b"}, "spec.artifacts.s3.prefix"),
    ({"bucket": "ok-bucket", "credentialsSecret": "Not A Name"}, "spec.artifacts.s3.credentialsSecret"),
    ({"bucket": "ok-bucket", "region": "US East"}, "spec.artifacts.s3.region"),
    ({"bucket": "ok-bucket", "accessKey": "AKIA..."}, "spec.artifacts.s3.accessKey"),
])
def test_bad_s3_fields_are_refused_naming_the_field(s3, field):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest(s3))
    assert field in info.value.fields, info.value
    # The master's own mapping refuses the same value naming the same field (a manifest that
    # bypassed the schema, e.g. the seed API's dict).
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        S3Settings.from_spec(s3)


@pytest.mark.parametrize(("artifacts", "field"), [
    ({"checkpointIntervalEpochs": -1}, "spec.artifacts.checkpointIntervalEpochs"),
    ({"keep": "some"}, "spec.artifacts.keep"),
])
def test_bad_artifact_fields_are_refused_naming_the_field(artifacts, field):
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest(None, **artifacts))
    assert field in info.value.fields, info.value


def test_the_credentials_secret_reaches_the_master_pod_only_as_env():
    spec = load_manifest(manifest({"bucket": "nas-runs", "endpoint": "http://s3:8333",
                                   "credentialsSecret": "s3-creds"})).spec
    master = builders.build_master_pod("digits-s3", "ml", spec)["spec"]["containers"][0]
    secret_env = [e for e in master["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_env == [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}},
    ]
    workers = builders.build_worker_deployment("digits-s3", "ml", spec, 2)["spec"]["template"]["spec"]
    for container in workers["containers"]:
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container.get("env", []))
        assert not container.get("envFrom")
    # Without a Secret the master gets no credential variables (it uses its own chain).
    plain = load_manifest(manifest({"bucket": "nas-runs"})).spec
    env = builders.build_master_pod("digits-s3", "ml", plain)["spec"]["containers"][0]["env"]
    assert not any(e["name"].startswith("AWS_") for e in env)
