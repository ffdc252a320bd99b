"""The child process that runs trials for one worker slot.

The worker starts one runner per slot (`python -m morphml.distributed.trial_runner`) and
keeps it for many trials; a trial that hangs or crashes is ended by killing the runner, which
the worker then replaces. The worker process itself stays free to heartbeat.

Protocol: one JSON object per line. Request on stdin:
  {"task_id", "attempt", "arch": {...canonical graph...}, "evaluation": {...spec.evaluation...},
   "device": "cpu" | "cuda:0" | null, "seed": int}
Reply on the original stdout (the user's prints go to stderr so they cannot corrupt it):
  {"ok": true, "metrics": {...}, "duration": s} or
  {"ok": false, "kind": "exception|nan|timeout|oom|invalid", "message": "...", "duration": s}

Evaluator dispatch: `evaluation.evaluator = "module:function"` is imported and called as
fn(arch_json, evaluation_spec, device) without touching torch; otherwise
morphml.evaluation.evaluate_architecture (which imports torch) is imported on first use.

Imports: json, importlib; morphml.evaluation lazily. No pickle.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import traceback

MAX_MESSAGE = 4000


def load_evaluator(ref: str):
    """Imports "module:function"; raises ValueError naming spec.evaluation.evaluator."""
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"spec.evaluation.evaluator={ref!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"spec.evaluation.evaluator={ref!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"spec.evaluation.evaluator={ref!r}: module {module_name!r} has no function {func_name!r}")
    return fn


def _jsonable(value):
    # numpy / torch scalars and the like
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def classify(exc: BaseException) -> str:
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind in ("exception", "nan", "timeout", "oom", "invalid"):
        return kind
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return "oom"
    return "exception"


def run_one(request: dict, evaluators: dict) -> dict:
    started = time.monotonic()
    evaluation = request.get("evaluation") or {}
    try:
        ref = evaluation.get("evaluator")
        if ref:
            fn = evaluators.get(ref) or evaluators.setdefault(ref, load_evaluator(ref))
            metrics = fn(request["arch"], evaluation, request.get("device"))
        else:
            from morphml.evaluation import evaluate_architecture  # imports torch

            metrics = evaluate_architecture(request["arch"], evaluation, device=request.get("device"),
                                            seed=int(request.get("seed", 0)))
        if not isinstance(metrics, dict):
            return {"ok": False, "kind": "invalid", "duration": time.monotonic() - started,
                    "message": f"evaluator returned {type(metrics).__name__}, expected a dict of metrics"}
        if any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
            return {"ok": False, "kind": "nan", "duration": time.monotonic() - started,
                    "message": f"metrics contain NaN: {metrics}"}
        return {"ok": True, "metrics": metrics, "duration": time.monotonic() - started}
    except Exception as exc:  # the trial failed, the runner lives on
        tail = traceback.format_exc(limit=3)
        message = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "kind": classify(exc), "duration": time.monotonic() - started,
                "message": (message + "\n" + tail)[:MAX_MESSAGE]}


def main() -> int:
    # Keep the protocol channel private: user code printing to stdout writes to stderr instead.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    replies = os.fdopen(reply_fd, "w", buffering=1)
    evaluators: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = run_one(json.loads(line), evaluators)
        replies.write(json.dumps(reply, default=_jsonable) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
