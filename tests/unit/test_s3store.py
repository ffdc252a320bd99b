"""S3Store against a real S3-compatible server (SeaweedFS's weed, tests/s3server.py): round trips
of put/get/delete/exists under a prefix, and the master's start refused with a message naming the
endpoint and bucket for wrong credentials, a missing bucket, a read-only key and a dead endpoint
(issue 12 acceptance 5, the S3 half)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from morphml.distributed.checkpoints import ArtifactSettings, make_store
from morphml.distributed.s3store import S3Settings, S3Store, S3StoreError
from tests import s3server

pytestmark = [pytest.mark.unit, pytest.mark.s3, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server():
    with s3server.s3_server() as running:
        s3server.make_bucket(running, "morphml-ckpt")
        yield running


def settings(server, bucket="morphml-ckpt", prefix="runs/digits") -> S3Settings:
    return S3Settings.from_spec({"endpoint": server.endpoint, "bucket": bucket, "prefix": prefix})


def store(server, **kwargs) -> S3Store:
    return S3Store(settings(server, **kwargs), access_key=s3server.ACCESS_KEY, secret_key=s3server.SECRET_KEY)


def test_put_get_exists_delete_round_trip_under_the_prefix(server, tmp_path):
    s3 = store(server)
    data = os.urandom(3 * (1 << 20) + 12345)  # several chunks, not a multiple of the chunk size
    source = tmp_path / "epoch-0002.pt"
    source.write_bytes(data)
    key = "checkpoints/t000001/epoch-0002.pt"
    assert not s3.exists(key)
    s3.put_file(key, source)
    assert s3.exists(key)
    chunks = list(s3.open_chunks(key, chunk=1 << 20))
    assert all(len(c) <= 1 << 20 for c in chunks) and len(chunks) >= 4
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == hashlib.sha256(data).hexdigest()
    # It is an object under the prefix in the bucket, as another S3 client sees it.
    listed = server.client().list_objects_v2(Bucket="morphml-ckpt", Prefix="runs/digits/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [f"runs/digits/{key}"]
    # Overwrite is whole: the second put replaces the first.
    source.write_bytes(b"second")
    s3.put_file(key, source)
    assert b"".join(s3.open_chunks(key)) == b"second"
    s3.delete(key)
    assert not s3.exists(key)
    s3.delete(key)  # a missing key is fine
    with pytest.raises(KeyError):
        s3.open_chunks(key)
    assert s3.describe() == "s3://morphml-ckpt/runs/digits"


def test_bad_keys_are_refused_before_any_request(server, tmp_path):
    s3 = store(server)
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for key in ("../escape", "/abs", "a//b", "with space"):
        with pytest.raises(ValueError, match="artifact key"):
            s3.put_file(key, source)


def test_make_store_checks_the_bucket_and_leaves_no_probe(server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    artifacts = ArtifactSettings.from_spec({"s3": {"endpoint": server.endpoint, "bucket": "morphml-ckpt",
                                                   "prefix": "probe-check"}})
    made = make_store(artifacts, Path("/nonexistent"))
    assert isinstance(made, S3Store) and made.describe() == "s3://morphml-ckpt/probe-check"
    listed = server.client().list_objects_v2(Bucket="morphml-ckpt", Prefix="probe-check/")
    assert listed.get("KeyCount", 0) == 0


def test_wrong_credentials_refuse_the_start_naming_endpoint_and_bucket(server):
    with pytest.raises(S3StoreError) as info:
        S3Store(settings(server), access_key="nosuchkey", secret_key="nosuchsecret-0123456789")
    text = str(info.value)
    assert server.endpoint in text and "s3://morphml-ckpt" in text
    assert "access denied" in text and "credentials" in text


def test_a_missing_bucket_refuses_the_start_naming_it(server):
    with pytest.raises(S3StoreError) as info:
        store(server, bucket="no-such-bucket")
    text = str(info.value)
    assert "'no-such-bucket' does not exist" in text and "spec.artifacts.s3.bucket" in text
    assert server.endpoint in text


def test_a_read_only_key_refuses_the_start(server):
    with pytest.raises(S3StoreError, match="cannot write, read and delete a probe object"):
        S3Store(settings(server), access_key=s3server.READONLY_ACCESS_KEY, secret_key=s3server.READONLY_SECRET_KEY)


def test_a_dead_endpoint_refuses_the_start_naming_it():
    dead = S3Settings.from_spec({"endpoint": "http://127.0.0.1:9", "bucket": "morphml-ckpt"})
    with pytest.raises(S3StoreError) as info:
        S3Store(dead, access_key="a", secret_key="b")
    assert "http://127.0.0.1:9" in str(info.value) and "spec.artifacts.s3.endpoint" in str(info.value)
