"""A/B: steady no-op throughput of two checkouts of MorphML, alternated in one sitting.

On a shared machine a single timing moves by 20-30 % with the neighbours' load, more than most
changes are worth; alternating the two versions run by run and comparing medians (and how many
pairs each side won) separates a real change from the noise. Each run starts a master and N
workers from that checkout (its own `runtime/` first on PYTHONPATH) with the no-op evaluator
and reads trials/s from its journal (Running to Succeeded).

Run: python benchmarks/ab_compare.py BASELINE_CHECKOUT CANDIDATE_CHECKOUT [--workers 8] [--trials 400] [--repeats 7]
  e.g. git worktree add /tmp/base HEAD~1 && python benchmarks/ab_compare.py /tmp/base .
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = r'''
import sys
sys.path[:0] = [{tree!r} + "/benchmarks", {tree!r}]
from harness import Cluster
with Cluster("tests.evaluators:noop", {trials}, {workers}) as cluster:
    st = cluster.wait_done(600)
    assert st.phase == "Succeeded" and st.succeeded == {trials}, st
    start, end = cluster.phase_times()
print({trials} / (end - start))
'''


def one_run(tree: Path, workers: int, trials: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "runtime"), str(tree)]))
    code = ONE_RUN.format(tree=str(tree), trials=trials, workers=workers)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    trees = [args.baseline.resolve(), args.candidate.resolve()]
    for tree in trees:
        if not (tree / "runtime" / "morphml").is_dir():
            raise SystemExit(f"{tree}: not a MorphML checkout (no runtime/morphml)")
    rates: dict[Path, list[float]] = {tree: [] for tree in trees}
    for i in range(args.repeats):
        for tree in trees:
            rates[tree].append(one_run(tree, args.workers, args.trials))
        print(f"  pair {i + 1}: baseline {rates[trees[0]][-1]:.0f}, candidate {rates[trees[1]][-1]:.0f} trials/s",
              flush=True)
    won = sum(c > b for b, c in zip(rates[trees[0]], rates[trees[1]], strict=True))
    base, cand = statistics.median(rates[trees[0]]), statistics.median(rates[trees[1]])
    print(f"baseline  {trees[0]}: median {base:.0f} trials/s")
    print(f"candidate {trees[1]}: median {cand:.0f} trials/s ({(cand / base - 1) * 100:+.1f} %), "
          f"faster in {won} of {args.repeats} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
