"""The gRPC master: serves worker.proto over an ExperimentCoordinator, plus grpc.health.v1.

`MasterServer` is the gRPC layer (token check, message size limits, the session stream and
its broken-stream detection, the heartbeat monitor thread). `MasterNode` is the seed's
Python API: `MasterNode(optimizer, {'port': 50051, 'num_workers': 4}).start()` then
`run_experiment(num_generations=...)`.

Imports: grpc, grpc_health, morphml.distributed.{proto, coordinator, journal, auth, clock}.
Never torch.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .auth import TOKEN_ENV, TokenInterceptor
from .clock import SystemClock
from .coordinator import (END_OF_STREAM, FAILURE_KINDS, ExperimentCoordinator, ExperimentSettings, LeaseMessage,
                          ResultReport, ShutdownMessage)
from .journal import Journal
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc as pb_grpc
from .states import LossReason

log = logging.getLogger("morphml.master")

SERVICE_NAME = "morphml.Master"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options shared by master and workers.

    HTTP/2 keepalive pings every 10 s (answer within 5 s) on both ends: a peer whose host
    vanished without closing its connections (power loss, partition) breaks the stream after
    ~15 s instead of whenever TCP gives up; the master's heartbeat timeout remains the bound."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0)]


class BadResult(ValueError):
    """A malformed TrialResult (never journaled): INVALID_ARGUMENT, or an "invalid" ack on the stream."""


def result_report(request: pb.TrialResult) -> ResultReport:
    """The coordinator's view of a TrialResult; BadResult names what is wrong with it."""
    if not request.HasField("lease") or not request.lease.task_id or request.lease.attempt < 1:
        raise BadResult("lease.task_id must be set and lease.attempt must be >= 1")
    metrics = None
    if request.ok:
        try:
            metrics = json.loads(request.metrics_json)
        except ValueError as exc:
            raise BadResult(f"metrics_json is not JSON ({exc})") from None
    elif request.failure_kind not in FAILURE_KINDS:
        raise BadResult(f"failure_kind={request.failure_kind!r}; allowed {', '.join(FAILURE_KINDS)}")
    return ResultReport(request.lease.task_id, request.lease.attempt, request.ok, metrics, request.failure_kind,
                        request.failure_message, request.worker_name, request.duration_seconds,
                        lease_key=request.lease_key)


REFUSED_DETAIL = "was not leased to this caller (lease_key does not match); recorded as refused, not counted"


class AckMessage:
    """Acknowledgements for an outbox: sent on the session stream in MasterMessage.acks."""

    __slots__ = ("acks",)

    def __init__(self, acks: list):
        self.acks = acks


def pack_outbox(first, outbox: queue.Queue) -> tuple[list, bool]:
    """The MasterMessages for `first` plus everything else queued on the outbox right now: all
    leases in one LeaseBatch, the acknowledgements riding along, a shutdown after them. Returns
    (messages, ended) where ended means END_OF_STREAM was among them (nothing after it is sent)."""
    items = [first]
    while True:
        try:
            items.append(outbox.get_nowait())
        except queue.Empty:
            break
    batch = pb.MasterMessage()
    shutdowns = []
    ended = False
    for item in items:
        if item is END_OF_STREAM:
            ended = True
            break
        if isinstance(item, LeaseMessage):
            batch.leases.leases.add(task_id=item.task_id, attempt=item.attempt, architecture_json=item.arch_json,
                                    evaluation_json=item.evaluation_json, seed=item.seed, lease_key=item.lease_key)
        elif isinstance(item, AckMessage):
            batch.acks.extend(item.acks)
        elif isinstance(item, ShutdownMessage):
            shutdowns.append(pb.MasterMessage(shutdown=pb.Shutdown(reason=item.reason)))
    messages = ([batch] if batch.HasField("leases") or batch.acks else []) + shutdowns[:1]
    return messages, ended


