"""Benchmark (c): failure-detection latency for a killed worker and for a hung worker.

Each repeat: a `morphml master` with heartbeats every `--interval` s x `--missed` and three
`morphml worker` processes; budget 2 trials of 30 s, so one worker stays idle and a lost
worker's trial can be re-leased at once. Then either
- kill: SIGKILL the process group of a worker running a trial (the process dies, the kernel
  closes its connection, the master sees the session stream break), or
- hang: SIGSTOP the worker process (the connection stays open; only the missing heartbeats
  tell), and measure from the signal to the master declaring the worker dead (`detected_at` in
  GetStatus.losses) and to the trial's re-lease (journal event `leased`, attempt 2).

Run: python benchmarks/bench_failure_detection.py [--repeats 5] [--interval 1] [--missed 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from harness import Cluster, median, status, table, wait_for


def running_worker(port: int):
    st = status(port)
    for w in st.workers if st else []:
        if w.state != "dead" and w.running:
            return w.worker_name, w.running[0].task_id
    return None


def one(mode: str, interval: float, missed: int) -> tuple[float, float]:
    args = ["--heartbeat-interval", str(interval), "--missed-heartbeats", str(missed)]
    with Cluster("tests.evaluators:sleepy", 2, 3, env={"MORPHML_TEST_SLEEP": "30"}, master_args=args) as cluster:
        name, task_id = wait_for(lambda: running_worker(cluster.port), 60, "a running trial")
        time.sleep(0.3)
        proc = cluster.workers[int(name[1:])]
        t0 = time.time()
        if mode == "kill":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGSTOP)
        loss = wait_for(lambda: next((loss for loss in (status(cluster.port) or status(cluster.port)).losses
                                      if loss.worker_name == name), None), 60, "the loss")
        relet = wait_for(lambda: [e["ts"] for e in cluster.events("leased")
                                  if e["task_id"] == task_id and e["attempt"] == 2], 30, "the re-lease")
        return loss.detected_at - t0, relet[0] - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--missed", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for mode in ("kill", "hang"):
        detect, relet = [], []
        for _ in range(args.repeats):
            d, r = one(mode, args.interval, args.missed)
            detect.append(d)
            relet.append(r)
            print(f"  {mode}: detected {d * 1000:.0f} ms, re-leased {r * 1000:.0f} ms", flush=True)
        how = "session stream broke" if mode == "kill" else f"no heartbeat for {args.interval:g} s x {args.missed}"
        rows.append([mode, how, median(detect) * 1000, max(detect) * 1000, median(relet) * 1000, max(relet) * 1000])
    print(table(["fault", "detected by", "median detect ms", "max detect ms", "median re-lease ms", "max re-lease ms"],
                rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
