"""The dashboard's data and HTTP server over real journal files (written through the Journal API
by tests/dashboard_journal.py): one row per trial, rows changed since a revision, paging that never
skips, best and Pareto front, Bearer tokens (401/403), read-only routes, the journal's bytes
unchanged by reading, report.html self-contained, the assets in the package data."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import re
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from morphml.cli import main
from morphml.dashboard.data import DashboardData
from morphml.dashboard.report import render_report
from morphml.dashboard.server import DashboardServer
from morphml.distributed.journal import Journal
from tests.dashboard_journal import finish_running_task, write_journal

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never the proxy


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return write_journal(tmp_path / "journal.db", 30, fail_every=7, relaunch_every=10, running=3)


def fresh(path: Path, **kwargs) -> DashboardData:
    data = DashboardData(path, min_interval=0.0, **kwargs)
    data.refresh(force=True)
    return data


def test_one_row_per_trial_with_status_worker_attempts_retries_and_errors(journal_path):
    data = fresh(journal_path)
    rows = data.changed("trials")["items"]
    assert [r["id"] for r in rows] == [f"t{i:06d}" for i in range(1, 31)]
    by_id = {r["id"]: r for r in rows}
    assert [by_id[f"t{i:06d}"]["status"] for i in (28, 29, 30)] == ["running"] * 3
    assert by_id["t000007"]["status"] == "failed" and by_id["t000007"]["error_kind"] == "exception"
    assert by_id["t000010"]["attempts"] == 2 and by_id["t000010"]["worker"] == "w2"  # re-leased after a loss
    journal = Journal.open_read_only(journal_path)
    try:
        arch = json.loads(next(t.arch_json for t in journal.load_tasks() if t.task_id == "t000001"))
    finally:
        journal.close()
    assert by_id["t000001"]["attempts"] == 1 and by_id["t000001"]["nodes"] == len(arch["nodes"])
    summary = data.summary()
    assert summary["trials"] == 30 and summary["budget"] == 30 and summary["metric"] == "val_accuracy"
    assert summary["counts"] == {"pending": 0, "running": 3, "succeeded": 24, "stopped": 0, "failed": 3}
    assert summary["losses"] == len(data.changed("losses")["items"]) == 3
    assert len(data.changed("attempts")["items"]) == 33
    assert len(data.changed("curves")["items"]) == 24  # one per succeeded trial
    detail = data.trial("t000010")
    assert [a["state"] for a in detail["attempt_rows"]] == ["stale", "succeeded"]
    assert len(detail["architecture"]["nodes"]) == by_id["t000010"]["nodes"] and detail["params"] > 0


def test_only_rows_changed_after_a_revision_are_sent_and_an_unchanged_journal_keeps_its_revision(journal_path):
    data = fresh(journal_path)
    before = data.revision
    data.refresh(force=True)
    assert data.revision == before and data.changed("trials", before)["items"] == []
    finish_running_task(journal_path, "t000029")
    assert data.refresh(force=True)
    assert data.revision == before + 1
    assert [r["id"] for r in data.changed("trials", before)["items"]] == ["t000029"]
    assert [r["id"] for r in data.changed("curves", before)["items"]] == ["t000029"]
    assert [(r["task_id"], r["state"]) for r in data.changed("attempts", before)["items"]] == [("t000029", "succeeded")]
    assert data.summary()["best"]["id"] == "t000029"


def test_paging_through_changed_rows_skips_none_while_the_journal_changes(journal_path):
    data = fresh(journal_path)
    seen: list[str] = []
    page = data.changed("trials", 0, 0, 7)
    first_revision = page["revision"]
    seen += [r["id"] for r in page["items"]]
    finish_running_task(journal_path, "t000030")  # moves a row to a newer revision mid-way
    data.refresh(force=True)
    while page["next_offset"] is not None:
        page = data.changed("trials", 0, page["next_offset"], 7)
        seen += [r["id"] for r in page["items"]]
    assert set(seen) == {f"t{i:06d}" for i in range(1, 31)}
    assert "t000030" in [r["id"] for r in data.changed("trials", first_revision)["items"]]


def test_best_follows_the_goal(journal_path):
    values = {r["id"]: r["value"] for r in fresh(journal_path).changed("trials")["items"] if r["value"] is not None}
    assert fresh(journal_path).summary()["best"]["id"] == max(values, key=values.__getitem__)
    assert fresh(journal_path, goal="minimize").summary()["best"]["id"] == min(values, key=values.__getitem__)


def test_pareto_front_of_two_objectives_is_the_non_dominated_trials(tmp_path):
    objectives = [{"metric": "val_accuracy", "goal": "maximize"}, {"metric": "latency_ms", "goal": "minimize"}]
    path = write_journal(tmp_path / "journal.db", 40, objectives=objectives)
    data = fresh(path)
    rows = [r for r in data.changed("trials")["items"] if r["objectives"]]
    points = {r["id"]: (r["metrics"]["val_accuracy"], r["metrics"]["latency_ms"]) for r in rows}

    def dominated(a):
        return any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in points.values())

    assert data.summary()["objectives"] == objectives
    assert sorted(data.summary()["pareto"]) == sorted(i for i, p in points.items() if not dominated(p))


# --- the HTTP server ---------------------------------------------------------------------------
@pytest.fixture
def server(journal_path):
    srv = DashboardServer(DashboardData(journal_path, min_interval=0.0), "127.0.0.1", 0, ["exp-token", "view-token"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def get(url: str, token: str | None = None, method: str = "GET", headers: dict | None = None):
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.timeout(60)
def test_api_needs_a_token_401_without_403_wrong_and_either_token_reads(server):
    base = server.url
    status, headers, body = get(base + "api/summary")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in json.loads(body)["error"]
    assert get(base + "api/summary", "wrong")[0] == 403
    assert get(base + "api/trials", "wrong")[0] == 403
    assert get(base + "api/trial/t000001", "")[0] == 401
    for token in ("exp-token", "view-token"):
        status, _, body = get(base + "api/summary", token)
        assert status == 200 and json.loads(body)["trials"] == 30
    status, _, body = get(base + "api/trials?since=0&limit=10", "view-token")
    page = json.loads(body)
    assert status == 200 and len(page["items"]) == 10 and page["next_offset"] == 10 and page["total"] == 30


@pytest.mark.timeout(60)
def test_routes_are_read_only_and_static_files_stay_inside_the_package(server):
    base = server.url
    status, headers, body = get(base)
    assert status == 200 and b'id="trials"' in body and "default-src 'none'" in headers["Content-Security-Policy"]
    assert get(base + "static/app.js")[0] == 200
    assert get(base + "static/vendor/echarts/LICENSE")[0] == 200
    for path in ("static/../data.py", "static/%2e%2e/data.py", "static/.hidden", "journal.db", "static/"):
        assert get(base + path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert get(base + "api/summary", "exp-token", method=method)[0] == 405
    assert get(base + "api/trials?since=x", "exp-token")[0] == 400
    assert get(base + "api/trials?offset=-1", "exp-token")[0] == 400
    assert get(base + "api/trial/t999999", "exp-token")[0] == 404
    assert get(base + "api/nothing", "exp-token")[0] == 404
    status, headers, body = get(base + "api/trials", "exp-token", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert len(json.loads(gzip.decompress(body))["items"]) == 30


@pytest.mark.timeout(60)
def test_without_tokens_the_api_is_open(journal_path):
    srv = DashboardServer(DashboardData(journal_path), "127.0.0.1", 0)
    srv.start()
    try:
        assert get(srv.url + "api/summary")[0] == 200
    finally:
        srv.stop()


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of the journal and its WAL. SQLite's read-only connection may create an empty WAL
    (and the -shm index, which is not the journal's data): a missing WAL counts as an empty one."""
    return {p.name: hashlib.sha256(p.read_bytes() if p.exists() else b"").hexdigest()
            for p in (path, Path(f"{path}-wal"))}


