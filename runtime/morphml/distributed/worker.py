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

Progress: a runner's progress line (an epoch, a report() of a custom evaluator) goes to the
master on the session stream (WorkerMessage.progress); the master's ProgressDecision for it is
written back to that runner's stdin. With no session (master away), or a master that does not
answer progress (RegisterReply.answers_progress false: an older release), the worker answers
"continue" itself at once, and a session that ends answers every report still waiting so.

Checkpoints (Lease.save_epochs, Lease.checkpoint): before a resumed lease starts, the slot
thread downloads its checkpoint (DownloadArtifact) into the worker's checkpoint folder and the
runner checks and loads it (a download that fails becomes the trial's `checkpoint_fallback`: it
trains from 0). The runner writes each new checkpoint file into the same folder and says so on
its reply pipe; one uploader thread sends the files in order (UploadCheckpoint) and deletes
them, and a trial's result leaves only after that trial's uploads, so the master has journaled
its final checkpoint when it counts the result. A master without these RPCs (UNIMPLEMENTED)
gets no more uploads: the trials train on without checkpoints.

Liveness: the worker's gRPC health (services "" and "morphml.Worker", what the kubelet's
probes call) is SERVING only while the session loop and every runner make progress; a part
silent past its bound turns it NOT_SERVING until it recovers, and a runner stuck past the
replacement bound is killed (its trial reported failed, kind "timeout") and replaced. The
decision is morphml.distributed.liveness; docs/reliability.md ("A wedged worker") has the why.

Out of memory: a runner killed by SIGKILL is looked up in the container's memory cgroup (its OOM
kill count, morphml.distributed.worker_memory): the trial is reported failed, kind "oom" with a
message that says out of memory and names the memory limit, or "exception" for a kill -9 from
outside; the master retries it (faultTolerance.maxTaskRetries) like any failed trial.

Imports: grpc, grpc_health, morphml.distributed.{proto, auth, clock, liveness, master (options
only), worker_memory}. No torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .auth import token_metadata
from .clock import SystemClock
from .liveness import SESSION, Clock, LivenessMonitor, Verdict, liveness_bounds, runner_part
from .master import DEFAULT_MAX_MESSAGE_BYTES, default_bind_host, grpc_options
from .proto import worker_pb2 as pb
from .proto import worker_pb2_grpc as pb_grpc
from .worker_memory import ContainerMemory, OomLedger, describe_runner_kill

log = logging.getLogger("morphml.worker")

RUNNER_LOOKAHEAD = 1  # trials queued in a runner's stdin behind the running one
# Not callable, so a runner answers it at once with an error (and imports nothing heavy).
WARM_UP_EVALUATOR = "morphml.distributed.trial_runner:MAX_MESSAGE"

PERMANENT_ERRORS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED)


CHECKPOINT_DIR_PREFIX = "morphml-checkpoints-"  # + "<pid>-": the worker's folder for checkpoint files


