"""The checkpoint RPCs of a real in-process MasterServer (grpc.aio) over a real coordinator and
SQLite journal, called by a real gRPC client on loopback: UploadCheckpoint stores and journals a
whole, verified file before it acks, and refuses (storing nothing) a sha256 mismatch, a truncated
or overlong upload, a file over the cap, a wrong lease key or token; DownloadArtifact gives the
re-leased attempt exactly the checkpoint it resumes from, and without a lease only best/* and
trials.csv."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import grpc
import pytest

from morphml.distributed.auth import token_metadata
from morphml.distributed.checkpoints import LocalStore
from morphml.distributed.master import MasterServer
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from morphml.distributed.states import LossReason

sys.path.insert(0, str(Path(__file__).parent))
from test_leases_coordinator import join, leases, make

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]
TOKEN = "rpc-test-token"


@pytest.fixture
def master(tmp_path):
    coord, clock = make(tmp_path, max_trials=2)
    coord.artifact_store = LocalStore(tmp_path)
    server = MasterServer(coord, port=0, host="127.0.0.1", token=TOKEN)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield coord, clock, server, pb_grpc.MasterStub(channel), tmp_path
    finally:
        channel.close()
        server.stop(0)
        coord.journal.close()


def upload(stub, lease, data: bytes, epoch: int = 1, sha: str | None = None, size: int | None = None,
           key: str | None = None, token: str = TOKEN, chunk: int = 1000):
    header = pb.CheckpointHeader(lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt),
                                 lease_key=lease.lease_key if key is None else key, epoch=epoch,
                                 sha256=sha or hashlib.sha256(data).hexdigest(),
                                 size=len(data) if size is None else size)

    def chunks():
        yield pb.ArtifactChunk(checkpoint=header)
        for i in range(0, len(data), chunk):
            yield pb.ArtifactChunk(data=data[i:i + chunk])
    return stub.UploadCheckpoint(chunks(), metadata=token_metadata(token), timeout=10)


def download(stub, key: str, lease=None) -> bytes:
    request = pb.ArtifactRequest(key=key)
    if lease is not None:
        request.lease.CopyFrom(pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt))
        request.lease_key = lease.lease_key
    return b"".join(c.data for c in stub.DownloadArtifact(request, metadata=token_metadata(TOKEN), timeout=10))


def refused(call, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details(), err.value.details()


def stored(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "checkpoints").rglob("*") if p.is_file()) \
        if (root / "checkpoints").exists() else []


def test_an_upload_is_stored_whole_and_journaled_before_the_ack(master):
    coord, _, _, stub, root = master
    _, outbox = join(coord, "w1")
    lease = leases(outbox)[0]
    assert lease.save_epochs and lease.start_epoch == 0  # a store: the lease asks for checkpoints
    data = os.urandom(25_000)
    ack = upload(stub, lease, data, epoch=1)
    assert ack.recorded and ack.key == f"checkpoints/{lease.task_id}/epoch-0001.a1.pt"
    assert (root / ack.key).read_bytes() == data
    saved = coord.journal.events("checkpoint_saved")
    assert [(e["task_id"], e["attempt"]) for e in saved] == [(lease.task_id, 1)]
    assert hashlib.sha256(data).hexdigest() in str(saved[0]) and not list((root / ".incoming").iterdir())


def test_bad_uploads_are_refused_naming_why_and_store_nothing(master):
    coord, _, server, stub, root = master
    _, outbox = join(coord, "w1")
    lease = leases(outbox)[0]
    data = os.urandom(5000)
    refused(lambda: upload(stub, lease, data, sha=hashlib.sha256(b"other").hexdigest()),
            grpc.StatusCode.INVALID_ARGUMENT, "(corrupted in transit)")
    refused(lambda: upload(stub, lease, data[:3000], size=len(data)),
            grpc.StatusCode.INVALID_ARGUMENT, "3000 bytes received, 5000 announced (truncated upload)")
    refused(lambda: upload(stub, lease, data, size=100), grpc.StatusCode.INVALID_ARGUMENT,
            "more than the announced 100 bytes")
    refused(lambda: upload(stub, lease, data, key="0" * 32), grpc.StatusCode.PERMISSION_DENIED, "lease_key")
    refused(lambda: upload(stub, lease, data, epoch=0), grpc.StatusCode.INVALID_ARGUMENT, "checkpoint.epoch=0")
    refused(lambda: upload(stub, lease, data, sha="xyz"), grpc.StatusCode.INVALID_ARGUMENT, "checkpoint.sha256")
    refused(lambda: upload(stub, lease, data, token="wrong"), grpc.StatusCode.UNAUTHENTICATED, "")
    server.servicer.max_checkpoint_bytes = 4096
    refused(lambda: upload(stub, lease, data), grpc.StatusCode.INVALID_ARGUMENT,
            "checkpoint.size=5000: must be in 1..4096 bytes")
    assert stored(root) == [] and coord.journal.events("checkpoint_saved") == []
    assert not list((root / ".incoming").iterdir())


def test_an_upload_of_an_attempt_no_longer_live_is_not_kept(master):
    coord, _, _, stub, root = master
    worker, outbox = join(coord, "w1")
    lease = leases(outbox)[0]
    coord.worker_lost(worker, LossReason.STREAM, "test")
    ack = upload(stub, lease, b"late checkpoint")
    assert not ack.recorded and stored(root) == []


def test_download_gives_the_re_leased_attempt_its_checkpoint_and_strangers_only_public_files(master):
    coord, _, _, stub, root = master
    worker, outbox = join(coord, "w1")
    first = leases(outbox)[0]
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks
    ack = upload(stub, first, data, epoch=2, chunk=1 << 20)
    assert ack.recorded
    coord.worker_lost(worker, LossReason.STREAM, "SIGKILL")
    _, outbox2 = join(coord, "w2", slots=2)
    again = next(m for m in leases(outbox2) if m.task_id == first.task_id)
    assert (again.attempt, again.start_epoch, again.checkpoint.key) == (2, 2, ack.key)
    assert download(stub, ack.key, again) == data
    # The file gone from the store (a volume lost): NOT_FOUND naming it, which the worker turns
    # into the trial's checkpoint_fallback ("download failed (NOT_FOUND: ...)") and a fresh start.
    (root / ack.key).rename(root / "moved.pt")
    refused(lambda: download(stub, ack.key, again), grpc.StatusCode.NOT_FOUND, f"DownloadArtifact {ack.key}: not in")
    (root / "moved.pt").rename(root / ack.key)
    # The dead attempt, another key, or no lease: refused.
    refused(lambda: download(stub, ack.key, first), grpc.StatusCode.PERMISSION_DENIED, "not the checkpoint")
    refused(lambda: download(stub, ack.key), grpc.StatusCode.PERMISSION_DENIED, "only best/model.pt")
    refused(lambda: download(stub, "journal.db"), grpc.StatusCode.PERMISSION_DENIED, "only best/model.pt")
    refused(lambda: download(stub, "../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "'..' segments")
    refused(lambda: download(stub, "trials.csv"), grpc.StatusCode.NOT_FOUND, "the master writes it when")
    (root / "trials.csv").write_text("trial_id\nt000001\n")
    (root / "best").mkdir()
    (root / "best" / "metrics.json").write_text("{}\n")
    assert download(stub, "trials.csv") == b"trial_id\nt000001\n"
    assert download(stub, "best/metrics.json") == b"{}\n"


def test_a_master_without_a_store_refuses_uploads_and_leases_ask_for_none(tmp_path):
    coord, _ = make(tmp_path, max_trials=1)
    server = MasterServer(coord, port=0, host="127.0.0.1", token=TOKEN)
    server.start()
    try:
        _, outbox = join(coord, "w1")
        lease = leases(outbox)[0]
        assert lease.save_epochs == () and lease.checkpoint is None
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            refused(lambda: upload(pb_grpc.MasterStub(channel), lease, b"x"), grpc.StatusCode.FAILED_PRECONDITION,
                    "keeps no checkpoints")
    finally:
        server.stop(0)
        coord.journal.close()


def test_the_worker_fetches_its_resume_checkpoint_or_names_why_it_could_not(master):
    """WorkerNode's lease -> runner segment: the checkpoint downloaded into its folder with the
    journaled sha256/size for the runner to check; a download that fails becomes the segment's
    fallback (the trial's checkpoint_fallback), naming the key and the status."""
    from morphml.distributed.worker import WorkerConfig, WorkerNode

    coord, _, server, stub, root = master
    worker, outbox = join(coord, "w1")
    first = leases(outbox)[0]
    data = os.urandom(10_000)
    ack = upload(stub, first, data, epoch=2)
    coord.worker_lost(worker, LossReason.STREAM, "SIGKILL")
    _, outbox2 = join(coord, "w2", slots=2)
    again = next(m for m in leases(outbox2) if m.task_id == first.task_id)
    lease = pb.Lease(task_id=again.task_id, attempt=again.attempt, lease_key=again.lease_key,
                     start_epoch=again.start_epoch, stop_epoch=again.stop_epoch, save_epochs=list(again.save_epochs),
                     checkpoint=pb.Checkpoint(key=again.checkpoint.key, epoch=again.checkpoint.epoch,
                                              sha256=again.checkpoint.sha256, size=again.checkpoint.size,
                                              arch_hash=again.checkpoint.arch_hash))
    node = WorkerNode(WorkerConfig(master=f"127.0.0.1:{server.port}", token=TOKEN, name="w2"))
    try:
        segment = node._segment(lease)
        assert segment is not None and "fallback" not in segment
        assert Path(segment["resume"]).read_bytes() == data
        assert (segment["resume_key"], segment["resume_sha256"], segment["resume_size"], segment["start_epoch"]) == \
            (ack.key, hashlib.sha256(data).hexdigest(), len(data), 2)
        (root / ack.key).unlink()
        segment = node._segment(lease)
        assert segment["fallback"].startswith(f"checkpoint {ack.key}: download failed (NOT_FOUND: "), segment
        assert node._segment(pb.Lease(task_id="t9", attempt=1)) is None  # a plain lease: no segment
    finally:
        node._shutdown()
