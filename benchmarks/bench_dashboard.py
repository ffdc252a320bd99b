"""Dashboard load benchmark (issue 11 acceptance 5): page load and refresh times with 10,000 trials.

Writes a journal of N trials through the Journal API (tests/dashboard_journal.py: 5-epoch curves,
a failure every 17th trial, a lost-and-re-leased attempt every 50th, 8 trials still running),
starts `morphml dashboard` on it as its own process, and measures, each a median over --repeats:

- API, initial load: a new client fetching the summary and every page of trials, curves,
  attempts and losses (since=0; gzip), on a server that has just started (its first read of
  the journal included) and again on a warm one;
- API, idle poll: summary + the rows changed since the client's revision, nothing changed;
- API, after a change: one running trial finishes in the journal (as the master would write
  it); the latency of the poll that brings it (the server re-reads the journal) and the time
  from the change until a client polling every 200 ms has it (the server reads the journal at
  most once per 0.5 s and at most a fifth of the time);
- browser (Debian chromium via Selenium, skipped with --no-browser or when missing): time from
  navigation until the page has drawn every trial, the page's own last render time
  (window.morphml.renderMs), and, after a journal change, time until the page shows it (with
  ?poll=200, so up to 200 ms of that is the poll interval).

Run: python benchmarks/bench_dashboard.py [--trials 10000] [--repeats 5] [--no-browser]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]

from tests.dashboard_journal import finish_running_task, write_journal  # noqa: E402
from tests.loopback import free_port  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RESOURCES = ("trials", "curves", "attempts", "losses")


def get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with NO_PROXY.open(request, timeout=120) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return json.loads(body)


def fetch_changed(base: str, since: int) -> int:
    """Every row changed after `since`, page by page; returns how many."""
    rows = 0
    for resource in RESOURCES:
        offset: int | None = 0
        while offset is not None:
            page = get(f"{base}api/{resource}?since={since}&offset={offset}")
            rows += len(page["items"])
            offset = page["next_offset"]
    return rows


def poll(base: str, since: int) -> tuple[int, int]:
    """(revision, rows) of one poll: the summary, then what changed after `since`."""
    summary = get(base + "api/summary")
    return summary["revision"], fetch_changed(base, since) if summary["revision"] != since else 0


class Dashboard:
    """`morphml dashboard JOURNAL --port P` as its own process."""

    def __init__(self, journal: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "runtime"), str(REPO)]))
        self.proc = subprocess.Popen([sys.executable, "-m", "morphml.cli", "dashboard", str(journal), "--port",
                                      str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                NO_PROXY.open(self.base, timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit("morphml dashboard did not start") from None
                time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def bench_api(journal: Path, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cold": [], "warm": [], "idle": [], "change": [], "seen": []}
    for _ in range(repeats):
        dash = Dashboard(journal)
        try:
            seconds, (revision, rows) = timed(lambda d=dash: poll(d.base, 0))
            out["cold"].append(seconds)
            seconds, _ = timed(lambda d=dash: poll(d.base, 0))
            out["warm"].append(seconds)
            time.sleep(0.6)  # past the server's minimum interval between journal reads
            seconds, (same, _) = timed(lambda d=dash, r=revision: poll(d.base, r))
            out["idle"].append(seconds)
            assert same == revision, "an unchanged journal changed revision"
            finish_running_task(journal)
            changed_at = time.perf_counter()
            while True:  # poll as a page would (every 200 ms) until the change arrives
                seconds, (newer, changed) = timed(lambda d=dash, r=revision: poll(d.base, r))
                if newer > revision:
                    break
                time.sleep(0.2)
            assert changed >= 1, (newer, revision, changed)
            out["change"].append(seconds)
            out["seen"].append(time.perf_counter() - changed_at)
        finally:
            dash.close()
    print(f"  rows in a full load: {rows}")
    return out


def bench_browser(journal: Path, trials: int, repeats: int, tmp: Path) -> dict[str, list[float]] | None:
    from tests.headless import chrome, wait_until

    out: dict[str, list[float]] = {"load": [], "render": [], "change": []}
    dash = Dashboard(journal)
    try:
        with chrome(tmp / "chrome", width=1600, height=1200) as driver:
            for _ in range(repeats):
                driver.get("about:blank")
                started = time.perf_counter()
                driver.get(dash.base + "?poll=200")
                wait_until(lambda: driver.execute_script("return Number(document.body.dataset.trials || 0)")
                           >= trials, 300, "every trial drawn", 0.05)
                out["load"].append(time.perf_counter() - started)
                out["render"].append(driver.execute_script("return window.morphml.renderMs") / 1000)
                revision = driver.execute_script("return Number(document.body.dataset.revision)")
                finish_running_task(journal)
                started = time.perf_counter()
                wait_until(lambda r=revision: driver.execute_script(
                    "return Number(document.body.dataset.revision)") > r, 120, "the change drawn", 0.05)
                out["change"].append(time.perf_counter() - started)
    finally:
        dash.close()
    return out


def report(name: str, values: list[float]) -> None:
    print(f"  {name:<46} median {statistics.median(values) * 1000:8.0f} ms"
          f"   (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f}, n={len(values)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    running = 8 + 2 * args.repeats  # each repeat finishes a running trial or two
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp_dir:
        tmp = Path(tmp_dir)
        journal = tmp / "journal.db"
        seconds, _ = timed(lambda: write_journal(journal, args.trials, fail_every=17, relaunch_every=50,
                                                 running=running))
        print(f"journal: {args.trials} trials, {journal.stat().st_size / 1e6:.1f} MB, written in {seconds:.1f} s")
        print("API (urllib, gzip; a separate morphml dashboard process):")
        api = bench_api(journal, args.repeats)
        report("initial load, server just started", api["cold"])
        report("initial load, warm server", api["warm"])
        report("poll, nothing changed", api["idle"])
        report("the poll that brings a finished trial", api["change"])
        report("trial finished in the journal until polled", api["seen"])
        if args.no_browser or not (shutil.which("chromium") and shutil.which("chromedriver")):
            print("browser: skipped" + ("" if args.no_browser else " (no chromium/chromedriver on PATH)"))
            return 0
        print("browser (headless chromium, 1600x1200):")
        browser = bench_browser(journal, args.trials, args.repeats, tmp)
        if browser:
            report("page load until every trial is drawn", browser["load"])
            report("one render of the whole page (renderMs)", browser["render"])
            report("journal change until drawn (poll 200 ms)", browser["change"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
