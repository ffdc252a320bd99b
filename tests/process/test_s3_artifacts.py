"""Process tests of spec.artifacts.s3 against a real S3-compatible server (SeaweedFS, tests/s3server.py)
and of the download half of `morphml results`:

- a `morphml run` on digits with spec.artifacts.s3: every journaled checkpoint went to the bucket
  under the prefix (none on the run's disk), retention deleted from the bucket what it journaled
  as deleted, best/model.pt is the best trial's final checkpoint read back from S3, and
  `load_model` of best/ scores the recorded val_accuracy (issue 12 acceptance 6 with S3);
- the master refuses to start, naming endpoint and bucket, with wrong credentials or a missing
  bucket, and leases nothing (acceptance 5, S3 half);
- the finished experiment's master serves best/* and trials.csv through DownloadArtifact
  (`morphml.results_fetch.download_artifacts`, what `morphml results` runs over its port-forward):
  the same bytes as on the master's disk; anything else refused.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proc_helpers import REPO, TOKEN, free_port, journal_events
from tests import s3server

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.process, pytest.mark.s3]
BUCKET = "morphml-process"
PREFIX = "teams/nas"
EPOCHS = 3
LAYERS = [
    {"type": "conv2d", "filters": [8, 16], "kernelSize": [3], "activation": ["relu"]},
    {"type": "maxpool", "poolSize": [2]},
    {"type": "flatten"},
    {"type": "dense", "units": [32, 64], "activation": ["relu"]},
]


@pytest.fixture(scope="module")
def server():
    with s3server.s3_server() as running:
        s3server.make_bucket(running, BUCKET)
        yield running


def manifest(path: Path, name: str, s3: dict, max_trials: int = 3) -> Path:
    spec = {
        "searchSpace": {"layers": LAYERS},
        "optimizer": {"algorithm": "random", "seed": 11},
        "evaluation": {"dataset": {"name": "digits"}, "epochs": EPOCHS, "batchSize": 64, "learningRate": 0.003,
                       "optimizer": "adam", "timeoutSeconds": 300},
        "budget": {"maxTrials": max_trials, "maxFailedTrials": 1},
        "artifacts": {"checkpointIntervalEpochs": 1, "keep": "best", "s3": s3},
    }
    doc = {"apiVersion": "morphml.io/v1alpha1", "kind": "NASExperiment", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def env(access_key: str = s3server.ACCESS_KEY, secret_key: str = s3server.SECRET_KEY) -> dict:
    # The credentials the operator would set in the master pod from spec.artifacts.s3.credentialsSecret.
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key, AWS_CONFIG_FILE="/nonexistent",
                AWS_SHARED_CREDENTIALS_FILE="/nonexistent")


def bucket_keys(server, prefix: str) -> set[str]:
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for o in listed.get("Contents", [])}


def run(path: Path, out: Path, environment: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "morphml.cli", "run", str(path), "--workers", "2", "--output",
                           str(out)], cwd=path.parent, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(server, tmp_path_factory):
    """One morphml run with its checkpoints in S3; (manifest, run dir, prefix)."""
    tmp = tmp_path_factory.mktemp("s3run")
    prefix = f"{PREFIX}/run"
    path = manifest(tmp / "digits-s3.yaml", "digits-s3", {"endpoint": server.endpoint, "bucket": BUCKET,
                                                           "prefix": prefix})
    out = tmp / "runs" / "digits-s3"
    done = run(path, out, env())
    assert done.returncode == 0, done.stdout + done.stderr
    return path, out, prefix


@pytest.mark.timeout(480)
def test_a_run_with_spec_artifacts_s3_keeps_its_checkpoints_in_the_bucket(server, finished_run):
    from morphml.evaluation import load_model, validation_metrics

    path, out, prefix = finished_run
    journal = out / "journal.db"
    saved = journal_events(journal, "checkpoint_saved")
    deleted = {e["detail"]["key"] for e in journal_events(journal, "checkpoint_deleted")}
    assert len(saved) >= 3 * EPOCHS, saved  # every epoch of every trial (interval 1)
    # Nothing on the master's disk: the store is the bucket.
    assert not (out / "checkpoints").exists()
    # What the bucket holds is exactly what the journal says is kept (retention deleted the rest there).
    kept = {e["detail"]["key"] for e in saved} - deleted
    assert deleted, "keep: best deletes the superseded checkpoints"
    assert bucket_keys(server, prefix) == kept
    # best/ came from the best trial's final checkpoint in S3.
    doc = json.loads((out / "best" / "metrics.json").read_text())
    assert doc["checkpoint"] in kept
    assert doc["checkpoint"].startswith(f"checkpoints/{doc['trial_id']}/epoch-{EPOCHS:04d}")
    stored = server.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{doc['checkpoint']}")["Body"].read()
    assert stored == (out / "best" / "model.pt").read_bytes()
    rows = {r["trial_id"]: r for r in csv.DictReader((out / "trials.csv").open())}
    assert len(rows) == 3 and all(r["status"] == "succeeded" and r["epochs"] == str(EPOCHS) for r in rows.values())
    model = load_model(out / "best")
    evaluation = yaml.safe_load(path.read_text())["spec"]["evaluation"]
    assert validation_metrics(model, evaluation)["val_accuracy"] == doc["metrics"]["val_accuracy"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["wrong credentials", "missing bucket"])
def test_an_unusable_s3_store_refuses_the_start_naming_endpoint_and_bucket(server, tmp_path, case):
    bucket = "no-such-bucket" if case == "missing bucket" else BUCKET
    path = manifest(tmp_path / "bad.yaml", "bad-s3", {"endpoint": server.endpoint, "bucket": bucket,
                                                      "prefix": "bad"})
    environment = env("nosuchkey", "nosuchsecret-0123456789") if case == "wrong credentials" else env()
    done = run(path, tmp_path / "out", environment, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("morphml run: S3 store"), message
    assert server.endpoint in message and f"s3://{bucket}/bad" in message
    assert ("access denied" if case == "wrong credentials" else "does not exist") in message
    assert "Traceback" not in done.stderr
    assert journal_events(tmp_path / "out" / "journal.db", "lease") == []
    assert bucket_keys(server, "bad") == set()


@pytest.mark.timeout(240)
def test_the_finished_masters_best_files_download_as_on_its_disk(procs, finished_run, tmp_path):
    from morphml.results_fetch import RESULT_FILES, ResultsError, download_artifacts

    path, out, _ = finished_run
    procs.env.update(env())
    port = free_port()
    procs.master(path, port, out / "journal.db")
    fetched = tmp_path / "fetched"
    files = download_artifacts(f"127.0.0.1:{port}", TOKEN, fetched)
    assert [f.relative_to(fetched).as_posix() for f in files] == list(RESULT_FILES)
    for name in RESULT_FILES:
        assert (fetched / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(fetched.rglob("*.part"))
    for key in ("journal.db", "checkpoints/t000001/epoch-0001.pt"):
        with pytest.raises(ResultsError, match="PERMISSION_DENIED"):
            download_artifacts(f"127.0.0.1:{port}", TOKEN, tmp_path / "refused", files=(key,))
    with pytest.raises(ResultsError, match="refused the experiment's token"):
        download_artifacts(f"127.0.0.1:{port}", "wrong-token", tmp_path / "refused")
