"""The gRPC master: serves worker.proto over an ExperimentCoordinator, plus grpc.health.v1.

`MasterServer` is the gRPC layer (token check, message size limits, the session stream and
its broken-stream detection, the heartbeat monitor thread). It runs grpc.aio on an event loop
of its own thread: a session is a coroutine, not two threads, which measured ~20 % more trials
per second through the master than the thread-per-stream server (docs/benchmarks.md). `MasterNode` is the seed's
Python API: `MasterNode(optimizer, {'port': 50051, 'num_workers': 4}).start()` then
`run_experiment(num_generations=...)`.

Checkpoints (issue 12): `UploadCheckpoint` streams a worker's checkpoint into a temporary file
(size capped, sha256 checked), stores it in `coordinator.artifact_store` and journals it
(`coordinator.record_checkpoint`) before it acknowledges; `DownloadArtifact` gives a worker the
checkpoint its lease resumes from (`coordinator.checkpoint_for`), and anyone with the token the
finished experiment's public files beside the journal (best/..., trials.csv).

Imports: grpc, grpc_health, morphml.distributed.{proto, coordinator, journal, auth, clock, metrics,
checkpoints}, morphml.dashboard (only when the dashboard is served).
Never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .auth import TOKEN_ENV, TokenInterceptor
from .checkpoints import LocalStore, checkpoint_key, validate_key
from .clock import SystemClock
from .coordinator import (
    END_OF_STREAM,
    FAILURE_KINDS,
    ExperimentCoordinator,
    ExperimentSettings,
    LeaseMessage,
    ProgressReport,
    ResultReport,
    ShutdownMessage,
)
from .journal import Journal, JournalError
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc as pb_grpc
from .states import LossReason

if TYPE_CHECKING:
    from morphml.dashboard.server import DashboardServer

    from .metrics import MasterMetrics

log = logging.getLogger("morphml.master")

Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")

SERVICE_NAME = "morphml.Master"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The largest checkpoint UploadCheckpoint takes (model + optimizer state of one trial).
DEFAULT_MAX_CHECKPOINT_BYTES = 4 * 1024 * 1024 * 1024
ARTIFACT_CHUNK = 1 << 20  # bytes per ArtifactChunk sent
# What DownloadArtifact gives a caller without a lease: the finished experiment's files.
PUBLIC_ARTIFACTS = ("best/model.pt", "best/architecture.json", "best/metrics.json", "trials.csv")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


class DecisionMessage:
    """Answers to progress reports for an outbox: sent on the session stream in MasterMessage.decisions."""

    __slots__ = ("decisions",)

    def __init__(self, decisions: list[pb.ProgressDecision]):
        self.decisions = decisions


def progress_reports(batch: Any) -> tuple[list[ProgressReport], list[pb.ProgressDecision]]:
    """The coordinator's view of a ProgressBatch and one (continue) answer per report, in order;
    a malformed report (no lease, bad JSON, metrics not an object) is answered "continue" and
    not passed on."""
    reports, answers = [], []
    for p in batch:
        answers.append(pb.ProgressDecision(lease=p.lease, step=p.step, stop=False))
        try:
            metrics = json.loads(p.metrics_json or "{}")
        except ValueError:
            metrics = None
        if not p.lease.task_id or p.lease.attempt < 1 or not isinstance(metrics, dict):
            log.warning("malformed progress report for %s/%d: ignored", p.lease.task_id, p.lease.attempt)
            continue
        reports.append(ProgressReport(p.lease.task_id, p.lease.attempt, p.step, metrics, lease_key=p.lease_key))
    return reports, answers


class AckMessage:
    """Acknowledgements for an outbox: sent on the session stream in MasterMessage.acks."""

    __slots__ = ("acks",)

    def __init__(self, acks: list[pb.ResultAck]):
        self.acks = acks


def pack_outbox(first: Any, outbox: queue.Queue) -> tuple[list[pb.MasterMessage], bool]:
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
            lease = batch.leases.leases.add(
                task_id=item.task_id, attempt=item.attempt, architecture_json=item.arch_json,
                evaluation_json=item.evaluation_json, seed=item.seed, lease_key=item.lease_key,
                start_epoch=getattr(item, "start_epoch", 0), stop_epoch=getattr(item, "stop_epoch", 0),
                save_epochs=list(getattr(item, "save_epochs", ())))
            ref = getattr(item, "checkpoint", None)
            if ref is not None:
                lease.checkpoint.CopyFrom(pb.Checkpoint(key=ref.key, epoch=ref.epoch, sha256=ref.sha256,
                                                        size=ref.size, arch_hash=ref.arch_hash))
        elif isinstance(item, AckMessage):
            batch.acks.extend(item.acks)
        elif isinstance(item, DecisionMessage):
            batch.decisions.extend(item.decisions)
        elif isinstance(item, ShutdownMessage):
            shutdowns.append(pb.MasterMessage(shutdown=pb.Shutdown(reason=item.reason)))
    messages = ([batch] if batch.HasField("leases") or batch.acks or batch.decisions else []) + shutdowns[:1]
    return messages, ended


class LoopOutbox(queue.Queue):
    """A worker's outbox (see ExperimentCoordinator) that wakes the session coroutine sending it
    out: the coordinator puts leases from whichever thread committed them. On a thread inside
    `deferred_wakes()` (the committer's) the wake waits for the end of that block, so the leases
    a commit granted leave in one message with the acknowledgements of the results it journaled."""

    _deferred = threading.local()

    def __init__(self) -> None:
        super().__init__()
        self.wake: Any = None  # set by Connect: a callable safe to call from any thread

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        pending = getattr(LoopOutbox._deferred, "outboxes", None)
        if pending is not None:
            pending[id(self)] = self
        else:
            self.wake_now()

    @staticmethod
    def deferred_wakes(call: Callable[..., Any], *args: Any) -> tuple[Any, list[LoopOutbox]]:
        """call(*args) with this thread's wakes held back; returns (result, outboxes to wake)."""
        LoopOutbox._deferred.outboxes = {}
        try:
            return call(*args), list(LoopOutbox._deferred.outboxes.values())
        finally:
            LoopOutbox._deferred.outboxes = None

    def wake_now(self) -> None:
        wake = self.wake
        if wake is not None:
            wake()


def unavailable_when_halted(
        method: Callable[[Any, _Request, Context], Awaitable[_Reply]]
) -> Callable[[Any, _Request, Context], Coroutine[Any, Any, _Reply]]:
    """An RPC of a halted master (its journal failed, see ExperimentCoordinator._halt) ends
    with UNAVAILABLE and the reason, not with an internal error: the client retries elsewhere
    or later, when the restarted master serves again."""

    @functools.wraps(method)
    async def rpc(self: Any, request: _Request, context: Context) -> _Reply:
        try:
            return await method(self, request, context)
        except JournalError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method.__name__}: the master stopped: {exc}")

    return rpc


