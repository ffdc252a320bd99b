"""A real headless Chromium (Debian's chromium + chromium-driver, installed by tests.cluster.hostdeps
when missing) driven by Selenium, for the dashboard's browser tests and benchmarks/bench_dashboard.py.

`chrome(profile_dir)` yields a WebDriver with page-load and script timeouts, its own profile
directory, no proxy (test traffic stays on loopback), no background networking; on the way out
it quits the browser and kills any process still running with that profile (by pid, found in
/proc). `artifacts_dir(tmp_path, name)` is where screenshots go: $MORPHML_TEST_ARTIFACTS/<name>
when that is set, else <tmp_path>/artifacts. Helpers read what the page drew from ECharts'
own instances (`echarts.getInstanceByDom(...).getOption()`), since the charts are canvases.
Imported as `tests.headless`. Imports: selenium (lazily), tests.cluster.hostdeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.cluster import hostdeps

PAGE_TIMEOUT = 30.0


def artifacts_dir(tmp_path: Path, name: str) -> Path:
    root = os.environ.get("MORPHML_TEST_ARTIFACTS")
    path = Path(root) / name if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _kill_profile_processes(profile_dir: Path) -> None:
    """SIGKILL every process whose command line names this (unique) profile directory."""
    marker = str(profile_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@contextlib.contextmanager
def chrome(profile_dir: Path, width: int = 1600, height: int = 2200, performance_log: bool = False) -> Iterator[Any]:
    hostdeps.ensure(hostdeps.BROWSER_TOOLS)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile_dir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", f"--user-data-dir={profile_dir}", "--no-proxy-server",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps", "--disable-extensions"):
        options.add_argument(arg)
    if performance_log:  # every network request the page makes (Network.requestWillBeSent)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(shutil.which("chromedriver") or "chromedriver", log_output=str(profile_dir / "chromedriver.log"))
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        try:
            if driver is not None:
                driver.quit()
            else:
                service.stop()
        finally:
            _kill_profile_processes(profile_dir)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


# --- what the page shows -------------------------------------------------------------------------
def page_state(driver) -> dict:
    """Rows in the trials table, points of the convergence chart, nodes and links of the
    architecture graph, the phase and counts in the header, and whether the token form shows."""
    return driver.execute_script("""
        const inst = id => { const el = document.getElementById(id); return el && echarts.getInstanceByDom(el); };
        const series = (id, i) => { const c = inst(id); return c ? (c.getOption().series[i] || {}) : {}; };
        const graph = series('chart-graph', 0);
        return {rows: document.querySelectorAll('#trials tbody tr').length,
                tableTotal: Number(document.getElementById('trials').dataset.total || 0),
                points: (series('chart-convergence', 0).data || []).length,
                bestLine: (series('chart-convergence', 1).data || []).length,
                graphNodes: (graph.data || []).length, graphLinks: (graph.links || []).length,
                curves: (inst('chart-curves') ? inst('chart-curves').getOption().series.length : 0),
                parallel: (series('chart-parallel', 0).data || []).length,
                timeline: (series('chart-timeline', 0).data || []).length,
                phase: document.getElementById('phase').textContent,
                counts: document.getElementById('counts').textContent,
                login: !document.getElementById('login').hidden,
                firstRow: (document.querySelector('#trials tbody tr') || {dataset: {}}).dataset.trial || null};
    """)


def requested_urls(driver) -> list[str]:
    """URLs of every request the page sent, from Chrome's DevTools performance log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