@pytest.mark.timeout(60)
def test_reading_never_changes_the_journal(journal_path, server):
    before = file_digests(journal_path)
    mtime = journal_path.stat().st_mtime_ns
    for _ in range(5):
        for path in ("api/summary", "api/trials", "api/curves", "api/attempts", "api/losses", "api/trial/t000010"):
            assert get(server.url + path, "exp-token")[0] == 200
        server.data.refresh(force=True)
    render_report(DashboardData(journal_path))
    assert file_digests(journal_path) == before and journal_path.stat().st_mtime_ns == mtime


def test_report_is_one_file_with_its_data_and_no_url_to_load(journal_path):
    html = render_report(DashboardData(journal_path))
    snapshot = re.search(r'<script id="morphml-snapshot" type="application/json">(.*?)</script>', html, re.S)
    doc = json.loads(snapshot.group(1))
    assert len(doc["trials"]) == 30 and doc["summary"]["counts"]["succeeded"] == 24
    assert set(doc["architectures"]) == {r["id"] for r in doc["trials"]}
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)  # the HTML outside the scripts
    assert not re.search(r'(src|href)="(?!data:)', markup)  # nothing referenced: all inline
    assert "<script src" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert html.count("</script>") == 3  # snapshot, ECharts, app.js: none ends early


def test_the_page_and_echarts_with_its_license_are_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["morphml"]
    static = REPO / "runtime" / "morphml" / "dashboard" / "static"
    files = [p.relative_to(static.parents[1]).as_posix() for p in static.rglob("*") if p.is_file()]
    assert {"dashboard/static/vendor/echarts/LICENSE", "dashboard/static/vendor/echarts/NOTICE",
            "dashboard/static/vendor/echarts/echarts.min.js", "dashboard/static/app.js"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


def test_dashboard_command_refuses_a_directory_without_a_journal(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "no journal there" in capsys.readouterr().err
    (tmp_path / "journal.db").write_text("not sqlite")
    assert main(["dashboard", str(tmp_path), "--port", "0"]) == 3
    assert "not an SQLite database" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_concurrent_requests_while_the_journal_changes_all_succeed(journal_path, server):
    """The page asks for four resources at once; the server's threads share one DashboardData
    that refreshes while others read it. (A smoke test: with the reads unlocked it still passed
    twice here; the lock is there because a refresh adds rows while another thread iterates.)"""
    import threading

    failures: list = []

    def client() -> None:
        for _ in range(15):
            for path in ("api/summary", "api/trials", "api/curves", "api/attempts"):
                try:
                    status = get(server.url + path, "exp-token")[0]
                except OSError as exc:  # a handler that died drops the connection
                    status = repr(exc)
                if status != 200:
                    failures.append((path, status))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for task_id in ("t000028", "t000029", "t000030"):
        finish_running_task(journal_path, task_id)
    for thread in threads:
        thread.join(60)
    assert failures == []
    server.data.refresh(force=True)
    assert server.data.summary()["counts"]["running"] == 0
