"""Process test: a real `morphml master --metrics-port` scraped over HTTP during a run, after a
worker is killed, after the master is SIGKILLed and restarted on its journal, and after the run:
the counters equal the journal's counts (read with Journal.open_read_only, as another process)."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from morphml.distributed.journal import Journal
from proc_helpers import finished, free_port, status, wait_for, write_manifest

pytestmark = pytest.mark.process


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape of http://127.0.0.1:port/metrics."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never the proxy
    body = no_proxy.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def journal_counts(path: Path) -> dict[tuple[str, tuple], float]:
    """What the counters must say, from the journal alone (same keys as scrape())."""
    journal = Journal.open_read_only(path)
    try:
        tasks = journal.load_tasks()
        out = {("morphml_trials_total", (("outcome", outcome),)): float(sum(t.state.value == outcome for t in tasks))
               for outcome in ("succeeded", "failed", "stopped")}
        for reason, count in journal.count_losses_by_reason().items():
            out[("morphml_worker_losses_total", (("detected_by", reason),))] = float(count)
        for disposition, count in journal.count_results_by_disposition().items():
            out[("morphml_results_total", (("disposition", disposition),))] = float(count)
        out[("morphml_trial_retries_total", ())] = float(journal.count_events("retry"))
        return out
    finally:
        journal.close()


def assert_between(low: dict, scraped: dict, high: dict) -> None:
    """The scrape happened between two reads of the journal: each counter lies between them."""
    for key, value in high.items():
        assert low.get(key, 0.0) <= scraped.get(key, 0.0) <= value, (key, low.get(key), scraped.get(key), value)


@pytest.mark.timeout(180)
def test_master_metrics_equal_the_journal_during_and_after_a_run_and_across_a_master_restart(procs, tmp_path):
    budget = 16
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.metrics_evaluators:sleepy_sometimes_fails",
                              max_trials=budget, max_failed=budget, retries=1)
    port, metrics_port = free_port(), free_port()
    journal = tmp_path / "journal.db"
    extra = ["--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--metrics-port", str(metrics_port)]
    master = procs.master(manifest, port, journal, extra=extra)
    workers = [procs.worker(port, name, env={"MORPHML_TEST_SLEEP": "0.3"}) for name in ("wa", "wb")]
    wait_for(lambda: (s := status(port)) and s.succeeded + s.failed >= 3, 60, "3 finished trials")

    low = journal_counts(journal)  # during the run
    scraped = scrape(metrics_port)
    assert_between(low, scraped, journal_counts(journal))
    assert scraped[("morphml_experiment_phase", (("phase", "Running"),))] == 1
    assert scraped[("morphml_lease_to_result_seconds_count", ())] >= 3

    os.killpg(workers[0].pid, signal.SIGKILL)  # a worker loss (stream) mid-run
    wait_for(lambda: scrape(metrics_port)[("morphml_worker_losses_total", (("detected_by", "stream"),))] == 1,
             30, "the loss counted")
    procs.worker(port, "wc", env={"MORPHML_TEST_SLEEP": "0.3"})
    wait_for(lambda: (s := status(port)) and s.succeeded + s.failed >= 7, 60, "7 finished trials")

    os.killpg(master.pid, signal.SIGKILL)
    master.wait()
    at_kill = journal_counts(journal)
    assert at_kill[("morphml_trials_total", (("outcome", "succeeded"),))] >= 1
    procs.master(manifest, port, journal, extra=extra, log_name="master2.log")
    scraped = scrape(metrics_port)  # the restarted master: counters start at the journal's, not at 0
    assert_between(at_kill, scraped, journal_counts(journal))

    st = wait_for(lambda: finished(s := status(port)) and s, 120, "the restarted master to finish")
    assert st.phase == "Succeeded", st.message
    final = journal_counts(journal)
    scraped = scrape(metrics_port)  # after the run: exactly the journal's
    for key, value in final.items():
        assert scraped[key] == value, key
    assert final[("morphml_trials_total", (("outcome", "succeeded"),))] + \
        final[("morphml_trials_total", (("outcome", "failed"),))] == budget
    assert final[("morphml_trials_total", (("outcome", "failed"),))] >= 1
    assert final[("morphml_trial_retries_total", ())] >= 1
    assert scraped[("morphml_experiment_phase", (("phase", "Succeeded"),))] == 1
    assert scraped[("morphml_trials_current", (("state", "running"),))] == 0


@pytest.mark.timeout(120)
def test_local_run_serves_metrics_only_when_asked_and_on_the_port_it_prints(procs, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.metrics_evaluators:sleepy_sometimes_fails",
                              max_trials=6, max_failed=6, retries=0)
    quiet = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(tmp_path / "quiet")], "quiet.log",
                        env={"MORPHML_TEST_SLEEP": "0.05"})
    assert quiet.wait(timeout=90) == 0, quiet.log_path.read_text()
    assert "metrics on" not in quiet.log_path.read_text()  # off by default

    out = tmp_path / "out"
    run = procs.spawn(["run", str(manifest), "--workers", "2", "--output", str(out), "--metrics-port", "0"],
                      "run.log", env={"MORPHML_TEST_SLEEP": "1.0"})
    line = wait_for(lambda: next((x for x in run.log_path.read_text().splitlines() if "metrics on http" in x), None),
                    30, "the metrics URL printed")
    port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
    wait_for(lambda: scrape(port)[("morphml_trials_current", (("state", "running"),))] >= 1, 30, "a trial running")
    scraped = scrape(port)
    assert scraped[("morphml_trial_budget", ())] == 6
    assert scraped[("morphml_experiment_info", (("experiment", "proc"), ("goal", "maximize"),
                                                ("metric", "val_accuracy")))] == 1
    assert run.wait(timeout=90) == 0, run.log_path.read_text()
