"""The operator's side of worker.proto: GetStatus (for the CR status) and WorkerGone (pod lost).

The operator polls the master rather than the master patching the CR: the master then needs no
Kubernetes credentials at all (its ServiceAccount has no rights and no token is mounted), the
status has one writer (the operator), and a master that is down simply shows as MasterReady=False
with the last counts kept. See docs/kubernetes.md.

Imports: grpc, google.protobuf, morphml.distributed.proto (generated code only; no torch).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

# GetStatus pages one poll may read (500 losses each); the rest waits for the next poll.
MAX_LOSS_PAGES = 10


class MasterUnreachable(RuntimeError):
    """The master did not answer (not up yet, restarting, or refusing the token).

    `code` is the gRPC status code's name (UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED, ...).
    """

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


def _call(address: str, token: str, timeout: float, method: str, request: Any) -> Any:
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code().name if error.code() else "UNKNOWN"
            raise MasterUnreachable(f"{method} on {address}: {code}: {error.details()}", code) from None


def _as_dict(reply: Any) -> dict:
    return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _seq(loss: dict) -> int:
    return int(loss.get("seq", 0))  # uint64 arrives as a JSON string


def get_master_status(address: str, token: str, timeout: float = 3.0, losses_after_seq: int | None = None,
                      max_pages: int = MAX_LOSS_PAGES) -> dict:
    """GetStatus as a dict with the proto's field names (snake_case), zero values included.

    With `losses_after_seq` (0 included) `losses` holds the losses numbered above it, oldest
    first, read page by page (the master answers at most 500 per call) until caught up with
    `loss_seq` or `max_pages` read; the counts and workers are those of the last page. Without
    it, one call and the master's 100 most recent losses (what a person looking wants).
    """
    if losses_after_seq is None:
        return _as_dict(_call(address, token, timeout, "GetStatus", pb.StatusRequest(include_dead_workers=True)))
    losses: list[dict] = []
    after = losses_after_seq
    reply: dict = {}
    for _ in range(max(1, max_pages)):
        request = pb.StatusRequest(include_dead_workers=True, losses_after_seq=after)
        reply = _as_dict(_call(address, token, timeout, "GetStatus", request))
        page = sorted((loss for loss in reply.get("losses", []) if _seq(loss) > after), key=_seq)
        losses += page
        if not page or _seq(page[-1]) >= int(reply.get("loss_seq", 0)):
            break
        after = _seq(page[-1])
    reply["losses"] = losses
    return reply


def report_worker_gone(address: str, token: str, worker: str, reason: str, timeout: float = 3.0) -> dict:
    """Tell the master a worker pod is gone; returns the reply (ids declared dead, leases requeued)."""
    reply = _call(address, token, timeout, "WorkerGone", pb.WorkerGoneRequest(worker=worker, reason=reason))
    return _as_dict(reply)