def remove_orphaned_checkpoint_dirs() -> None:
    """Checkpoint folders of workers that died without cleaning up (SIGKILL) are removed by the
    next worker on the machine: the folder name carries the pid, a folder of a pid that no longer
    runs is nobody's."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(CHECKPOINT_DIR_PREFIX):
            continue
        pid = name[len(CHECKPOINT_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


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
    # Liveness (see morphml.distributed.liveness): a part silent this long is stuck (health
    # NOT_SERVING); a runner stuck this long is replaced. None: derived from the master's
    # heartbeat interval (3 intervals, at least 10 s; replaced after twice that).
    stuck_after_seconds: float | None = None
    replace_after_seconds: float | None = None

    def __post_init__(self) -> None:
        if ":" not in self.master:
            raise ValueError(f"--master {self.master!r}: expected HOST:PORT")
        if self.gpus < 0:
            raise ValueError(f"--gpus {self.gpus}: must be >= 0")
        if self.slots < 1:
            raise ValueError(f"--slots {self.slots}: must be >= 1")
        liveness_bounds(10.0, self.stuck_after_seconds, self.replace_after_seconds)  # validates both
        self.name = self.name or default_worker_name()
        if self.gpus > 0:
            self.slots = self.gpus  # one trial per GPU

    def device(self, slot: int) -> str:
        return f"cuda:{slot}" if self.gpus > 0 else "cpu"


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc); None elsewhere or
    when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R, S, D, T, Z, ...), "?" when unknown: for
    the log line that says why a runner counts as stuck."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return "?"


class RunnerProcess:
    """One persistent trial_runner child; kill() ends a running trial at once.

    The runner beats on its reply pipe every `beat_seconds`; every line read from it (beat or
    reply) is reported to `on_progress`, the slot's liveness evidence. Progress reports of the
    running trial go to `on_report(message)`; answer them with `decide()`."""

    def __init__(self, slot: int, beat_seconds: float = 0.0, on_progress: Callable[[], None] | None = None,
                 on_report: Callable[[dict], None] | None = None, on_checkpoint: Callable[[dict], None] | None = None,
                 oom_ledger: OomLedger | None = None):
        self.slot = slot
        self.beat_seconds = beat_seconds
        self.on_progress = on_progress or (lambda: None)
        self.on_report = on_report or (lambda message: self.decide(message, False))
        self.on_checkpoint = on_checkpoint or (lambda message: None)
        self._stdin_lock = threading.Lock()  # the slot thread sends trials, the session thread decisions
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._replies: list[dict] = []
        self._lock = threading.Lock()
        # Why a process was killed (kept until its end of file is read): cancel or wedged.
        self._killed_on_purpose: set[subprocess.Popen[bytes]] = set()
        self._wedged: dict[subprocess.Popen[bytes], str] = {}
        # The container's OOM kill count when the current process started: a runner that dies by
        # SIGKILL is told apart as out of memory or killed from outside (worker_memory).
        self.memory = ContainerMemory()
        self.oom_kills_at_start: int | None = None
        # The kills put down to a runner, shared by the worker's runners (one cgroup, one count).
        self.oom_ledger = oom_ledger if oom_ledger is not None else OomLedger()

    def _started(self) -> subprocess.Popen[bytes]:
        self.ensure_started()
        assert self.proc is not None
        return self.proc

    def ensure_started(self) -> None:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._buffer = b""
                self._replies = []
                self.oom_kills_at_start = self.memory.oom_kills()
                command = [sys.executable, "-m", "morphml.distributed.trial_runner"]
                if self.beat_seconds > 0:
                    command += ["--beat-seconds", f"{self.beat_seconds:g}"]
                self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                             start_new_session=False)

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return None if proc is None else proc.pid

    def send(self, request: dict) -> None:
        """Queues one trial on the runner's stdin; it starts when the runner is free."""
        self._write(self._started(), request)

    def _write(self, proc: subprocess.Popen[bytes], message: dict) -> None:
        stdin = proc.stdin
        assert stdin is not None
        try:
            with self._stdin_lock:
                stdin.write((json.dumps(message) + "\n").encode())
                stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the runner died (or its stdin was closed): receive() reports it

    def decide(self, report: dict, stop: bool) -> None:
        """Answers one progress report (`report` as on_report got it) on the runner's stdin."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return  # the runner is gone: nobody waits for the answer
        self._write(proc, {"decision": {"task_id": report.get("task_id"), "attempt": report.get("attempt"),
                                        "step": report.get("step"), "stop": bool(stop)}})

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

    def receive(self, deadline: float | None, wake_fd: int | None = None) -> tuple[str, Any]:
        """Waits for the next reply. Returns ("reply", dict), ("timeout", None) at the deadline,
        ("exited", exit code or None when killed by kill()), ("wedged", reason) when killed by
        kill_wedged(), or ("wake", None) when wake_fd became readable first. Beat lines are
        consumed on the way."""
        # The process the trials were sent to, even if it has died: its end of file reports that.
        proc = self.proc
        assert proc is not None and proc.stdout is not None, "receive() before send()"
        fd = proc.stdout.fileno()
        watch = [fd] if wake_fd is None else [fd, wake_fd]
        while not self._replies:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(watch, [], [], wait)
            if not ready:
                return "timeout", None
            if fd not in ready:
                return "wake", None
            if not self._read(fd):
                return self._exit_status(proc)
        return "reply", self._replies.pop(0)

    def poll(self) -> tuple[str, Any] | None:
        """Consumes what the runner wrote without waiting (an idle slot's beats). Returns None,
        or the ("exited" | "wedged", ...) of receive() when the runner is gone."""
        proc = self.proc
        if proc is None or proc.stdout is None:
            return None
        fd = proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            if not self._read(fd):
                return self._exit_status(proc)
        return None

    def _read(self, fd: int) -> bool:
        """One read from the reply pipe: beats reported, replies queued. False at end of file."""
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            message = json.loads(line)
            if "progress" in message:
                self.on_report(message["progress"])
            elif "checkpoint" in message:
                self.on_checkpoint(message["checkpoint"])
            elif "beat" not in message:
                self._replies.append(message)
        self.on_progress()
        return True

    def _exit_status(self, proc: subprocess.Popen[bytes]) -> tuple[str, Any]:
        code = proc.wait()
        with self._lock:
            reason = self._wedged.pop(proc, None)
            on_purpose = proc in self._killed_on_purpose
            self._killed_on_purpose.discard(proc)
        if reason is not None:
            return "wedged", reason
        return "exited", (None if on_purpose else code)

    def kill(self, on_purpose: bool = False) -> None:
        with self._lock:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                if on_purpose:
                    self._killed_on_purpose.add(proc)
                proc.kill()
                proc.wait()

    def kill_wedged(self, reason: str) -> None:
        """SIGKILLs a runner that stopped making progress, without waiting for it (a process
        stuck in the kernel may never die; the slot thread reaps it when its pipe closes, and
        receive() then answers ("wedged", reason))."""
        with self._lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return
            self._wedged[proc] = reason
        try:
            proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()


class WorkerNode:
    """A worker process. `WorkerNode({'master_host', 'master_port', 'port', 'num_gpus'}).start()`
    (the seed's keys) or `WorkerNode(WorkerConfig(...))`; start() blocks until the experiment is
    over, the worker drained, or the master stayed away past give_up_after_seconds."""

    def __init__(self, config: dict | WorkerConfig, clock: Clock | None = None):
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
        self._clock = clock or SystemClock()
        # Bounds for the default heartbeat interval until the master tells the real one.
        self._bounds = liveness_bounds(10.0, config.stuck_after_seconds, config.replace_after_seconds)
        self._liveness = LivenessMonitor(self._clock, self._bounds.check_period)
        self._liveness.add_part(SESSION, self._bounds.stuck_after, active=False)
        for slot in range(config.slots):
            self._liveness.add_part(runner_part(slot), self._bounds.stuck_after, self._bounds.replace_after)
        oom_ledger = OomLedger()  # the slots' runners share the container's cgroup and its OOM count
        self._runners = [RunnerProcess(i, self._bounds.beat_period, self._progress_callback(runner_part(i)),
                                       functools.partial(self._on_report, i), self._on_checkpoint, oom_ledger)
                         for i in range(config.slots)]
        # Checkpoint files on their way up or down (removed at exit); the uploader's FIFO holds
        # ("upload", message) and ("result", item, reply) so a result follows its trial's uploads.
        remove_orphaned_checkpoint_dirs()
        self._checkpoint_dir = tempfile.mkdtemp(prefix=f"{CHECKPOINT_DIR_PREFIX}{os.getpid()}-")
        self._uploads: queue.Queue = queue.Queue()
        self._pending_uploads: dict[tuple[str, int], int] = {}  # lease -> uploads (and its result) queued
        self._uploads_supported = True  # False after the master answered UNIMPLEMENTED
        # Progress reports sent on the live session and not answered yet: (task, attempt, step) -> slot.
        self._unanswered: dict[tuple[str, int, int], int] = {}
        self._lease_keys: dict[tuple[str, int], str] = {}  # running lease -> its lease_key
        self._master_answers_progress = False  # RegisterReply.answers_progress of the current master
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
        self._stream: Any = None  # the live Connect call (cancelled on drain)
        self._health_server: grpc.Server | None = None
        self._heartbeat_interval = 10.0
        self._health: health.HealthServicer | None = None
        self._serving = True

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
        threading.Thread(target=self._upload_loop, name="uploader", daemon=True).start()
        threading.Thread(target=self._liveness_loop, name="liveness", daemon=True).start()
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
                self._wait_for_a_live_runner()
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

    def _wait_for_a_live_runner(self) -> None:
        """With every runner stuck this worker can run nothing: registering again (after the master
        or the operator declared it lost) would only take trials off the queue to wait behind the
        stuck runners. Wait until one of them recovers or is replaced."""
        waiting = False
        while not self._done.is_set() and all(self._liveness.stuck(runner_part(s)) for s in range(self.config.slots)):
            if not waiting:
                log.warning("every trial runner is stuck: not registering until one makes progress")
                waiting = True
            self._done.wait(self._liveness.check_period)
        if waiting:
            log.info("a trial runner makes progress again: registering")

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
        self._master_answers_progress = reply.answers_progress
        self._heartbeat_interval = reply.heartbeat_interval_seconds or 10.0
        self._set_liveness_bounds(self._heartbeat_interval)
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

        def outgoing() -> Iterator[pb.WorkerMessage]:
            yield pb.WorkerMessage(hello=pb.Hello(worker_id=self._worker_id))
            if self._draining.is_set():
                yield pb.WorkerMessage(drain=pb.DrainNotice(reason="draining"))
            sequence = 0
            next_beat = time.monotonic() + interval
            while True:
                # Resumed: gRPC took the last message and asked for the next one. A loop that
                # stops coming here (blocked on a lock, or gRPC no longer pulling) stops beating.
                self._liveness.progress(SESSION)
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

        self._liveness.activate(SESSION)
        stream = self._stub.Connect(outgoing(), metadata=self._metadata)
        self._stream = stream
        try:
            for msg in stream:
                if msg.acks:
                    self._acknowledged(msg.acks)
                if msg.decisions:
                    self._decided(msg.decisions)
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
            self._liveness.deactivate(SESSION)  # no session, nothing to beat for
            with self._lock:
                self._send = None
                # Sent on this stream but never acknowledged: the master may or may not have
                # journaled them; ReportResult delivers them again (a repeat is "duplicate").
                self._undelivered.extend(self._unacked.values())
                self._unacked.clear()
                unanswered, self._unanswered = self._unanswered, {}
            for (task_id, attempt, step), slot in unanswered.items():  # nobody will answer these now
                self._runners[slot].decide({"task_id": task_id, "attempt": attempt, "step": step}, False)
            send.put(stop)
            stream.cancel()

    def _on_report(self, slot: int, report: dict) -> None:
        """A runner's progress line: to the master on the live session, else "continue" at once."""
        try:
            key = (str(report["task_id"]), int(report["attempt"]), int(report["step"]))
            metrics_json = json.dumps(report.get("metrics") or {})
        except (KeyError, TypeError, ValueError):
            self._runners[slot].decide(report, False)
            return
        with self._lock:
            send = self._send
            lease_key = self._lease_keys.get(key[:2])
            if send is not None and lease_key is not None and self._master_answers_progress:
                self._unanswered[key] = slot
                send.put(pb.WorkerMessage(progress=pb.ProgressBatch(reports=[pb.Progress(
                    lease=pb.LeaseRef(task_id=key[0], attempt=key[1]), step=key[2], metrics_json=metrics_json,
                    lease_key=lease_key)])))
                return
        self._runners[slot].decide(report, False)

    def _decided(self, decisions: Iterable[pb.ProgressDecision]) -> None:
        for d in decisions:
            key = (d.lease.task_id, d.lease.attempt, d.step)
            with self._lock:
                slot = self._unanswered.pop(key, None)
            if slot is None:
                continue
            if d.stop:
                log.info("trial %s/%d stopped by the master's scheduler at step %d", *key)
            self._runners[slot].decide({"task_id": key[0], "attempt": key[1], "step": key[2]}, d.stop)

    def _acknowledged(self, acks: Iterable[pb.ResultAck]) -> None:
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
                    self._lease_keys[item["ref"]] = lease.lease_key
                runner.send(item["request"])
                if not inflight:
                    head_started = time.monotonic()
                inflight.append(item)
            if not inflight:
                if runner.poll() is not None:  # died or was replaced while idle: start the next one now
                    runner.ensure_started()
                    runner.warm_up(60)
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
            if status == "wedged":
                # The liveness check killed the runner (no progress past replace_after): the
                # running trial failed, as when a runner crashes under a live worker; the master
                # decides (a retry on another worker, or failed for good). The trial queued behind
                # it never started and goes to the replacement, whose first beat ends the episode.
                head = inflight.pop(0)
                reply = {"ok": False, "kind": "timeout", "duration": now - head_started, "message": reply}
                head_started = now
                runner.ensure_started()
                inflight = self._resend_to_new_runner(runner, inflight)
                self._finish_trial(head, reply)
                continue
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
                    # SIGKILL: the OOM killer, or someone from outside (the container's cgroup
                    # tells which); the message is what the master journals for the attempt.
                    kind, message = describe_runner_kill(reply, runner.oom_kills_at_start, runner.memory,
                                                         ledger=runner.oom_ledger)
                    log.warning("trial %s/%d failed (%s): %s", head["ref"][0], head["ref"][1], kind, message)
                    reply = {"ok": False, "kind": kind, "duration": now - head_started, "message": message}
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

    def _prepare(self, lease: pb.Lease, slot: int) -> dict:
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
        item = {"lease": lease, "ref": ref, "request": request, "timeout": float(timeout) if timeout else None}
        segment = self._segment(lease)
        if segment is not None:
            request["segment"] = segment
            item["resume_path"] = segment.get("resume")
        return item

    def _segment(self, lease: pb.Lease) -> dict | None:
        """The runner's "segment" for a lease (None for a plain lease: all epochs, no checkpoints);
        downloads the checkpoint a resumed lease starts from."""
        if not (lease.start_epoch or lease.stop_epoch or lease.save_epochs):
            return None
        segment: dict[str, Any] = {"start_epoch": lease.start_epoch, "stop_epoch": lease.stop_epoch,
                                   "save_epochs": list(lease.save_epochs) if self._uploads_supported else [],
                                   "checkpoint_dir": self._checkpoint_dir}
        if lease.HasField("checkpoint"):
            segment["arch_hash"] = lease.checkpoint.arch_hash
        if lease.start_epoch > 0:
            ckpt = lease.checkpoint
            if not lease.HasField("checkpoint") or not ckpt.key:
                segment["fallback"] = f"lease resumes at epoch {lease.start_epoch} but names no checkpoint"
                return segment
            path = os.path.join(self._checkpoint_dir, f"resume-{lease.task_id}-{lease.attempt}.pt")
            try:
                self._download(ckpt.key, path, lease)
            except (grpc.RpcError, OSError) as exc:
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                segment["fallback"] = f"checkpoint {ckpt.key}: download failed ({detail})"
                return segment
            segment.update(resume=path, resume_key=ckpt.key, resume_sha256=ckpt.sha256, resume_size=ckpt.size)
        return segment

    def _download(self, key: str, path: str, lease: pb.Lease) -> None:
        """DownloadArtifact of `key` for `lease` into `path` (the runner checks size and sha256)."""
        request = pb.ArtifactRequest(key=key, lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt),
                                     lease_key=lease.lease_key)
        with open(path, "wb") as out:
            for chunk in self._stub.DownloadArtifact(request, metadata=self._metadata, timeout=300):
                out.write(chunk.data)

    # --- checkpoint uploads --------------------------------------------------------------------
    def _on_checkpoint(self, message: dict) -> None:
        """A runner wrote a checkpoint file: queue its upload (the slot thread reads on at once)."""
        try:
            ref = (str(message["task_id"]), int(message["attempt"]))
        except (KeyError, TypeError, ValueError):
            return
        with self._lock:
            lease_key = self._lease_keys.get(ref)
            if lease_key is None or not self._uploads_supported:
                self._remove(message.get("path"))
                return
            self._pending_uploads[ref] = self._pending_uploads.get(ref, 0) + 1
        self._uploads.put(("upload", ref, dict(message, lease_key=lease_key)))

    @staticmethod
    def _remove(path: Any) -> None:
        if isinstance(path, str) and path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _upload_loop(self) -> None:
        while True:
            entry = self._uploads.get()
            if entry is None:
                return
            kind, ref = entry[0], entry[1]
            try:
                if kind == "upload":
                    self._upload(ref, entry[2])
                else:
                    self._send_result(entry[2], entry[3])
            except Exception:  # one bad upload must not stop the others (or the results behind them)
                log.exception("checkpoint upload of %s/%d failed", *ref)
            finally:
                with self._lock:
                    left = self._pending_uploads.get(ref, 0) - 1
                    if left > 0:
                        self._pending_uploads[ref] = left
                    else:
                        self._pending_uploads.pop(ref, None)

    def _upload(self, ref: tuple[str, int], message: dict) -> None:
        path = str(message.get("path") or "")
        try:
            for attempt in range(3):
                if self._done.is_set() or not self._uploads_supported:
                    return
                try:
                    ack = self._stub.UploadCheckpoint(self._upload_chunks(ref, message, path),
                                                      metadata=self._metadata, timeout=300)
                    log.info("checkpoint %s/%d epoch %s uploaded (%s bytes) as %s%s", ref[0], ref[1],
                             message.get("epoch"), message.get("size"), ack.key,
                             "" if ack.recorded else " (not recorded: the lease is no longer live)")
                    return
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        log.warning("the master does not take checkpoints (an older release): training on without")
                        self._uploads_supported = False
                        return
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and attempt < 2:
                        self._done.wait(1.0)
                        continue
                    log.warning("checkpoint %s/%d epoch %s not stored: %s: %s", ref[0], ref[1],
                                message.get("epoch"), exc.code().name, exc.details())
                    return
        finally:
            self._remove(path)

    @staticmethod
    def _upload_chunks(ref: tuple[str, int], message: dict, path: str,
                       chunk: int = 1 << 20) -> Iterator[pb.ArtifactChunk]:
        header = pb.CheckpointHeader(lease=pb.LeaseRef(task_id=ref[0], attempt=ref[1]),
                                     lease_key=str(message["lease_key"]), epoch=int(message["epoch"]),
                                     sha256=str(message["sha256"]), size=int(message["size"]))
        yield pb.ArtifactChunk(checkpoint=header)
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                yield pb.ArtifactChunk(data=block)

    def _evaluation(self, text: str) -> dict:
        """spec.evaluation of a lease, parsed (the same text for every lease of an experiment)."""
        cached = self._evaluation_cache  # one read: slots call this from their own threads
        if cached[0] != text:
            cached = self._evaluation_cache = (text, json.loads(text or "{}"))
        return dict(cached[1])

    def _finish_trial(self, item: dict, reply: dict | None) -> None:
        ref = item["ref"]
        self._remove(item.get("resume_path"))
        with self._lock:
            self._running.pop(ref, None)
            self._lease_keys.pop(ref, None)
            cancelled = ref in self._cancelled
            self._cancelled.discard(ref)
            uploading = ref in self._pending_uploads
            if uploading and reply is not None and not cancelled:
                # Behind this trial's checkpoint uploads in the uploader's FIFO: the master
                # journals the final checkpoint before it counts the result.
                self._pending_uploads[ref] += 1
                self._uploads.put(("result", ref, item, reply))
                return
        if reply is None or cancelled:
            return
        self._send_result(item, reply)

    def _send_result(self, item: dict, reply: dict) -> None:
        lease, ref = item["lease"], item["ref"]
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

    # --- liveness ------------------------------------------------------------------------------
    def _progress_callback(self, part: str) -> Callable[[], None]:
        return lambda: self._liveness.progress(part)

    def _set_liveness_bounds(self, heartbeat_interval: float) -> None:
        bounds = liveness_bounds(heartbeat_interval, self.config.stuck_after_seconds,
                                 self.config.replace_after_seconds)
        self._bounds = bounds
        self._liveness.set_bounds(SESSION, bounds.stuck_after)
        for slot in range(self.config.slots):
            self._liveness.set_bounds(runner_part(slot), bounds.stuck_after, bounds.replace_after)

    def _liveness_loop(self) -> None:
        """Every check period: read each runner's CPU time (busy counts as progress), judge every
        part, set the health status, and replace a runner stuck past its bound."""
        while not self._done.wait(self._liveness.check_period):
            for slot, runner in enumerate(self._runners):
                pid = runner.pid
                if pid is not None:
                    self._liveness.observe_cpu(runner_part(slot), pid, process_cpu_seconds(pid))
            self._apply_verdict(self._liveness.check())

    def _apply_verdict(self, verdict: Verdict) -> None:
        if verdict.forgiven:
            log.info("liveness: no check for %.1f s (this worker was stopped or starved); not blamed on its parts",
                     verdict.forgiven)
        for part in verdict.newly_stuck:
            log.error("%s made no progress for %.1f s (bound %g s)%s: health NOT_SERVING", part,
                      verdict.stuck[part], self._bounds.stuck_after, self._describe(part))
        for part in verdict.recovered:
            log.warning("%s makes progress again", part)
        self._set_serving(verdict.serving)
        for part in verdict.replace:
            slot = int(part.rsplit("-", 1)[1])
            self._replace_runner(slot, verdict.stuck[part])

    def _describe(self, part: str) -> str:
        if part == SESSION:
            return " (the session loop that sends heartbeats)"
        runner = self._runners[int(part.rsplit("-", 1)[1])]
        pid = runner.pid
        return "" if pid is None else f" (trial runner pid {pid}, state {process_state(pid)})"

    def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        if self._health is not None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            self._health.set("", status)
            self._health.set("morphml.Worker", status)
        if serving:
            log.warning("every part makes progress: health SERVING")

    def _replace_runner(self, slot: int, silent: float) -> None:
        """A runner stuck past replace_after is SIGKILLed; its slot thread reports the running
        trial as failed and starts the next runner. (Not given back as an infrastructure loss:
        a trial that wedges every runner it meets would then be re-leased for ever without
        using its retries; and the protocol's only hand-back, Deregister, requeues the other
        slots' trials too.)"""
        runner = self._runners[slot]
        pid = runner.pid
        reason = (f"trial runner {slot} (pid {pid}, state {process_state(pid) if pid else '?'}) made no progress "
                  f"for {silent:.1f} s (liveness bound {self._bounds.replace_after:g} s); its process was killed")
        log.error("%s", reason)
        runner.kill_wedged(reason)

    # --- draining and exit ---------------------------------------------------------------------
    def _finish_drain(self, reason: str) -> None:
        deadline = time.monotonic() + self.config.grace_seconds
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._running) or bool(self._unacked) or bool(self._pending_uploads)
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
        self._uploads.put(None)
        shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
        if self._health_server is not None:
            self._health_server.stop(0)
        self._channel.close()

    def _start_health(self) -> None:
        if not self.config.health_port:
            return
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = LivenessHealthServicer(self._liveness, lambda: self._bounds.stuck_after)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        host = self.config.health_host or default_bind_host()
        if not server.add_insecure_port(f"{host}:{self.config.health_port}"):
            raise OSError(f"--health-port {self.config.health_port}: cannot listen")
        server.start()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("morphml.Worker", health_pb2.HealthCheckResponse.SERVING)
        self._health = servicer
        self._health_server = server


class LivenessHealthServicer(health.HealthServicer):
    """grpc.health.v1 whose SERVING also requires the liveness checker itself to be checking:
    a checker thread that died or hung would otherwise leave its last SERVING behind."""

    def __init__(self, liveness: LivenessMonitor, bound: Callable[[], float]):
        super().__init__()
        self._liveness_monitor = liveness
        self._bound = bound

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext  # noqa: N802 (the RPC)
              ) -> health_pb2.HealthCheckResponse:
        reply = super().Check(request, context)
        age = self._liveness_monitor.check_age()
        if reply.status == health_pb2.HealthCheckResponse.SERVING and age is not None and age > self._bound():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return reply


def _version() -> str:
    from morphml import __version__

    return __version__
