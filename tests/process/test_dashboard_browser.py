"""The dashboard in a real headless browser (Debian's chromium through chromedriver, tests/headless.py):
`morphml dashboard` of a running and then finished local search (`morphml run`), the report.html
that run wrote, opened offline, and the master's dashboard behind its tokens.

What is checked is what the page drew: rows in the trials table, points of the convergence
chart and nodes of the architecture graph as ECharts holds them, against the journal read
with Journal.open_read_only. Screenshots go to tests.headless.artifacts_dir (printed).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from morphml.distributed.journal import JournalError
from proc_helpers import TOKEN, finished, free_port, journal_tasks, status, wait_for, write_manifest
from tests.cluster import hostdeps
from tests.headless import artifacts_dir, chrome, page_state, requested_urls, wait_until

pytestmark = pytest.mark.process


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    """Chromium installed before any search starts: on a fresh machine the install takes about a
    minute, long enough for a search to end before the page could be seen mid-run."""
    hostdeps.ensure(hostdeps.BROWSER_TOOLS)

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, token: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with NO_PROXY.open(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def journal_digests(path: Path) -> dict[str, str]:
    """sha256 of the journal and its WAL (a WAL SQLite's read-only connection creates is empty:
    missing and empty count the same)."""
    return {p.name: hashlib.sha256(p.read_bytes() if p.exists() else b"").hexdigest()
            for p in (path, Path(f"{path}-wal"))}


def tasks_if_any(journal: Path) -> list:
    """The journal's tasks, or [] while the file is missing or not yet initialised by the master."""
    try:
        return journal_tasks(journal) if journal.exists() else []
    except JournalError:  # created a moment ago: no tables yet
        return []


def arch_nodes(journal: Path, task_id: str) -> tuple[int, int]:
    task = next(t for t in journal_tasks(journal) if t.task_id == task_id)
    arch = json.loads(task.arch_json)
    return len(arch["nodes"]), len(arch["edges"])


@pytest.mark.timeout(300)
def test_dashboard_of_a_running_then_finished_local_search_in_a_real_browser(procs, tmp_path):
    budget = 12
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=budget)
    out = tmp_path / "run"
    journal = out / "journal.db"
    run = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out)], "run.log",
                      env={"MORPHML_TEST_SLEEP": "3"})
    wait_for(lambda: tasks_if_any(journal), 60, "the run's first trial in its journal", 0.2)
    port = free_port()
    procs.spawn(["dashboard", str(out), "--port", str(port)], "dashboard.log")
    base = f"http://127.0.0.1:{port}/"
    wait_for(lambda: http_status(base + "api/summary") == 200, 30, "the dashboard to serve", 0.2)
    shots = artifacts_dir(tmp_path, "dashboard-local")
    print(f"\nscreenshots in {shots}")

    with chrome(tmp_path / "chrome") as driver:
        driver.get(base + "?poll=300")

        def matching_journal() -> int | None:
            """Succeeded trials when the page shows exactly what the journal holds, mid-run."""
            tasks = journal_tasks(journal)
            done = sum(t.state.value == "succeeded" for t in tasks)
            page = page_state(driver)
            if page["rows"] == len(tasks) and page["points"] == done and 0 < done < budget:
                return done
            return None

        first = wait_until(matching_journal, 90, "the running search's trials on the page")
        driver.save_screenshot(str(shots / "running.png"))

        def updated_mid_run() -> int | None:
            """Points on the page beyond `first` while the journal still has trials to finish."""
            points = page_state(driver)["points"]
            succeeded = sum(t.state.value == "succeeded" for t in journal_tasks(journal))
            return points if points > first and succeeded < budget else None

        later = wait_until(updated_mid_run, 90, "the page to follow trials finishing while the search runs")
        assert first < later < budget

        assert run.wait(timeout=120) == 0, run.log_path.read_text()
        page = wait_until(lambda: (p := page_state(driver))["phase"] == "Succeeded" and p["rows"] == budget and p,
                          30, "the finished search on the page")
        assert page["rows"] == page["points"] == budget == len(journal_tasks(journal))
        assert page["parallel"] == budget and page["timeline"] == budget  # one line/bar per trial (one attempt each)
        assert f"succeeded {budget}" in page["counts"]

        nodes, edges = arch_nodes(journal, "t000003")
        driver.find_element(By.CSS_SELECTOR, 'tr[data-trial="t000003"]').click()
        page = wait_until(lambda: (p := page_state(driver))["graphNodes"] == nodes and p, 30, "t000003's graph")
        assert page["graphLinks"] == edges
        driver.save_screenshot(str(shots / "finished.png"))

        # sorting by the metric puts the best trial first; filtering by status keeps only those rows
        best = json.loads((out / "best.json").read_text())["trial_id"]
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="value"]').click()
        assert wait_until(lambda: page_state(driver)["firstRow"] == best, 10, "the best trial first")
        status_filter = Select(driver.find_element(By.ID, "filter-status"))
        status_filter.select_by_visible_text("failed")
        wait_until(lambda: page_state(driver)["rows"] == 0, 10, "no failed rows")
        status_filter.select_by_visible_text("succeeded")
        wait_until(lambda: page_state(driver)["rows"] == budget, 10, "every succeeded row")

        # the dashboard never writes the journal: reading it again and again leaves its bytes as they were
        before = journal_digests(journal)
        driver.refresh()
        wait_until(lambda: page_state(driver)["rows"] == budget, 30, "the reloaded page")
        for _ in range(5):
            assert http_status(base + "api/trials") == 200 and http_status(base + "api/trial/t000003") == 200
        wait_until(lambda: driver.execute_script("return Number(document.body.dataset.revision)") > 0, 10, "a poll")
        assert journal_digests(journal) == before