class MasterServicer(pb_grpc.MasterServicer):
    """Translates RPCs into coordinator calls; bad payloads become INVALID_ARGUMENT.

    Runs on the server's asyncio loop (grpc.aio): every session stream is a coroutine, not a
    thread. Coordinator calls are quick and made inline, except journaling results: those go to
    one committer, which journals everything that arrived meanwhile in one transaction on a
    worker thread while the loop goes on reading (group commit), and answers each after that
    commit."""

    def __init__(self, coordinator: ExperimentCoordinator):
        self.coord = coordinator
        # Set while the master shuts down: the streams it closes itself are not worker deaths.
        # Their leases stay journaled as leased, so the next master on this journal lets the
        # reconnecting workers re-adopt them instead of re-running the trials.
        self.stopping = threading.Event()
        # (reports, the session's outbox or None, future of their dispositions)
        self._pending: list[tuple[list[ResultReport], Any, asyncio.Future[list[str]]]] = []
        self._committer: asyncio.Task | None = None
        self._commit_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        # Checkpoint uploads and downloads: file and store I/O off the event loop.
        self._artifact_pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="artifacts")
        self.max_checkpoint_bytes = DEFAULT_MAX_CHECKPOINT_BYTES

    def close(self) -> None:
        self._commit_pool.shutdown(wait=True)
        self._artifact_pool.shutdown(wait=False, cancel_futures=True)

    def artifact_root(self) -> Path | None:
        """The journal's directory, where best/ and trials.csv are written (None: in-memory journal)."""
        path = getattr(self.coord.journal, "path", ":memory:")
        return None if path == ":memory:" else Path(path).resolve().parent

    async def _in_pool(self, call: Callable[..., _Reply], *args: Any) -> _Reply:
        return await asyncio.get_running_loop().run_in_executor(self._artifact_pool, call, *args)

    @unavailable_when_halted
    async def UploadCheckpoint(
            self, request_iterator: AsyncIterator[pb.ArtifactChunk], context: Context) -> pb.CheckpointAck:
        store = self.coord.artifact_store
        if store is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "UploadCheckpoint: this experiment keeps no checkpoints (no artifact store)")
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "UploadCheckpoint: no chunks (the first must carry the checkpoint header)")
        h = first.checkpoint
        where = f"UploadCheckpoint {h.lease.task_id}/{h.lease.attempt} epoch {h.epoch}"
        problem = None
        if not first.HasField("checkpoint") or not h.lease.task_id or h.lease.attempt < 1:
            problem = "the first chunk must carry checkpoint.lease (task_id, attempt >= 1)"
        elif h.epoch < 1:
            problem = f"checkpoint.epoch={h.epoch}: must be >= 1"
        elif not _SHA256.match(h.sha256):
            problem = f"checkpoint.sha256={h.sha256[:80]!r}: must be 64 lowercase hex digits"
        elif not 0 < h.size <= self.max_checkpoint_bytes:
            problem = f"checkpoint.size={h.size}: must be in 1..{self.max_checkpoint_bytes} bytes"
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {problem}")
        try:
            key = checkpoint_key(h.lease.task_id, h.epoch, h.lease.attempt)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {exc}")
        if not hmac.compare_digest(self.coord.lease_key(h.lease.task_id, h.lease.attempt), h.lease_key):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{where}: {REFUSED_DETAIL}")
        root = self.artifact_root()
        incoming = None
        if root is not None:
            incoming = root / ".incoming"
            incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix="checkpoint-", suffix=".part", dir=incoming)
        tmp = Path(tmp_name)
        try:
            digest, received = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                if first.data:
                    digest.update(first.data)
                    received += len(first.data)
                    out.write(first.data)
                async for chunk in request_iterator:
                    received += len(chunk.data)
                    if received > h.size:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"{where}: more than the announced {h.size} bytes")
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if received != h.size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{where}: {received} bytes received, {h.size} announced (truncated upload)")
            if digest.hexdigest() != h.sha256:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{where}: sha256 of the bytes received is {digest.hexdigest()[:16]}..., "
                                    f"announced {h.sha256[:16]}... (corrupted in transit)")
            await self._in_pool(store.put_file, key, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        # Journaled (and fsynced) before the ack: a checkpoint the worker saw acknowledged survives
        # a master crash. False: the attempt is no longer live; its file is of no use to anyone.
        recorded = await self._in_pool(self.coord.record_checkpoint, h.lease.task_id, h.lease.attempt,
                                       h.lease_key, h.epoch, key, h.sha256, h.size)
        if not recorded:
            await self._in_pool(store.delete, key)
        return pb.CheckpointAck(key=key, recorded=bool(recorded))

    @unavailable_when_halted
    async def DownloadArtifact(  # type: ignore[override]  # writes with context.write instead of yielding
            self, request: pb.ArtifactRequest, context: Context) -> None:
        try:
            key = validate_key(request.key)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"DownloadArtifact: {exc}")
        if request.HasField("lease") and request.lease.task_id:
            ref = self.coord.checkpoint_for(request.lease.task_id, request.lease.attempt, request.lease_key)
            if ref is None or ref.key != key:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"DownloadArtifact {key}: not the checkpoint lease {request.lease.task_id}/"
                                    f"{request.lease.attempt} resumes from (or the lease is not live, or its "
                                    f"lease_key does not match)")
            source: Any = self.coord.artifact_store
            size = ref.size
        else:
            root = self.artifact_root()
            if key not in PUBLIC_ARTIFACTS:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"DownloadArtifact {key}: without a lease only {', '.join(PUBLIC_ARTIFACTS)} "
                                    f"may be read")
            if root is None or not (root / key).is_file():
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"DownloadArtifact {key}: not written (yet): the master writes it when the "
                                    f"experiment finishes")
            source = LocalStore(root)
            size = (root / key).stat().st_size
        if source is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"DownloadArtifact {key}: no artifact store")
        try:
            chunks: Iterator[bytes] = await self._in_pool(source.open_chunks, key, ARTIFACT_CHUNK)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"DownloadArtifact {key}: not in {source.describe()}")
        first = True
        while (block := await self._in_pool(next, chunks, None)) is not None:
            await context.write(pb.ArtifactChunk(data=block, size=size if first else 0))
            first = False
        if first:  # an empty file: still one chunk saying so
            await context.write(pb.ArtifactChunk(size=0))

    def _stream_lost(self, worker_id: str, detail: str) -> None:
        if not self.stopping.is_set():
            self.coord.worker_lost(worker_id, LossReason.STREAM, detail)

    @unavailable_when_halted
    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.RegisterReply:
        try:
            worker_id, adopted = self.coord.register(
                request.worker_name, request.gpus, request.slots, request.hostname, request.pid,
                [(r.task_id, r.attempt) for r in request.running])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Register: {exc}")
        s = self.coord.settings
        return pb.RegisterReply(worker_id=worker_id, heartbeat_interval_seconds=s.heartbeat_interval,
                                missed_heartbeats=s.missed_heartbeats, experiment_name=s.name,
                                adopted=[pb.LeaseRef(task_id=t, attempt=a) for t, a in adopted],
                                answers_progress=True)

    @unavailable_when_halted
    async def Connect(  # type: ignore[override]  # writes with context.write instead of yielding
            self, request_iterator: AsyncIterator[pb.WorkerMessage], context: Context) -> None:
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello" or not first.hello.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "Connect: the first message must be a hello carrying the worker_id from Register")
        worker_id = first.hello.worker_id
        outbox = cast("LoopOutbox | None", self.coord.connect(worker_id))  # MasterServer makes LoopOutboxes
        if outbox is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Connect: worker id {worker_id!r} is unknown or was declared dead; register again")
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        ready = asyncio.Event()

        def wake() -> None:
            if threading.get_ident() == loop_thread:
                ready.set()
            else:
                loop.call_soon_threadsafe(ready.set)

        outbox.wake = wake
        reader = asyncio.ensure_future(self._read_worker_messages(worker_id, request_iterator, outbox))
        try:
            while True:
                if outbox.empty():
                    ready.clear()
                    if outbox.empty():
                        await ready.wait()
                messages, ended = pack_outbox(outbox.get_nowait(), outbox)
                for message in messages:
                    await context.write(message)
                if ended:
                    return
        finally:
            # The RPC ends for any reason: the worker process died, the connection reset, or we
            # ended it. Death at once (a no-op if already dead).
            outbox.wake = None
            reader.cancel()
            self._stream_lost(worker_id, "session stream closed")

    async def _read_worker_messages(self, worker_id: str, request_iterator: AsyncIterator[pb.WorkerMessage],
                                    outbox: LoopOutbox) -> None:
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "heartbeat":
                    if not self.coord.heartbeat(worker_id):
                        break
                elif kind == "drain":
                    self.coord.drain(worker_id, msg.drain.reason or "drain")
                elif kind == "results":
                    await self._accept_results(msg.results.results, outbox)
                elif kind == "progress":
                    await self._accept_progress(worker_id, msg.progress.reports, outbox)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, JournalError):  # JournalError: the master halted and is stopping
            pass
        except Exception:  # never let one worker's garbage take the master down
            log.exception("session of %s failed", worker_id)
        outbox.put(END_OF_STREAM)

    async def _journal(self, reports: list[ResultReport], outbox: queue.Queue | None = None,
                       make_acks: Callable[[list[str]], list[pb.ResultAck]] | None = None) -> list[str]:
        """Dispositions of `reports` once journaled (and fsynced), committed together with every
        other result that arrived while the previous commit ran. With an outbox, the AckMessage
        of `make_acks(dispositions)` goes on it before the leases of that commit are sent, so
        both leave in one message."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append((reports, (outbox, make_acks), future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_pending())
        return await future

    async def _commit_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            flat = [report for reports, _, _ in batch for report in reports]
            try:
                dispositions, to_wake = await loop.run_in_executor(
                    self._commit_pool, LoopOutbox.deferred_wakes, self.coord.report_results, flat)
            except Exception as exc:  # e.g. the journal's disk is full: every waiter learns it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for reports, (outbox, make_acks), future in batch:
                mine = dispositions[start:start + len(reports)]
                start += len(reports)
                if outbox is not None:
                    outbox.put(AckMessage(make_acks(mine)))
                if not future.done():
                    future.set_result(mine)
            for outbox in to_wake:
                outbox.wake_now()

    async def _accept_results(self, results: Any, outbox: queue.Queue) -> None:
        """Journals a ResultBatch from a session stream (one group commit) and puts one ack per
        result, in order, on the session's outbox. A malformed result is acknowledged "invalid"
        and recorded nowhere; the others still count."""
        acks = [pb.ResultAck(lease=r.lease) for r in results]
        reports, slots = [], []
        for ack, result in zip(acks, results, strict=True):
            try:
                reports.append(result_report(result))
                slots.append(ack)
            except BadResult as exc:
                ack.disposition, ack.detail = "invalid", f"TrialResult: {exc}"

        def fill(dispositions: list[str]) -> list[pb.ResultAck]:
            for ack, disposition in zip(slots, dispositions, strict=True):
                ack.disposition = disposition
                if disposition == "refused":
                    ack.detail = f"{ack.lease.task_id} attempt {ack.lease.attempt} {REFUSED_DETAIL}"
            return acks

        if reports:
            await self._journal(reports, outbox, fill)
        else:
            outbox.put(AckMessage(acks))

    async def _accept_progress(self, worker_id: str, batch: Any, outbox: queue.Queue) -> None:
        """Journals a ProgressBatch (curve points, stop decisions) on the commit thread, in order
        with the results, and puts the answers on the session's outbox once that is durable."""
        reports, answers = progress_reports(batch)
        if reports:
            rec = self.coord.registry.get(worker_id)
            name = rec.name if rec is not None else ""
            stops = await asyncio.get_running_loop().run_in_executor(
                self._commit_pool, self.coord.report_progress, reports, name)
            by_lease = {(r.task_id, r.attempt, r.step): stop for r, stop in zip(reports, stops, strict=True)}
            for answer in answers:
                answer.stop = by_lease.get((answer.lease.task_id, answer.lease.attempt, answer.step), False)
        outbox.put(DecisionMessage(answers))

    @unavailable_when_halted
    async def ReportResult(self, request: pb.TrialResult, context: Context) -> pb.ResultAck:
        try:
            report = result_report(request)
        except BadResult as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReportResult: {exc}")
        disposition = (await self._journal([report]))[0]
        if disposition == "refused":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"ReportResult: {request.lease.task_id} attempt {request.lease.attempt} "
                                f"{REFUSED_DETAIL}")
        return pb.ResultAck(disposition=disposition, lease=request.lease)

    @unavailable_when_halted
    async def Deregister(self, request: pb.DeregisterRequest, context: Context) -> pb.DeregisterReply:
        released = self.coord.deregister(request.worker_id, request.reason or "deregister")
        return pb.DeregisterReply(requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in released])

    @unavailable_when_halted
    async def WorkerGone(self, request: pb.WorkerGoneRequest, context: Context) -> pb.WorkerGoneReply:
        if not request.worker:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WorkerGone: worker (pod name or worker id) is empty")
        ids, released = self.coord.worker_gone(request.worker, request.reason or "pod gone")
        return pb.WorkerGoneReply(worker_ids=ids, requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in released])

    @unavailable_when_halted
    async def GetStatus(self, request: pb.StatusRequest, context: Context) -> pb.ExperimentStatus:
        after = request.losses_after_seq if request.HasField("losses_after_seq") else None
        return status_to_proto(self.coord.status(include_dead=request.include_dead_workers, losses_after_seq=after))