class MasterServicer(pb_grpc.MasterServicer):
    """Translates RPCs into coordinator calls; bad payloads become INVALID_ARGUMENT."""

    def __init__(self, coordinator: ExperimentCoordinator):
        self.coord = coordinator
        # Set while the master shuts down: the streams it closes itself are not worker deaths.
        # Their leases stay journaled as leased, so the next master on this journal lets the
        # reconnecting workers re-adopt them instead of re-running the trials.
        self.stopping = threading.Event()

    def _stream_lost(self, worker_id: str, detail: str) -> None:
        if not self.stopping.is_set():
            self.coord.worker_lost(worker_id, LossReason.STREAM, detail)

    def Register(self, request, context):
        try:
            worker_id, adopted = self.coord.register(
                request.worker_name, request.gpus, request.slots, request.hostname, request.pid,
                [(r.task_id, r.attempt) for r in request.running])
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Register: {exc}")
        s = self.coord.settings
        return pb.RegisterReply(worker_id=worker_id, heartbeat_interval_seconds=s.heartbeat_interval,
                                missed_heartbeats=s.missed_heartbeats, experiment_name=s.name,
                                adopted=[pb.LeaseRef(task_id=t, attempt=a) for t, a in adopted])

    def Connect(self, request_iterator, context):
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("kind") != "hello" or not first.hello.worker_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "Connect: the first message must be a hello carrying the worker_id from Register")
        worker_id = first.hello.worker_id
        outbox = self.coord.connect(worker_id)
        if outbox is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Connect: worker id {worker_id!r} is unknown or was declared dead; register again")

        def stream_closed():
            # Fires the moment the RPC ends for any reason: the worker process died, the
            # connection reset, or we ended it. Death at once (a no-op if already dead).
            outbox.put(END_OF_STREAM)
            self._stream_lost(worker_id, "session stream closed")

        context.add_callback(stream_closed)
        threading.Thread(target=self._read_worker_messages, args=(worker_id, request_iterator, outbox),
                         name=f"session-{worker_id}", daemon=True).start()
        while True:
            messages, ended = pack_outbox(outbox.get(), outbox)
            if ended:
                return
            yield from messages

    def _read_worker_messages(self, worker_id: str, request_iterator, outbox) -> None:
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "heartbeat":
                    if not self.coord.heartbeat(worker_id):
                        break
                elif kind == "drain":
                    self.coord.drain(worker_id, msg.drain.reason or "drain")
                elif kind == "results":
                    outbox.put(AckMessage(self._accept_results(msg.results.results)))
        except grpc.RpcError:
            pass
        except Exception:  # never let one worker's garbage take the master down
            log.exception("session of %s failed", worker_id)
        outbox.put(END_OF_STREAM)
        self._stream_lost(worker_id, "session stream closed by the worker")

    def _accept_results(self, results) -> list[pb.ResultAck]:
        """Journals a ResultBatch from a session stream (one group commit) and returns one ack per
        result, in order. A malformed result is acknowledged "invalid" and recorded nowhere; the
        others still count."""
        acks = [pb.ResultAck(lease=r.lease) for r in results]
        reports, slots = [], []
        for ack, result in zip(acks, results):
            try:
                reports.append(result_report(result))
                slots.append(ack)
            except BadResult as exc:
                ack.disposition, ack.detail = "invalid", f"TrialResult: {exc}"
        for ack, disposition in zip(slots, self.coord.report_results(reports)):
            ack.disposition = disposition
            if disposition == "refused":
                ack.detail = f"{ack.lease.task_id} attempt {ack.lease.attempt} {REFUSED_DETAIL}"
        return acks

    def ReportResult(self, request, context):
        try:
            report = result_report(request)
        except BadResult as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReportResult: {exc}")
        disposition = self.coord.report_results([report])[0]
        if disposition == "refused":
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"ReportResult: {request.lease.task_id} attempt {request.lease.attempt} {REFUSED_DETAIL}")
        return pb.ResultAck(disposition=disposition, lease=request.lease)

    def Deregister(self, request, context):
        released = self.coord.deregister(request.worker_id, request.reason or "deregister")
        return pb.DeregisterReply(requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in released])

    def WorkerGone(self, request, context):
        if not request.worker:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WorkerGone: worker (pod name or worker id) is empty")
        ids, released = self.coord.worker_gone(request.worker, request.reason or "pod gone")
        return pb.WorkerGoneReply(worker_ids=ids, requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in released])

    def GetStatus(self, request, context):
        return status_to_proto(self.coord.status(include_dead=request.include_dead_workers))


