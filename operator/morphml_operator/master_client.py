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


class MasterUnreachable(RuntimeError):
    """The master did not answer (not up yet, restarting, or refusing the token)."""


def _call(address: str, token: str, timeout: float, method: str, request) -> Any:
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code().name if error.code() else "UNKNOWN"
            raise MasterUnreachable(f"{method} on {address}: {code}: {error.details()}") from None


def get_master_status(address: str, token: str, timeout: float = 3.0) -> dict:
    """GetStatus as a dict with the proto's field names (snake_case), zero values included."""
    reply = _call(address, token, timeout, "GetStatus", pb.StatusRequest(include_dead_workers=True))
    return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def report_worker_gone(address: str, token: str, worker: str, reason: str, timeout: float = 3.0) -> dict:
    """Tell the master a worker pod is gone; returns the reply (ids declared dead, leases requeued)."""
    reply = _call(address, token, timeout, "WorkerGone", pb.WorkerGoneRequest(worker=worker, reason=reason))
    return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
