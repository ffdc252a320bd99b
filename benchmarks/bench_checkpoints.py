"""What a checkpoint costs per epoch on digits (issue 12): file size, the time to save it, the time
to upload it through a real master's UploadCheckpoint (gRPC on loopback, LocalStore, journaled),
next to the time one epoch of training takes, for the architectures of examples/digits.yaml's
space (a small, a middle and the largest).

Run: python benchmarks/bench_checkpoints.py [--repeats N]
Prints one JSON line per architecture; docs/evaluation.md ("Checkpoints") has the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from morphml.distributed.checkpoints import LocalStore
from morphml.distributed.clock import ManualClock
from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings, LeaseMessage
from morphml.distributed.journal import Journal
from morphml.distributed.master import MasterServer
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from morphml.evaluation import evaluate_architecture
from morphml.evaluation.segments import Segment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_leases_coordinator import CountingOptimizer  # noqa: E402


def conv(filters: int, k: int) -> dict:
    return {"op": "conv2d", "params": {"filters": filters, "kernel_size": k, "stride": 1, "activation": "relu"}}


def arch(filters: tuple[int, ...], units: int) -> dict:
    """input -> conv(f) for f in filters -> maxpool -> flatten -> dense(units) -> output."""
    ops = [conv(f, 3) for f in filters] + [{"op": "maxpool", "params": {"pool_size": 2}},
                                           {"op": "flatten", "params": {}},
                                           {"op": "dense", "params": {"units": units, "activation": "relu"}},
                                           {"op": "output", "params": {"units": 10}}]
    nodes = [{"id": "in", "op": "input", "params": {}}] + [{"id": f"n{i}", **op} for i, op in enumerate(ops)]
    edges = [[a["id"], b["id"]] for a, b in itertools.pairwise(nodes)]
    return {"input_shape": [1, 8, 8], "num_classes": 10, "nodes": nodes, "edges": edges}


ARCHS = {"small (conv16, fc32)": arch((16,), 32), "middle (conv32, conv16, fc64)": arch((32, 16), 64),
         "largest (conv32 x3, fc128)": arch((32, 32, 32), 128)}
EVALUATION = {"dataset": {"name": "digits"}, "epochs": 5, "batchSize": 64, "learningRate": 0.003, "optimizer": "adam"}


def measure(graph: dict, lease: LeaseMessage, stub: pb_grpc.MasterStub, tmp: str, repeats: int) -> dict:
    """One architecture: median epoch seconds without checkpoints, then the same run saving after
    every epoch (a checkpoint is written between an epoch's report and on_checkpoint), and
    `repeats` uploads of those files."""
    saved: list[tuple[int, str, str, int, float]] = []
    reported: dict[int, float] = {}
    epoch_seconds: list[float] = []
    last = [time.perf_counter()]

    def on_checkpoint(epoch: int, path: str, sha: str, size: int) -> None:
        saved.append((epoch, path, sha, size, time.perf_counter() - reported[epoch]))

    def progress(step: int, metrics: dict) -> bool:
        now = reported[step] = time.perf_counter()
        epoch_seconds.append(now - last[0])
        last[0] = now
        return False

    evaluate_architecture(graph, EVALUATION, device="cpu", seed=1, progress=progress)
    plain = statistics.median(epoch_seconds[1:])  # the first includes loading the data
    evaluate_architecture(graph, EVALUATION, device="cpu", seed=1, progress=progress,
                          segment=Segment(task_id=lease.task_id, attempt=lease.attempt, save_epochs=(1, 2, 3, 4, 5),
                                          checkpoint_dir=tmp, on_checkpoint=on_checkpoint))
    save = statistics.median(entry[4] for entry in saved)
    uploads = []
    for _ in range(repeats):
        for epoch, path, sha, size, _ in saved:
            data = Path(path).read_bytes()
            header = pb.CheckpointHeader(lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt),
                                         lease_key=lease.lease_key, epoch=epoch, sha256=sha, size=size)
            chunks = [pb.ArtifactChunk(checkpoint=header)] + [
                pb.ArtifactChunk(data=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
            begin = time.perf_counter()
            ack = stub.UploadCheckpoint(iter(chunks), timeout=60)
            uploads.append(time.perf_counter() - begin)
            assert ack.recorded, ack
    upload = statistics.median(uploads)
    return {"checkpoint_bytes": saved[0][3], "epoch_seconds": round(plain, 4), "save_seconds_median": round(save, 4),
            "upload_seconds_median": round(upload, 4), "upload_seconds_max": round(max(uploads), 4),
            "uploads": len(uploads), "cost_per_epoch_percent": round(100 * (save + upload) / plain, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="uploads of each saved checkpoint (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import grpc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = ExperimentSettings(max_trials=1000, heartbeat_interval=10.0, evaluation=EVALUATION)
        coord = ExperimentCoordinator(CountingOptimizer(), settings, Journal(root / "journal.db"), ManualClock())
        coord.artifact_store = LocalStore(root)
        server = MasterServer(coord, port=0, host="127.0.0.1")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        worker_id, _ = coord.register("bench", 0, 1)
        outbox = coord.connect(worker_id)
        assert outbox is not None
        lease = outbox.get_nowait()
        try:
            for name, graph in ARCHS.items():
                print(json.dumps({"architecture": name,
                                  **measure(graph, lease, pb_grpc.MasterStub(channel), tmp, args.repeats)}),
                      flush=True)
        finally:
            channel.close()
            server.stop(0)
            coord.journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
