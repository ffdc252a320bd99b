"""Process tests: fail-stop on a real full disk, and a journal file that is not a journal.

The journal of a real `morphml master` lives on a small tmpfs that the test fills while trials
run, so SQLite's commit fails with SQLITE_FULL (no hook in the product). The master must stop
and exit non-zero naming the file and the error, having sent no lease and no acknowledgement
that its journal lacks; restarted on the same file once there is room again, it finishes the
budget with every trial counted exactly once. Needs root (mount); the test suite runs as root.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from morphml.distributed.auth import token_metadata
from morphml.distributed.journal import Journal
from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc
from proc_helpers import REPO, TOKEN, finished, free_port, status, wait_for, write_manifest
from tests.disk import fill

pytestmark = pytest.mark.process


class RecordingWorker(threading.Thread):
    """A worker written against worker.proto in the test: reports every lease at once (ok) and
    records each lease and acknowledgement the master sent it, to hold them against the journal."""

    def __init__(self, port: int, name: str):
        super().__init__(name=name, daemon=True)
        self.address, self.worker_name = f"127.0.0.1:{port}", name
        self.leases: list[tuple[str, int]] = []
        self.acks: list[tuple[str, int, str]] = []
        self.ended = threading.Event()
        self._outgoing: queue.Queue = queue.Queue()

    def _requests(self, worker_id: str):
        yield pb.WorkerMessage(hello=pb.Hello(worker_id=worker_id))
        while True:
            message = self._outgoing.get()
            if message is None:
                return
            yield message

    def _heartbeats(self) -> None:
        sequence = 0
        while not self.ended.wait(0.3):
            sequence += 1
            self._outgoing.put(pb.WorkerMessage(heartbeat=pb.Heartbeat(sequence=sequence)))

    def run(self) -> None:
        metadata = token_metadata(TOKEN)
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = pb_grpc.MasterStub(channel)
                reply = stub.Register(pb.RegisterRequest(worker_name=self.worker_name, slots=2), metadata=metadata,
                                      timeout=10)
                threading.Thread(target=self._heartbeats, daemon=True).start()
                for message in stub.Connect(self._requests(reply.worker_id), metadata=metadata):
                    results = []
                    for lease in message.leases.leases:
                        self.leases.append((lease.task_id, lease.attempt))
                        results.append(pb.TrialResult(
                            worker_id=reply.worker_id, lease=pb.LeaseRef(task_id=lease.task_id, attempt=lease.attempt),
                            ok=True, metrics_json='{"val_accuracy": 0.5}', worker_name=self.worker_name,
                            duration_seconds=0.001, lease_key=lease.lease_key))
                    if results:
                        self._outgoing.put(pb.WorkerMessage(results=pb.ResultBatch(results=results)))
                    self.acks += [(a.lease.task_id, a.lease.attempt, a.disposition) for a in message.acks]
                    if message.HasField("shutdown"):
                        break
        except grpc.RpcError:
            pass  # the master went away: what it sent so far is recorded
        finally:
            self.ended.set()
            self._outgoing.put(None)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"mount tmpfs (the process tier runs as root): {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def journal_view(path: Path) -> tuple[set, set, dict]:
    """(attempts, accepted results, finished task -> attempt) as the journal has them."""
    journal = Journal.open_read_only(path)
    try:
        attempts = {(a.task_id, a.attempt) for a in journal.load_attempts()}
        accepted = {(r["task_id"], r["attempt"]) for r in journal.results("accepted")}
        done = {t.task_id: t.finished_attempt for t in journal.load_tasks() if t.state.value in ("succeeded", "failed")}
    finally:
        journal.close()
    return attempts, accepted, done


@pytest.mark.timeout(240)
def test_a_full_disk_stops_the_master_with_nothing_sent_that_its_journal_lacks_and_a_restart_finishes(
        procs, tmp_path, small_disk):
    budget = 1500
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:instant", max_trials=budget)
    port = free_port()
    journal = small_disk / "journal.db"
    hb = ["--heartbeat-interval", "0.5", "--missed-heartbeats", "3"]
    master = procs.master(manifest, port, journal, extra=hb)
    for name in ("wa", "wb"):
        procs.worker(port, name, extra=["--give-up-after", "120"])
    recorder = RecordingWorker(port, "recorder")
    recorder.start()
    wait_for(lambda: (s := status(port)) and s.succeeded >= 50, 60, "50 finished trials")
    filler = fill(small_disk)
    try:
        rc = master.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the master kept running on a full disk: {status(port)}")
    log = master.log_path.read_text()
    assert rc == 3, log[-3000:]
    message = re.escape(f"morphml master: journal {journal}: ") + r"(commit|a write) failed: \w+: .*(full|space)"
    assert re.search(message, log), log[-3000:]
    assert recorder.ended.wait(10)

    # Nothing left the master that its journal lacks: each lease the recorder got is a journaled
    # attempt, each result it saw accepted is journaled as accepted and finished its task.
    attempts, accepted, done = journal_view(journal)
    assert recorder.leases and set(recorder.leases) <= attempts
    acked = {(t, a) for t, a, disposition in recorder.acks if disposition == "accepted"}
    assert acked and acked <= accepted and all(done[t] == a for t, a in acked)
    finished_at_halt = len(done)
    assert finished_at_halt < budget

    filler.unlink()  # room again: the restarted master resumes from the journal
    master2 = procs.master(manifest, port, journal, extra=hb, log_name="master2.log")
    served_leases = set()
    def finished_status():
        st = status(port)
        if st is not None:  # every lease the restarted master holds in memory is journaled
            running = {(r.task_id, r.attempt) for w in st.workers for r in w.running}
            if running:
                attempts_now = journal_view(journal)[0]
                assert running <= attempts_now, running - attempts_now
                served_leases.update(running)
        return finished(st) and st

    st = wait_for(finished_status, 120, "the restarted master to finish", interval=0.2)
    assert st.phase == "Succeeded", st.message
    assert served_leases, "the check of leases against the journal never saw one"
    _, _, done = journal_view(journal)
    assert len(done) == budget
    reader = Journal.open_read_only(journal)
    try:
        counted = [e["task_id"] for e in reader.events("succeeded") + reader.events("failed")]
        restarts = reader.events("master_started")
    finally:
        reader.close()
    assert sorted(counted) == sorted(done), "a trial was counted twice or not at all"
    assert len(restarts) == 2 and restarts[1]["detail"]["restored_tasks"] >= finished_at_halt
    log2 = master2.log_path.read_text()
    assert "unknown candidate" not in log2 and "Traceback" not in log2, log2[-3000:]
    master2.send_signal(15)
    assert master2.wait(timeout=30) == 0
    print(f"\nfull disk after {finished_at_halt} of {budget} trials; recorder got {len(recorder.leases)} leases, "
          f"{len(acked)} accepted acks, all journaled")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [b"\x00garbage, not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
                         ids=["not-sqlite", "corrupt-sqlite"])
def test_morphml_run_on_a_corrupt_journal_refuses_it_by_name_in_one_line_and_leaves_it(tmp_path, content):
    manifest = write_manifest(tmp_path / "m.yaml")
    out = tmp_path / "out"
    out.mkdir()
    journal = out / "journal.db"
    journal.write_bytes(content)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-m", "morphml.cli", "run", str(manifest), "--workers", "1", "--output",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"morphml run: journal {journal}: "), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert journal.read_bytes() == content and sorted(p.name for p in out.iterdir()) == ["journal.db", "logs"]


@pytest.mark.timeout(60)
def test_the_master_on_a_foreign_sqlite_file_exits_naming_it(procs, tmp_path):
    import sqlite3

    journal = tmp_path / "other.db"
    db = sqlite3.connect(journal)
    db.execute("CREATE TABLE photos(id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    before = journal.read_bytes()
    proc = procs.spawn(["master", str(write_manifest(tmp_path / "m.yaml")), "--port", str(free_port()), "--host",
                        "127.0.0.1", "--journal", str(journal), "--token-file", str(procs.token_file)], "master.log")
    assert proc.wait(timeout=30) == 3
    text = proc.log_path.read_text()
    assert f"morphml master: journal {journal}: an SQLite database but not a MorphML journal (its tables: photos)" \
        in text
    assert "Traceback" not in text and journal.read_bytes() == before


@pytest.mark.timeout(240)
def test_morphml_run_on_a_disk_that_fills_exits_naming_the_journal_and_the_same_command_finishes(tmp_path,
                                                                                                small_disk):
    budget = 1200
    manifest = write_manifest(tmp_path / "m.yaml", evaluator="tests.evaluators:instant", max_trials=budget)
    out = small_disk / "out"
    journal = out / "journal.db"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "morphml.cli", "run", str(manifest), "--workers", "2", "--output", str(out)]
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        def finished_trials() -> int:
            try:
                return len(journal_view(journal)[2])
            except Exception:  # not created yet
                return 0

        wait_for(lambda: finished_trials() >= 50 or run.poll() is not None, 90, "50 finished trials")
        filler = fill(small_disk)
        stdout, stderr = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
            run.wait()
    assert run.returncode == 3, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert re.match(re.escape(f"morphml run: journal {journal}: ") + r"(commit|a write) failed: \w+: .*(full|space)",
                    last), stderr[-3000:]
    done_at_halt = len(journal_view(journal)[2])
    assert done_at_halt < budget
    filler.unlink()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming: {done_at_halt} trials already finished" in again.stdout
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == budget + 1 and len({r.split(",")[0] for r in rows[1:]}) == budget