def status_to_proto(st: dict) -> pb.ExperimentStatus:
    msg = pb.ExperimentStatus(
        phase=st["phase"], succeeded=st["succeeded"], failed=st["failed"], running=st["running"],
        pending=st["pending"], budget=st["budget"], stale_results=st["stale_results"], retries=st["retries"],
        experiment_name=st["experiment_name"], message=st["message"], metric=st["metric"], goal=st["goal"],
        loss_seq=st["loss_seq"], stopped=st.get("stopped", 0))
    for w in st["workers"]:
        msg.workers.append(pb.WorkerInfo(
            worker_id=w["worker_id"], worker_name=w["worker_name"], state=w["state"], slots=w["slots"],
            gpus=w["gpus"], seconds_since_heartbeat=w["seconds_since_heartbeat"],
            running=[pb.LeaseRef(task_id=t, attempt=a) for t, a in w["running"]]))
    if st["best"]:
        b = st["best"]
        msg.best.CopyFrom(pb.BestTrial(trial_id=b["trial_id"], metric=b["metric"], summary=b["summary"],
                                       architecture_json=b["arch_json"], metrics_json=json.dumps(b["metrics"]),
                                       arch_hash=b["arch_hash"], checkpoint=b.get("checkpoint") or ""))
    if st.get("pareto"):
        front = st["pareto"]
        msg.pareto.CopyFrom(pb.ParetoFront(size=front["size"], best=[pb.ObjectiveBest(**b) for b in front["best"]]))
    for loss in st["losses"]:
        msg.losses.append(pb.WorkerLoss(
            worker_id=loss["worker_id"], worker_name=loss["worker_name"], detected_by=loss["detected_by"],
            detected_at=loss["detected_at"], requeued=[pb.LeaseRef(task_id=t, attempt=a) for t, a in loss["requeued"]],
            seq=loss["seq"]))
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
    """The master process's gRPC server (grpc.aio on its own thread's event loop): the Master
    service, health, the heartbeat monitor."""

    def __init__(self, coordinator: ExperimentCoordinator, port: int = 50051, host: str | None = None,
                 token: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 metrics_port: int | None = None, dashboard_port: int | None = None,
                 view_token: str | None = None):
        self.coord = coordinator
        coordinator.new_outbox = LoopOutbox
        self.host, self.requested_port = host or default_bind_host(), port
        self.port: int | None = None
        self._token = token
        if not token:
            log.warning("no token configured: any client may call the master (set %s)", TOKEN_ENV)
        self._max_message_bytes = max_message_bytes
        self.servicer = MasterServicer(coordinator)
        self.health = health.aio.HealthServicer()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        # Fail-stop: the JournalError that halted the coordinator; the server then stops by
        # itself (health NOT_SERVING first) and raise_if_failed() hands the error to the process.
        self.failure: JournalError | None = None
        coordinator.on_halt.append(self._on_halt)
        # Prometheus /metrics on a port of its own (None: off; 0: a free one), same address as gRPC.
        self.metrics_requested_port = metrics_port
        self.metrics: MasterMetrics | None = None
        self.metrics_port: int | None = None
        # The web dashboard (morphml.dashboard) on a port of its own, like the metrics: it reads the
        # journal file read-only and needs the experiment's token or the read-only view token.
        self.dashboard_requested_port = dashboard_port
        self._view_token = view_token
        self.dashboard: DashboardServer | None = None
        self.dashboard_port: int | None = None
        self.loopback_port: int | None = None  # the 127.0.0.1 listener beside a pod-IP bind (_add_loopback)

    def _call(self, coroutine: Coroutine[Any, Any, _Reply], timeout: float | None = 30) -> _Reply:
        """Runs a coroutine on the server's loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self) -> int:
        interceptors = [TokenInterceptor(self._token)] if self._token else []
        self._server = grpc.aio.server(interceptors=interceptors, options=grpc_options(self._max_message_bytes))
        pb_grpc.add_MasterServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        port = self._server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if not port:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}")
        self.loopback_port = self._add_loopback(self._server, port)
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def _add_loopback(self, server: grpc.aio.Server, port: int) -> int | None:
        """Also listen on 127.0.0.1:`port` when bound to one pod IP: a port-forward (`morphml
        results`, `kubectl port-forward`) reaches the pod through the container runtime, which
        dials localhost inside the pod's network namespace. Where that address is taken (pods
        sharing one host's namespace) the master goes on without it."""
        if self.host in ("[::]", "0.0.0.0", "", "127.0.0.1", "localhost", "[::1]"):  # already reachable there
            return None
        try:
            return server.add_insecure_port(f"127.0.0.1:{port}") or None
        except RuntimeError:
            log.warning("127.0.0.1:%d is taken: port-forwards to this master will not connect", port)
            return None

    def start(self) -> int:
        if self.metrics_requested_port is not None:  # before gRPC: serving health means metrics are up too
            from .metrics import MasterMetrics  # prometheus_client only where metrics are served

            self.metrics = MasterMetrics(self.coord)
            self.metrics_port = self.metrics.serve(self.metrics_requested_port, self.host)
        if self.dashboard_requested_port is not None:
            self._start_dashboard()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self.metrics is not None:
                self.metrics.stop()
            if self.dashboard is not None:
                self.dashboard.stop()
            raise
        self._monitor = threading.Thread(target=self._watch_heartbeats, name="heartbeat-monitor", daemon=True)
        self._monitor.start()
        log.info("master listening on port %d", self.port)
        return self.port

    def _start_dashboard(self) -> None:
        from morphml.dashboard.data import DashboardData  # http.server only where it is served
        from morphml.dashboard.server import DashboardServer

        settings = self.coord.settings
        data = DashboardData(self.coord.journal.path, metric=settings.metric, goal=settings.goal,
                             budget=settings.max_trials)
        tokens = [t for t in (self._token, self._view_token) if t]
        # `kubectl port-forward` dials localhost inside the pod, so in a pod (gRPC on $POD_IP) the
        # dashboard listens on every address of the pod; a loopback master keeps it on loopback.
        host = self.host if self.host in ("127.0.0.1", "::1", "localhost") else "::" if ":" in self.host else "0.0.0.0"
        self.dashboard = DashboardServer(data, host, self.dashboard_requested_port or 0, tokens)
        self.dashboard_port = self.dashboard.start()

    def _on_halt(self, error: JournalError) -> None:
        """The coordinator halted (on some thread, maybe under its lock): stop from a thread of
        our own, since stopping waits for the loop and the commit thread."""
        self.failure = error
        threading.Thread(target=self.stop, kwargs={"grace": 0.0}, name="fail-stop", daemon=True).start()

    def raise_if_failed(self, timeout: float = 10.0) -> None:
        """Raises the JournalError that stopped the server, once it has stopped serving."""
        if self.failure is not None:
            self._stopped.wait(timeout)
            raise self.failure

    def _watch_heartbeats(self) -> None:
        # Tick a few times per interval so a hung worker is declared dead within ~interval/5 of
        # its deadline.
        tick = min(1.0, max(0.02, self.coord.settings.heartbeat_interval / 5))
        while not self._stop.wait(tick):
            try:
                self.coord.check_heartbeats()
            except JournalError:
                return  # halted: the server is stopping
            except Exception:
                log.exception("heartbeat check failed")

    async def _stop_serving(self, grace: float) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(grace)

    def stop(self, grace: float = 1.0) -> None:
        with self._stop_lock:
            first = not self._stop.is_set()
            self._stop.set()
        if not first:  # stopping already (e.g. fail-stop and then the CLI): wait for that one
            self._stopped.wait(grace + 15)
            return
        self.servicer.stopping.set()
        if self._server is not None and self._thread is not None and self._thread.is_alive():
            try:
                self._call(self._stop_serving(grace), timeout=grace + 5)
            except Exception:  # the loop is wedged or already gone: stop it anyway
                log.exception("stopping the gRPC server")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self.servicer.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        self._stopped.set()

    def wait(self) -> None:
        """Blocks until the server stops; raises the JournalError if it stopped for one."""
        while not self._stop.wait(1.0):
            pass
        self.raise_if_failed()


