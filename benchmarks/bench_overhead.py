"""Benchmark (a): per-trial coordination overhead with no-op trials, MorphML vs Dask distributed.

Same machine, same run, same process count, same no-op function (tests.evaluators:noop):
- MorphML: a `morphml master` process (random search, SQLite journal with synchronous=FULL)
  and N `morphml worker` processes, 1 slot each; timed from the journal's Running event (all N
  workers connected) to its Succeeded event.
- Dask: `distributed.LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`; timed
  from the first submit to the last gathered result (workers already up).
Per-trial overhead = N x wall / trials (slot-seconds each trial costs beyond its ~0 s of work).

Run: python benchmarks/bench_overhead.py [--workers 8 32] [--trials-per-worker 25] [--repeats 3] [--prefetch auto|K]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.evaluators for Dask's workers

from harness import Cluster, median, table


def morphml_run(workers: int, trials: int, prefetch: str) -> float:
    with Cluster("tests.evaluators:noop", trials, workers, master_args=["--prefetch", str(prefetch)]) as cluster:
        st = cluster.wait_done(600)
        assert st.phase == "Succeeded" and st.succeeded == trials, st
        start, end = cluster.phase_times()
    return end - start


def dask_run(workers: int, trials: int) -> float:
    from distributed import Client, LocalCluster

    from tests.evaluators import noop

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(lambda: __import__("tests.evaluators"))  # same import on every worker, outside the timing
        archs = [{"i": i} for i in range(trials)]
        started = time.perf_counter()
        futures = client.map(noop, archs, [{}] * trials, [None] * trials, pure=False)
        results = client.gather(futures)
        wall = time.perf_counter() - started
    assert len(results) == trials
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--trials-per-worker", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefetch", default="auto", help="morphml master --prefetch (default auto)")
    args = parser.parse_args()
    rows = []
    for n in args.workers:
        trials = n * args.trials_per_worker
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(morphml_run(n, trials, args.prefetch))
            theirs.append(dask_run(n, trials))
            print(f"  workers={n} trials={trials}: morphml {ours[-1]:.3f} s, dask {theirs[-1]:.3f} s", flush=True)
        o, d = median(ours), median(theirs)
        rows.append([n, trials, o, trials / o, n * o / trials * 1000, d, trials / d, n * d / trials * 1000,
                     (n * o / trials) / (n * d / trials)])
    print(f"prefetch {args.prefetch}")
    print(table(["workers", "trials", "morphml wall s", "morphml trials/s", "morphml overhead ms/trial",
                 "dask wall s", "dask trials/s", "dask overhead ms/trial", "ratio morphml/dask"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