def status_to_proto(st: dict) -> pb.ExperimentStatus:
    msg = pb.ExperimentStatus(
        phase=st["phase"], succeeded=st["succeeded"], failed=st["failed"], running=st["running"],
        pending=st["pending"], budget=st["budget"], stale_results=st["stale_results"], retries=st["retries"],
        experiment_name=st["experiment_name"], message=st["message"], metric=st["metric"], goal=st["goal"])
    for w in st["workers"]:
        msg.workers.append(pb.WorkerInfo(
            worker_id=w["worker_id"], worker_name=w["worker_name"], state=w["state"], slots=w["slots"],
            gpus=w["gpus"], seconds_since_heartbeat=w["seconds_since_heartbeat"],
            running=[pb.LeaseRef(task_id=t, attempt=a) for t, a in w["running"]]))
    if st["best"]:
        b = st["best"]
        msg.best.CopyFrom(pb.BestTrial(trial_id=b["trial_id"], metric=b["metric"], summary=b["summary"],
                                       architecture_json=b["arch_json"], metrics_json=json.dumps(b["metrics"]),
                                       arch_hash=b["arch_hash"]))
    for loss in st["losses"]:
        msg.losses.append(pb.WorkerLoss(
            worker_id=loss["worker_id"], worker_name=loss["worker_name"], detected_by=loss["detected_by"],
            detected_at=loss["detected_at"], requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in loss["requeued"]]))
    return msg


def default_bind_host() -> str:
    """Where servers listen by default: the pod's own IP when $POD_IP is set, else every address.

    On a real cluster both work; binding the pod IP also keeps pods that share one host (the
    test suite's process node, host networking) from fighting over the same port.
    """
    pod_ip = os.environ.get("POD_IP", "").strip()
    if not pod_ip:
        return "[::]"
    return f"[{pod_ip}]" if ":" in pod_ip and not pod_ip.startswith("[") else pod_ip


class MasterServer:
    """The master process's gRPC server: the Master service, health, the heartbeat monitor."""

    def __init__(self, coordinator: ExperimentCoordinator, port: int = 50051, host: str | None = None,
                 token: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_threads: int = 1024):
        self.coord = coordinator
        self.host, self.requested_port = host or default_bind_host(), port
        self.port: int | None = None
        interceptors = [TokenInterceptor(token)] if token else []
        if not token:
            log.warning("no token configured: any client may call the master (set %s)", TOKEN_ENV)
        # Each worker session holds a server thread for its lifetime, hence the large pool.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="rpc"),
                                   interceptors=interceptors, options=grpc_options(max_message_bytes))
        self.servicer = MasterServicer(coordinator)
        pb_grpc.add_MasterServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def start(self) -> int:
        self.port = self._server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}")
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._monitor = threading.Thread(target=self._watch_heartbeats, name="heartbeat-monitor", daemon=True)
        self._monitor.start()
        log.info("master listening on port %d", self.port)
        return self.port

    def _watch_heartbeats(self) -> None:
        # Tick a few times per interval so a hung worker is declared dead within ~interval/5 of
        # its deadline.
        tick = min(1.0, max(0.02, self.coord.settings.heartbeat_interval / 5))
        while not self._stop.wait(tick):
            try:
                self.coord.check_heartbeats()
            except Exception:
                log.exception("heartbeat check failed")

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.servicer.stopping.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace).wait(grace + 1)

    def wait(self) -> None:
        self._server.wait_for_termination()