class MasterNode:
    """The seed's API: `MasterNode(optimizer, {'port': 50051, 'num_workers': 4})`.

    Config keys: port (50051), host ($POD_IP if set, else '[::]'), num_workers (no trial starts before this many
    workers are connected, waiting at most 60 s), token (default
    $MORPHML_TOKEN; no token disables auth), journal (SQLite path; default in memory, i.e. no
    resume), max_trials (default population_size x num_generations when the optimizer has
    them, else 100), max_failed_trials (10), max_task_retries (2), heartbeat_interval (10),
    missed_heartbeats (3), evaluation (spec.evaluation dict), metric, goal, name, seed, prefetch
    (None = auto, the default: one queued lease per worker while trials are short), metrics_port
    (Prometheus /metrics; default None: off, 0: a free port, see server.metrics_port).
    """

    def __init__(self, optimizer: Any, config: dict | None = None):
        self.optimizer = optimizer
        self.config = dict(config or {})
        self.coordinator: ExperimentCoordinator | None = None
        self.server: MasterServer | None = None

    def _settings(self, num_generations: int | None = None) -> ExperimentSettings:
        # morphml.distributed.settings holds the one mapping to ExperimentSettings (the CLI's
        # manifests go through it too); it imports coordinator and experiment, never this module.
        from morphml.distributed.settings import settings_for_master_config

        return settings_for_master_config(self.config, self.optimizer, num_generations)

    def start(self, num_generations: int | None = None) -> int:
        """Starts serving; returns the port. Workers may connect from now on."""
        if self.server is not None and self.server.port is not None:
            return self.server.port
        if num_generations is not None and hasattr(self.optimizer, "num_generations"):
            self.optimizer.num_generations = num_generations
        journal = Journal(self.config.get("journal", ":memory:"), self.config.get("journal_sync", "FULL"))
        self.coordinator = ExperimentCoordinator(self.optimizer, self._settings(num_generations), journal,
                                                 self.config.get("clock") or SystemClock())
        token = self.config.get("token") or os.environ.get(TOKEN_ENV) or None
        metrics_port = self.config.get("metrics_port")
        self.server = MasterServer(self.coordinator, int(self.config.get("port", 50051)),
                                   self.config.get("host"), token,
                                   metrics_port=None if metrics_port is None else int(metrics_port))
        return self.server.start()

    def run_experiment(self, num_generations: int | None = None, timeout: float | None = None) -> Any:
        """Blocks until the experiment is over; returns optimizer.best() (or the status' best)."""
        if self.server is None:
            self.start(num_generations)
        elif num_generations is not None:
            if hasattr(self.optimizer, "num_generations"):
                self.optimizer.num_generations = num_generations
            pop = getattr(self.optimizer, "population_size", None)
            if pop and "max_trials" not in self.config:
                self._started().settings.max_trials = pop * num_generations
        coordinator = self._started()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not coordinator.wait_done(1.0):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment not finished after {timeout} s: {coordinator.status()['phase']}")
        best = getattr(self.optimizer, "best", None)
        return best() if callable(best) else coordinator.status()["best"]

    def _started(self) -> ExperimentCoordinator:
        if self.coordinator is None:
            raise RuntimeError("MasterNode: call start() (or run_experiment()) first")
        return self.coordinator

    def status(self) -> dict:
        return self._started().status()

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.server.stop(grace)
            self._started().journal.close()
            self.server = None
