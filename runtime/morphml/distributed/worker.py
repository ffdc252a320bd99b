"""The worker: dials the master, runs leased trials in child processes, heartbeats.

One long-lived runner child process per slot (one per GPU, device cuda:i, or --slots N on
CPU) runs the trials (see trial_runner); the worker process itself only speaks gRPC, so its
heartbeats keep flowing while a trial trains, hangs or crashes, and it never imports torch.

Connection life: Register -> Connect stream (hello, then heartbeats every interval; leases
arrive on it in batches, results go out on it in batches and are acknowledged on it once
journaled). When the master goes away the worker retries with exponential backoff, registers
again (listing the leases it still runs so a restarted master can re-adopt them) and delivers
the results it finished meanwhile, or sent but never saw acknowledged, with ReportResult.
SIGTERM (drain()): no new leases, the running trials get `grace_seconds` to finish and be
reported, the rest are handed back, then Deregister.

Imports: grpc, grpc_health, morphml.distributed.{proto, auth, master (options only)}. No torch.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .auth import token_metadata
from .master import DEFAULT_MAX_MESSAGE_BYTES, default_bind_host, grpc_options
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc as pb_grpc

log = logging.getLogger("morphml.worker")

RUNNER_LOOKAHEAD = 1  # trials queued in a runner's stdin behind the running one
# Not callable, so a runner answers it at once with an error (and imports nothing heavy).
WARM_UP_EVALUATOR = "morphml.distributed.trial_runner:MAX_MESSAGE"

PERMANENT_ERRORS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED)


class WorkerRefused(RuntimeError):
    """The master refused this worker for good (wrong token, bad registration)."""


def default_worker_name() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerConfig:
    master: str  # "host:port"
    token: str | None = None
    name: str = ""
    gpus: int = 0
    slots: int = 1
    health_port: int | None = None
    health_host: str | None = None  # default: $POD_IP if set, else every address
    grace_seconds: float = 25.0
    reconnect_initial_seconds: float = 0.1
    reconnect_max_seconds: float = 2.0
    give_up_after_seconds: float | None = 600.0  # exit when the master is unreachable this long
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if ":" not in self.master:
            raise ValueError(f"--master {self.master!r}: expected HOST:PORT")
        if self.gpus < 0:
            raise ValueError(f"--gpus {self.gpus}: must be >= 0")
        if self.slots < 1:
            raise ValueError(f"--slots {self.slots}: must be >= 1")
        self.name = self.name or default_worker_name()
        if self.gpus > 0:
            self.slots = self.gpus  # one trial per GPU

    def device(self, slot: int) -> str:
        return f"cuda:{slot}" if self.gpus > 0 else "cpu"


class RunnerProcess:
    """One persistent trial_runner child; kill() ends a running trial at once."""

    def __init__(self, slot: int):
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._buffer = b""
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "morphml.distributed.trial_runner"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=None, start_new_session=False)

    def send(self, request: dict) -> None:
        """Queues one trial on the runner's stdin; it starts when the runner is free."""
        self.ensure_started()
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the runner died: receive() reports it

    def warm_up(self, timeout: float) -> None:
        """Sends the runner a request that fails at once and waits for the reply, so the worker
        registers only when its runner is up and has loaded the evaluation dispatch: on a
        loaded host an interpreter start takes seconds, and a lease given to a worker whose
        runner is still starting waits for it while the master counts it as running."""
        self.send({"task_id": "", "attempt": 0, "arch": {}, "device": None, "seed": 0,
                   "evaluation": {"evaluator": WARM_UP_EVALUATOR}})
        status, _ = self.receive(time.monotonic() + timeout)
        if status != "reply":
            log.warning("trial runner %d: no reply to the warm-up request (%s)", self.slot, status)

    def receive(self, deadline: float | None, wake_fd: int | None = None):
        """Waits for the next reply. Returns ("reply", dict), ("timeout", None) at the deadline,
        ("exited", exit code or None when killed by kill()), or ("wake", None) when wake_fd
        became readable first."""
        proc = self.proc
        fd = proc.stdout.fileno()
        watch = [fd] if wake_fd is None else [fd, wake_fd]
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(watch, [], [], wait)
            if not ready:
                return "timeout", None
            if fd not in ready:
                return "wake", None
            chunk = os.read(fd, 65536)
            if not chunk:
                code = proc.wait()
                return "exited", (None if getattr(proc, "killed_on_purpose", False) else code)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return "reply", json.loads(line)

    def kill(self, on_purpose: bool = False) -> None:
        with self._lock:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.killed_on_purpose = on_purpose
                proc.kill()
                proc.wait()

    def close(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()


class WorkerNode:
    """A worker process. `WorkerNode({'master_host', 'master_port', 'port', 'num_gpus'}).start()`
    (the seed's keys) or `WorkerNode(WorkerConfig(...))`; start() blocks until the experiment is
    over, the worker drained, or the master stayed away past give_up_after_seconds."""

    def __init__(self, config: dict | WorkerConfig):
        if isinstance(config, dict):
            c = config
            config = WorkerConfig(
                master=f"{c.get('master_host', 'localhost')}:{c.get('master_port', 50051)}",
                token=c.get("token") or os.environ.get("MORPHML_TOKEN") or None, name=c.get("name", ""),
                gpus=int(c.get("num_gpus", 0)), slots=int(c.get("slots", 1)),
                health_port=c.get("port"), grace_seconds=float(c.get("grace_seconds", 25.0)))
        self.config = config
        self.exit_code = 0
        self._metadata = token_metadata(config.token)
        self._channel = grpc.insecure_channel(config.master, options=grpc_options(config.max_message_bytes))
        self._stub = pb_grpc.MasterStub(self._channel)
        self._runners = [RunnerProcess(i) for i in range(config.slots)]
        # Per slot, a pipe that wakes the slot thread out of its wait on the runner when a lease
        # arrives, so it can queue the lease behind the running trial.
        self._wake = [os.pipe() for _ in range(config.slots)]
        for r, w in self._wake:
            os.set_blocking(r, False)
            os.set_blocking(w, False)
        self._leases: queue.Queue = queue.Queue()
        self._running: dict[tuple[str, int], int] = {}  # lease -> slot
        self._cancelled: set[tuple[str, int]] = set()
        # Results sent on the live session stream and not acknowledged yet (the master acks each
        # once it is journaled); when the session ends they join _undelivered. A slot never
        # waits for an acknowledgement: it starts its next (prefetched) lease at once.
        self._unacked: dict[tuple[str, int], pb.TrialResult] = {}
        self._undelivered: list[pb.TrialResult] = []  # for ReportResult, after a reconnect
        self._lock = threading.Lock()
        self._evaluation_cache: tuple[str | None, dict] = (None, {})
        self._worker_id = ""
        self._draining = threading.Event()
        self._done = threading.Event()
        self._leaving = threading.Event()  # deregistering: never register again
        self._send: queue.Queue | None = None
        self._stream = None
        self._health_server = None

    # --- public ---------------------------------------------------------------------------------
    def start(self, block: bool = True) -> int:
        self._start_health()
        for runner in self._runners:
            runner.ensure_started()  # warm: the first trial does not pay the interpreter start
        for runner in self._runners:
            runner.warm_up(60)
        for slot in range(self.config.slots):
            threading.Thread(target=self._slot_loop, args=(slot,), name=f"slot-{slot}", daemon=True).start()
        threading.Thread(target=self._redeliver_loop, name="redeliver", daemon=True).start()
        if not block:
            threading.Thread(target=self._main_loop, name="worker-main", daemon=True).start()
            return 0
        return self._main_loop()

    def drain(self, reason: str = "SIGTERM") -> None:
        """Stop taking work; finish within the grace period or hand back; deregister; exit."""
        if self._draining.is_set():
            return
        self._draining.set()
        log.info("draining (%s): %d trial(s) running, grace %.0f s", reason, len(self._running),
                 self.config.grace_seconds)
        if self._send is not None:
            self._send.put(pb.WorkerMessage(drain=pb.DrainNotice(reason=reason)))
        threading.Thread(target=self._finish_drain, args=(reason,), name="drain", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # --- connection ---------------------------------------------------------------------------
    def _main_loop(self) -> int:
        backoff = self.config.reconnect_initial_seconds
        away_since = time.monotonic()
        try:
            while not self._done.is_set() and not self._leaving.is_set():
                try:
                    self._register()
                except WorkerRefused as exc:
                    log.error("%s", exc)
                    print(f"morphml worker: {exc}", file=sys.stderr, flush=True)
                    self.exit_code = 2
                    break
                except grpc.RpcError as exc:
                    if self.config.give_up_after_seconds is not None and \
                            time.monotonic() - away_since > self.config.give_up_after_seconds:
                        log.error("master %s unreachable for %.0f s; giving up", self.config.master,
                                  self.config.give_up_after_seconds)
                        self.exit_code = 3
                        break
                    log.info("master unreachable (%s); retrying in %.2f s", exc.code(), backoff)
                    self._done.wait(backoff)
                    backoff = min(backoff * 2, self.config.reconnect_max_seconds)
                    continue
                backoff = self.config.reconnect_initial_seconds
                self._session()
                away_since = time.monotonic()
                if self._draining.is_set():
                    # A draining worker takes no new work, so it does not register again when
                    # its session ends (the operator reported its pod gone, or the master
                    # stopped): it waits for the drain to finish; results go out through
                    # ReportResult.
                    self._done.wait(self.config.grace_seconds + 10)
                    break
            if self._leaving.is_set():
                self._done.wait(10)  # let the drain thread finish its Deregister call
        finally:
            self._shutdown()
        return self.exit_code

    def _register(self) -> None:
        # Leases queued but not started belong to the old session: the master re-leases them.
        while not self._leases.empty():
            try:
                self._leases.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            running = list(self._running)
        try:
            reply = self._stub.Register(pb.RegisterRequest(
                worker_name=self.config.name, gpus=self.config.gpus, slots=self.config.slots,
                hostname=socket.gethostname(), pid=os.getpid(), version=_version(),
                running=[pb.LeaseRef(task_id=t, attempt=a) for t, a in running]),
                metadata=self._metadata, timeout=10)
        except grpc.RpcError as exc:
            if exc.code() in PERMANENT_ERRORS:
                raise WorkerRefused(f"master {self.config.master} refused this worker "
                                    f"({exc.code().name}): {exc.details()}") from exc
            raise
        self._worker_id = reply.worker_id
        self._heartbeat_interval = reply.heartbeat_interval_seconds or 10.0
        adopted = {(r.task_id, r.attempt) for r in reply.adopted}
        # Leases the master did not re-adopt keep running: their results are reported and
        # recorded as stale (a record of what happened), never counted.
        log.info("registered as %s (adopted %d running lease(s))", self._worker_id, len(adopted))
        self._flush_undelivered()

    def _session(self) -> None:
        send: queue.Queue = queue.Queue()
        with self._lock:
            self._send = send  # results finished from now on go out on this session's stream
        stop = object()
        interval = self._heartbeat_interval

        def outgoing():
            yield pb.WorkerMessage(hello=pb.Hello(worker_id=self._worker_id))
            if self._draining.is_set():
                yield pb.WorkerMessage(drain=pb.DrainNotice(reason="draining"))
            sequence = 0
            next_beat = time.monotonic() + interval
            while True:
                try:
                    item = send.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    item = None
                if item is stop:
                    return
                if isinstance(item, pb.TrialResult):
                    # Every result ready now goes in one message (natural batching under load).
                    batch, others = pb.WorkerMessage(), []
                    batch.results.results.append(item)
                    while True:
                        try:
                            more = send.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(more, pb.TrialResult):
                            batch.results.results.append(more)
                        else:
                            others.append(more)
                    yield batch
                    for other in others:
                        if other is stop:
                            return
                        yield other
                    continue
                if item is not None:
                    yield item
                    continue
                sequence += 1
                next_beat = time.monotonic() + interval
                with self._lock:
                    running = list(self._running)
                yield pb.WorkerMessage(heartbeat=pb.Heartbeat(
                    sequence=sequence, running=[pb.LeaseRef(task_id=t, attempt=a) for t, a in running]))

        stream = self._stub.Connect(outgoing(), metadata=self._metadata)
        self._stream = stream
        try:
            for msg in stream:
                if msg.acks:
                    self._acknowledged(msg.acks)
                kind = msg.WhichOneof("kind")
                if kind == "leases":
                    for lease in msg.leases.leases:
                        self._leases.put(lease)
                    for _, wake_w in self._wake:
                        try:
                            os.write(wake_w, b"x")
                        except BlockingIOError:
                            pass  # already awake-pending
                elif kind == "cancel":
                    self._cancel((msg.cancel.task_id, msg.cancel.attempt))
                elif kind == "shutdown":
                    log.info("master says: %s", msg.shutdown.reason)
                    self._done.set()
                    try:  # leave cleanly so the master does not count us as lost
                        self._stub.Deregister(pb.DeregisterRequest(worker_id=self._worker_id, reason="experiment over"),
                                              metadata=self._metadata, timeout=5)
                    except grpc.RpcError:
                        pass
                    break
            else:
                log.warning("master ended the session (declared dead or restarting); registering again")
        except grpc.RpcError as exc:
            if not self._done.is_set():
                log.warning("session broken (%s: %s); reconnecting", exc.code(), exc.details())
        finally:
            with self._lock:
                self._send = None
                # Sent on this stream but never acknowledged: the master may or may not have
                # journaled them; ReportResult delivers them again (a repeat is "duplicate").
                self._undelivered.extend(self._unacked.values())
                self._unacked.clear()
            send.put(stop)
            stream.cancel()

    def _acknowledged(self, acks) -> None:
        with self._lock:
            for ack in acks:
                self._unacked.pop((ack.lease.task_id, ack.lease.attempt), None)
        for ack in acks:
            if ack.disposition in ("refused", "invalid"):
                log.error("master rejected result %s/%d (%s): %s", ack.lease.task_id, ack.lease.attempt,
                          ack.disposition, ack.detail)
            else:
                log.debug("result %s/%d: %s", ack.lease.task_id, ack.lease.attempt, ack.disposition)

    # --- trials --------------------------------------------------------------------------------
    def _slot_loop(self, slot: int) -> None:
        """Feeds one runner. While a trial runs, the slot's next lease (prefetched by the master)
        is already written to the runner's stdin, so the runner starts it the moment the current
        one ends, without waiting for this process to be scheduled; a runner killed (timeout,
        crash, cancel) takes the queued trial with it, which is re-sent to its replacement."""
        runner = self._runners[slot]
        wake_r = self._wake[slot][0]
        inflight: list[dict] = []  # head: the running trial; then the one queued behind it
        head_started = 0.0
        while not self._done.is_set():
            while len(inflight) < 1 + RUNNER_LOOKAHEAD:
                try:
                    lease = self._leases.get(timeout=0.5) if not inflight else self._leases.get_nowait()
                except queue.Empty:
                    break
                if self._draining.is_set():
                    continue  # not started: Deregister hands it back to the master
                item = self._prepare(lease, slot)
                if "reply" in item:  # malformed lease
                    self._finish_trial(item, item["reply"])
                    continue
                with self._lock:
                    self._running[item["ref"]] = slot
                runner.send(item["request"])
                if not inflight:
                    head_started = time.monotonic()
                inflight.append(item)
            if not inflight:
                continue
            head = inflight[0]
            deadline = None if head["timeout"] is None else head_started + head["timeout"]
            status, reply = runner.receive(deadline, wake_r)
            if status == "wake":
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            if self._done.is_set():
                break  # shutting down: the runners were killed on purpose
            now = time.monotonic()
            if status == "exited" and reply is None:
                with self._lock:
                    head_cancelled = head["ref"] in self._cancelled
                if not head_cancelled:
                    # Killed to cancel a trial queued behind this one: this one runs again.
                    inflight = self._resend_to_new_runner(runner, inflight, keep=head)
                    head_started = now
                    continue
            inflight.pop(0)
            if status == "timeout":
                runner.kill()
                reply = {"ok": False, "kind": "timeout", "duration": now - head_started,
                         "message": f"trial exceeded timeoutSeconds={head['timeout']:g}; its process was killed"}
            elif status == "exited":
                if reply is None:  # killed on purpose (cancel)
                    reply = None
                else:
                    kind = "oom" if reply == -signal.SIGKILL else "exception"
                    reply = {"ok": False, "kind": kind, "duration": now - head_started,
                             "message": f"trial process exited with code {reply} before reporting a result"}
            head_started = now
            if status != "reply":
                # The queued trials died with the runner before starting: give them to a new one.
                inflight = self._resend_to_new_runner(runner, inflight)
            self._finish_trial(head, reply)

    def _resend_to_new_runner(self, runner: RunnerProcess, inflight: list, keep: dict | None = None) -> list:
        """The runner died or was killed with trials queued in its stdin: drop the cancelled ones
        (all but `keep`), send the rest to its replacement, and return them."""
        with self._lock:
            kept = [i for i in inflight if i["ref"] not in self._cancelled or i is keep]
        for dropped in inflight:
            if dropped not in kept:
                self._finish_trial(dropped, None)
        for item in kept:
            runner.send(item["request"])
        return kept

    def _prepare(self, lease, slot: int) -> dict:
        """The runner request for a lease (or an "invalid" reply when the lease is malformed)."""
        ref = (lease.task_id, lease.attempt)
        try:
            evaluation = self._evaluation(lease.evaluation_json)
            timeout = evaluation.get("timeoutSeconds")
            if timeout and not evaluation.get("evaluator"):
                timeout = float(timeout) * 1.1 + 5  # the built-in trainer times out first, cleanly
            request = {"task_id": lease.task_id, "attempt": lease.attempt,
                       "arch": json.loads(lease.architecture_json), "evaluation": evaluation,
                       "device": self.config.device(slot), "seed": lease.seed}
        except Exception as exc:  # a malformed lease must not kill the slot
            return {"lease": lease, "ref": ref,
                    "reply": {"ok": False, "kind": "invalid", "message": f"bad lease: {exc}", "duration": 0.0}}
        return {"lease": lease, "ref": ref, "request": request, "timeout": float(timeout) if timeout else None}

    def _evaluation(self, text: str) -> dict:
        """spec.evaluation of a lease, parsed (the same text for every lease of an experiment)."""
        cached = self._evaluation_cache  # one read: slots call this from their own threads
        if cached[0] != text:
            cached = self._evaluation_cache = (text, json.loads(text or "{}"))
        return dict(cached[1])

    def _finish_trial(self, item: dict, reply: dict | None) -> None:
        lease, ref = item["lease"], item["ref"]
        with self._lock:
            self._running.pop(ref, None)
            cancelled = ref in self._cancelled
            self._cancelled.discard(ref)
        if reply is None or cancelled:
            return
        result = pb.TrialResult(
            lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt), ok=bool(reply.get("ok")),
            metrics_json=json.dumps(reply.get("metrics", {})) if reply.get("ok") else "",
            failure_kind=reply.get("kind", ""), failure_message=reply.get("message", ""),
            duration_seconds=float(reply.get("duration", 0.0)), worker_name=self.config.name,
            lease_key=lease.lease_key)
        with self._lock:
            if self._send is not None:  # the live session's stream carries it
                result.worker_id = self._worker_id
                self._unacked[ref] = result
                self._send.put(result)
            else:  # between sessions: ReportResult delivers it after the next Register
                self._undelivered.append(result)

    def _cancel(self, ref: tuple[str, int]) -> None:
        with self._lock:
            slot = self._running.get(ref)
            if slot is None:
                return
            self._cancelled.add(ref)
        self._runners[slot].kill(on_purpose=True)

    def _deliver(self, result: pb.TrialResult) -> None:
        result.worker_id = self._worker_id
        try:
            ack = self._stub.ReportResult(result, metadata=self._metadata, timeout=30)
            log.info("result %s/%d: %s", result.lease.task_id, result.lease.attempt, ack.disposition)
        except grpc.RpcError as exc:
            if exc.code() in PERMANENT_ERRORS:
                log.error("master rejected result %s/%d: %s", result.lease.task_id, result.lease.attempt, exc.details())
                return
            log.warning("could not report %s/%d (%s); will retry", result.lease.task_id, result.lease.attempt,
                        exc.code())
            with self._lock:
                self._undelivered.append(result)

    def _redeliver_loop(self) -> None:
        # Results that could not be reported (master away or erring) are retried every second
        # and after every re-registration.
        while not self._done.wait(1.0):
            if self._undelivered and self._send is not None:
                self._flush_undelivered()

    def _flush_undelivered(self) -> None:
        with self._lock:
            pending, self._undelivered = self._undelivered, []
        for result in pending:
            self._deliver(result)

    # --- draining and exit ---------------------------------------------------------------------
    def _finish_drain(self, reason: str) -> None:
        deadline = time.monotonic() + self.config.grace_seconds
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._running) or bool(self._unacked)
            if not busy and self._leases.empty():
                break
            time.sleep(0.05)
        with self._lock:
            leftover = list(self._running)
        for ref in leftover:  # grace period over: hand these back (Deregister requeues them)
            self._cancel(ref)
        self._flush_undelivered()
        self._leaving.set()
        try:
            self._stub.Deregister(pb.DeregisterRequest(worker_id=self._worker_id, reason=reason),
                                  metadata=self._metadata, timeout=5)
        except grpc.RpcError as exc:
            log.warning("deregister failed (%s)", exc.code())
        self._done.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def _shutdown(self) -> None:
        self._done.set()
        for runner in self._runners:
            runner.kill(on_purpose=True)
            runner.close()
        if self._health_server is not None:
            self._health_server.stop(0)
        self._channel.close()

    def _start_health(self) -> None:
        if not self.config.health_port:
            return
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        host = self.config.health_host or default_bind_host()
        if not server.add_insecure_port(f"{host}:{self.config.health_port}"):
            raise OSError(f"--health-port {self.config.health_port}: cannot listen")
        server.start()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("morphml.Worker", health_pb2.HealthCheckResponse.SERVING)
        self._health_server = server


def _version() -> str:
    from morphml import __version__

    return __version__
