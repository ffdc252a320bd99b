"""The child process that runs trials for one worker slot.

The worker starts one runner per slot (`python -m morphml.distributed.trial_runner`) and
keeps it for many trials; a trial that hangs or crashes is ended by killing the runner, which
the worker then replaces. The worker process itself stays free to heartbeat.

Protocol: one JSON object per line. Request on stdin:
  {"task_id", "attempt", "arch": {...canonical graph...}, "evaluation": {...spec.evaluation...},
   "device": "cpu" | "cuda:0" | null, "seed": int, "segment": {...} (optional, see Checkpoints)}
Reply on the original stdout (the user's prints go to stderr so they cannot corrupt it):
  {"ok": true, "metrics": {...}, "duration": s} or
  {"ok": false, "kind": "exception|nan|timeout|oom|invalid", "message": "...", "duration": s}
Started with `--beat-seconds S`, the runner also writes {"beat": n} on the same channel every S
seconds, from a thread of its own, idle or training: the worker's liveness check (see
morphml.distributed.liveness) tells a busy runner, which keeps beating, from a wedged one
(SIGSTOPped, stuck in the kernel), which falls silent. Readers skip beat lines.

Progress: while a trial runs, each epoch of the built-in trainer (and each report() of a custom
evaluator) writes {"progress": {"task_id", "attempt", "step", "metrics"}} and waits for the
worker's answer on stdin, {"decision": {"task_id", "attempt", "step", "stop": bool}} (the
master's, or "continue" from the worker itself when no master is there); after DECISION_WAIT
seconds without one the trial goes on. A reader thread takes stdin apart: decisions go to the
running trial, requests queue for the main loop.

Checkpoints: a request may carry "segment" (see morphml.evaluation.segments: start_epoch,
stop_epoch, save_epochs, checkpoint_dir, resume (a local file the worker downloaded), its sha256,
size and key, or fallback). After each save epoch the trainer writes the checkpoint file into
checkpoint_dir and the runner writes {"checkpoint": {"task_id", "attempt", "epoch", "path",
"sha256", "size"}} and trains on without waiting: the worker process, which owns the gRPC channel,
uploads the file (this process never talks to the master) and sends the trial's result only once
its uploads are done.

Evaluation goes through morphml.evaluation.evaluate_architecture: a `module:function` evaluator
runs without torch; the built-in trainer imports torch on first use.

Signals: SIGTERM/SIGINT are ignored (the worker decides when a trial ends) and the runner dies
with its worker (PR_SET_PDEATHSIG on Linux).

Imports: argparse, json, signal, threading; morphml.evaluation lazily. No pickle.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

MAX_MESSAGE = 4000
DECISION_WAIT = 30.0  # seconds a progress report waits for its decision before training goes on
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _jsonable(value: Any) -> float | str:
    # numpy / torch scalars and the like
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class Decisions:
    """Decisions the worker sent for progress reports, by (task id, attempt, step)."""

    def __init__(self) -> None:
        self._got: dict[tuple[str, int, int], bool] = {}
        self._cond = threading.Condition()

    def put(self, decision: dict) -> None:
        key = (str(decision.get("task_id")), int(decision.get("attempt", 0)), int(decision.get("step", 0)))
        with self._cond:
            self._got[key] = bool(decision.get("stop"))
            self._cond.notify_all()

    def wait(self, key: tuple[str, int, int], timeout: float) -> bool:
        """The decision for `key` (True: stop), or False (continue) when none came in time."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._got, timeout)
            return self._got.pop(key, False)


def run_one(request: dict, write: Callable[[dict], None] | None = None, decisions: Decisions | None = None,
            decision_wait: float = DECISION_WAIT) -> dict:
    """Runs one trial through morphml.evaluation (which imports torch only for the built-in
    trainer; a `module:function` evaluator runs without it) and returns the reply object. With
    `write` and `decisions`, progress goes out as progress lines and each waits for its decision."""
    from morphml.evaluation import TrialFailure, evaluate_architecture
    from morphml.evaluation.segments import Segment

    started = time.monotonic()
    stopped = False
    progress = None
    task_id, attempt = str(request.get("task_id")), int(request.get("attempt", 0))
    on_checkpoint = None
    if write is not None:
        def on_checkpoint(epoch: int, path: str, sha256: str, size: int) -> None:
            write({"checkpoint": {"task_id": task_id, "attempt": attempt, "epoch": epoch, "path": path,
                                  "sha256": sha256, "size": size}})
    if write is not None and decisions is not None:

        def progress(step: int, metrics: dict) -> bool:
            nonlocal stopped
            write({"progress": {"task_id": task_id, "attempt": attempt, "step": step, "metrics": metrics}})
            stop = decisions.wait((task_id, attempt, step), decision_wait)
            stopped = stopped or stop
            return stop
    try:
        segment = Segment.from_request(request.get("segment"), task_id, attempt, on_checkpoint)
        metrics = evaluate_architecture(request["arch"], request.get("evaluation") or {},
                                        device=request.get("device"), seed=int(request.get("seed", 0)),
                                        progress=progress, segment=segment)
        reply = {"ok": True, "metrics": metrics, "duration": time.monotonic() - started}
        if stopped:
            reply["stopped"] = True
        return reply
    except TrialFailure as exc:
        return {"ok": False, "kind": exc.kind, "duration": time.monotonic() - started,
                "message": exc.message[:MAX_MESSAGE]}
    except Exception as exc:  # a bug outside the trial's own code; the runner lives on
        message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        return {"ok": False, "kind": "exception", "duration": time.monotonic() - started,
                "message": message[:MAX_MESSAGE]}


def _die_with_parent() -> None:
    """Signals are the worker's business: it ends a trial by SIGKILL and the runner by closing
    stdin. A SIGTERM to the whole process group (a pod being deleted) must not kill the trial
    before the worker decides to hand it back or finish it, hence ignore SIGTERM/SIGINT. If
    the worker itself is SIGKILLed, the runner must not train on as an orphan: ask Linux to
    SIGKILL it when its parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _beat(write: Callable[[dict], None], period: float) -> None:
    """Beats until the channel closes. Needs only the GIL now and then, which a training loop
    releases (torch ops, sleeps, I/O); a process that is stopped beats no more."""
    n = 0
    while True:
        time.sleep(period)
        n += 1
        try:
            write({"beat": n})
        except (OSError, ValueError):  # the worker is gone (its end of the pipe closed)
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m morphml.distributed.trial_runner")
    parser.add_argument("--beat-seconds", type=float, default=0.0,
                        help="write a beat line every this many seconds (default 0: never)")
    args = parser.parse_args(argv)
    if args.beat_seconds < 0:
        parser.error(f"--beat-seconds {args.beat_seconds}: must be >= 0")
    # Keep the protocol channel private: user code printing to stdout writes to stderr instead.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    replies = os.fdopen(reply_fd, "w", buffering=1)
    write_lock = threading.Lock()  # a beat never lands inside a reply line

    def write(obj: dict) -> None:
        line = json.dumps(obj, default=_jsonable) + "\n"
        with write_lock:
            replies.write(line)
            replies.flush()

    _die_with_parent()
    if args.beat_seconds > 0:
        threading.Thread(target=_beat, args=(write, args.beat_seconds), name="beat", daemon=True).start()
    requests: queue.Queue[dict | None] = queue.Queue()
    decisions = Decisions()

    def read_stdin() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            message = json.loads(line)
            if "decision" in message:
                decisions.put(message["decision"])
            else:
                requests.put(message)
        requests.put(None)

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    while (request := requests.get()) is not None:
        write(run_one(request, write, decisions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