@pytest.mark.timeout(300)
def test_report_html_opens_offline_and_shows_the_counts_of_the_live_dashboard(procs, tmp_path):
    budget = 10
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.metrics_evaluators:sleepy_sometimes_fails",
                              max_trials=budget, max_failed=budget, retries=0)
    out = tmp_path / "run"
    run = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out)], "run.log",
                      env={"MORPHML_TEST_SLEEP": "0.05"})
    assert run.wait(timeout=120) == 0, run.log_path.read_text()
    report = out / "report.html"
    assert report.exists() and "report.html" in run.log_path.read_text()
    tasks = journal_tasks(out / "journal.db")
    succeeded = sum(t.state.value == "succeeded" for t in tasks)
    assert 0 < succeeded < budget  # some failed: the counts are not all one kind

    port = free_port()
    procs.spawn(["dashboard", str(out), "--port", str(port)], "dashboard.log")
    wait_for(lambda: http_status(f"http://127.0.0.1:{port}/api/summary") == 200, 30, "the dashboard", 0.2)
    shots = artifacts_dir(tmp_path, "dashboard-report")
    print(f"\nscreenshots in {shots}")
    with chrome(tmp_path / "chrome-live") as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        live = wait_until(lambda: (p := page_state(driver))["rows"] == budget and p, 30, "the live page")

    with chrome(tmp_path / "chrome-report", performance_log=True) as driver:
        url = report.resolve().as_uri()
        driver.get("about:blank")
        requested_urls(driver)  # drain what the browser's own start page requested
        driver.get(url)
        shown = wait_until(lambda: (p := page_state(driver))["rows"] == budget and p["graphNodes"] and p, 30,
                           "the report's table and the best trial's graph")
        driver.save_screenshot(str(shots / "report.png"))
        urls = requested_urls(driver)
    assert urls and urls[0] == url
    assert [u for u in urls if u != url and not u.startswith("data:")] == []  # nothing but the file itself
    for key in ("rows", "points", "bestLine", "counts", "phase", "parallel", "timeline"):
        assert shown[key] == live[key], key
    assert shown["points"] == succeeded and shown["rows"] == len(tasks)
    best = json.loads((out / "best.json").read_text())["trial_id"]
    assert shown["graphNodes"] == arch_nodes(out / "journal.db", best)[0]  # the best trial, drawn offline


@pytest.mark.timeout(300)
def test_master_dashboard_needs_the_experiment_token_or_the_view_token(procs, tmp_path):
    budget = 6
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:sleepy", max_trials=budget)
    (tmp_path / "view-token").write_text("read-only-view-token\n")
    port, dash_port = free_port(), free_port()
    journal = tmp_path / "journal.db"
    procs.master(manifest, port, journal, extra=["--dashboard-port", str(dash_port),
                                                 "--view-token-file", str(tmp_path / "view-token")])
    procs.worker(port, "w1", env={"MORPHML_TEST_SLEEP": "0.2"})
    base = f"http://127.0.0.1:{dash_port}/"
    for path in ("api/summary", "api/trials", "api/trial/t000001", "api/losses"):
        assert http_status(base + path) == 401, path
        assert http_status(base + path, "not-the-token") == 403, path
    assert http_status(base + "api/summary", TOKEN) == 200
    assert http_status(base + "api/summary", "read-only-view-token") == 200
    assert http_status(base + "api/summary", TOKEN, method="POST") == 405
    assert http_status(base) == 200  # the page itself holds no data
    wait_for(lambda: finished(status(port)), 60, "the search to finish", 0.2)

    shots = artifacts_dir(tmp_path, "dashboard-master")
    print(f"\nscreenshots in {shots}")
    with chrome(tmp_path / "chrome") as driver:
        driver.get(base)  # no token: the page asks for one and shows nothing
        assert wait_until(lambda: page_state(driver)["login"], 30, "the token form")
        assert page_state(driver)["rows"] == 0
        driver.save_screenshot(str(shots / "no-token.png"))
        driver.get(base + "#token=read-only-view-token")
        page = wait_until(lambda: (p := page_state(driver))["rows"] == budget and p, 30, "the master's trials")
        assert not page["login"] and page["points"] == budget == len(journal_tasks(journal))
        assert "token" not in driver.current_url  # the fragment is taken off the address bar
        driver.save_screenshot(str(shots / "view-token.png"))
