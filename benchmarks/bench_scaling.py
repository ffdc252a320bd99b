"""Benchmark (b): scaling efficiency for fixed 0.5 s trials at 1, 2, 4, ..., 64 workers.

Each point: a `morphml master` (random search, SQLite journal, synchronous=FULL) and N
`morphml worker` processes, 1 slot each, running tests.evaluators:sleepy (0.5 s, no torch);
`trials-per-worker` x N trials. The master hands out nothing until all N are connected
(--min-workers), and the clock runs from that moment (journal event Running) to the last
result (Succeeded). Efficiency = sum of the trials' evaluator seconds / (N x wall): 100 % means
every worker slot was running a trial the whole time.

Run: python benchmarks/bench_scaling.py [--workers 1 2 4 8 16 32 64] [--trials-per-worker 6] [--repeats 3]
     [--prefetch auto|K]  (leases queued per worker beyond its slot; default auto, as the CLI)
"""

from __future__ import annotations

import argparse
import sys

from harness import Cluster, median, table


def one(workers: int, trials: int, sleep: float, prefetch: str) -> tuple[float, float]:
    with Cluster("tests.evaluators:sleepy", trials, workers, env={"MORPHML_TEST_SLEEP": str(sleep)},
                 master_args=["--prefetch", str(prefetch)]) as cluster:
        st = cluster.wait_done(900)
        assert st.phase == "Succeeded" and st.succeeded == trials, st
        start, end = cluster.phase_times()
        busy = sum(t.duration_seconds for t in cluster.tasks("succeeded"))
    wall = end - start
    return wall, busy / (workers * wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--trials-per-worker", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefetch", default="auto", help="morphml master --prefetch (default auto)")
    args = parser.parse_args()
    rows = []
    for n in args.workers:
        trials = n * args.trials_per_worker
        walls, effs = [], []
        for _ in range(args.repeats):
            wall, eff = one(n, trials, args.sleep, args.prefetch)
            walls.append(wall)
            effs.append(eff)
            print(f"  workers={n}: wall {wall:.3f} s, efficiency {eff * 100:.1f} %", flush=True)
        ideal = args.trials_per_worker * args.sleep
        rows.append([n, trials, ideal, median(walls), f"{median(effs) * 100:.1f} %",
                     f"{min(effs) * 100:.1f} %"])
    print(f"prefetch {args.prefetch}")
    print(table(["workers", "trials", "ideal wall s", "median wall s", "median efficiency", "worst efficiency"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