class MasterNode:
    """The seed's API: `MasterNode(optimizer, {'port': 50051, 'num_workers': 4})`.

    Config keys: port (50051), host ($POD_IP if set, else '[::]'), num_workers (no trial starts before this many
    workers are connected, waiting at most 60 s), token (default
    $MORPHML_TOKEN; no token disables auth), journal (SQLite path; default in memory, i.e. no
    resume), max_trials (default population_size x num_generations when the optimizer has
    them, else 100), max_failed_trials (10), max_task_retries (2), heartbeat_interval (10),
    missed_heartbeats (3), evaluation (spec.evaluation dict), metric, goal, name, seed, prefetch
    (None = auto, the default: one queued lease per worker while trials are short).
    """

    def __init__(self, optimizer: Any, config: dict | None = None):
        self.optimizer = optimizer
        self.config = dict(config or {})
        self.coordinator: ExperimentCoordinator | None = None
        self.server: MasterServer | None = None

    def _settings(self, num_generations: int | None = None) -> ExperimentSettings:
        c = self.config
        max_trials = c.get("max_trials")
        if max_trials is None:
            pop = getattr(self.optimizer, "population_size", None)
            gens = num_generations or getattr(self.optimizer, "num_generations", None)
            max_trials = pop * gens if pop and gens else 100
        return ExperimentSettings(
            name=c.get("name", "experiment"), max_trials=int(max_trials),
            max_failed_trials=int(c.get("max_failed_trials", 10)), max_task_retries=int(c.get("max_task_retries", 2)),
            heartbeat_interval=float(c.get("heartbeat_interval", 10.0)),
            missed_heartbeats=int(c.get("missed_heartbeats", 3)), evaluation=dict(c.get("evaluation", {})),
            metric=c.get("metric", "val_accuracy"), goal=c.get("goal", "maximize"), seed=int(c.get("seed", 0)),
            min_workers=int(c.get("num_workers", 0)), prefetch=c.get("prefetch"))

    def start(self, num_generations: int | None = None) -> int:
        """Starts serving; returns the port. Workers may connect from now on."""
        if self.server is not None:
            return self.server.port
        if num_generations is not None and hasattr(self.optimizer, "num_generations"):
            self.optimizer.num_generations = num_generations
        journal = Journal(self.config.get("journal", ":memory:"), self.config.get("journal_sync", "FULL"))
        self.coordinator = ExperimentCoordinator(self.optimizer, self._settings(num_generations), journal,
                                                 self.config.get("clock") or SystemClock())
        token = self.config.get("token") or os.environ.get(TOKEN_ENV) or None
        self.server = MasterServer(self.coordinator, int(self.config.get("port", 50051)),
                                   self.config.get("host"), token)
        return self.server.start()

    def run_experiment(self, num_generations: int | None = None, timeout: float | None = None):
        """Blocks until the experiment is over; returns optimizer.best() (or the status' best)."""
        if self.server is None:
            self.start(num_generations)
        elif num_generations is not None:
            if hasattr(self.optimizer, "num_generations"):
                self.optimizer.num_generations = num_generations
            pop = getattr(self.optimizer, "population_size", None)
            if pop and "max_trials" not in self.config:
                self.coordinator.settings.max_trials = pop * num_generations
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.coordinator.wait_done(1.0):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment not finished after {timeout} s: {self.coordinator.status()['phase']}")
        best = getattr(self.optimizer, "best", None)
        return best() if callable(best) else self.coordinator.status()["best"]

    def status(self) -> dict:
        return self.coordinator.status()

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.server.stop(grace)
            self.coordinator.journal.close()
            self.server = None
