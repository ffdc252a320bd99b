"""The `morphml` command: `morphml run`, `morphml master`, `morphml worker`, `morphml status`.

- `morphml master MANIFEST --port P --journal FILE --token-file F`: the master pod's entrypoint.
- `morphml worker --master HOST:PORT --token-file F [--gpus K] [--slots N]`: the worker's.
- `morphml run MANIFEST --workers N [--output DIR] [--set PATH=VALUE ...]`: master + N worker
  processes on loopback (`--set` changes manifest fields first, e.g. a shorter budget),
  live progress, then DIR/trials.csv, best.json, convergence.png, report.html (journal in DIR/journal.db;
  rerun the same command to resume after Ctrl-C).
- `morphml status --master HOST:PORT`: the master's GetStatus as JSON.
- `morphml results NAME -n NAMESPACE [--out DIR]`: a finished cluster experiment's best/ and
  trials.csv through the Kubernetes API (morphml.results_fetch).
- `morphml dashboard runs/<name> [--port P] [--host H]`: the web dashboard of a local run,
  read-only from its journal (running or finished; morphml.dashboard).

Imports: everything above it (experiment, optimizers, evaluation.dataset_shape without torch,
distributed, results). The master side never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: each command imports what it needs when it runs
    from morphml.distributed.coordinator import ExperimentCoordinator, ExperimentSettings
    from morphml.distributed.master import MasterServer
    from morphml.experiment import Experiment
    from morphml.optimizers import Optimizer

log = logging.getLogger("morphml")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# --- manifest -> master ------------------------------------------------------------------------
def load_experiment(manifest: str, overrides: list[str] | None = None) -> Experiment:
    """The manifest, with `--set PATH=VALUE` overrides applied before it is validated."""
    from morphml.experiment import load_manifest

    return load_manifest(manifest, tuple(overrides or ()))


def build_search(experiment: Experiment, heartbeat_interval: float | None = None, missed_heartbeats: int | None = None,
                 restart_hold_seconds: float | None = None, min_workers: int = 0,
                 prefetch: int | None = None) -> tuple[Optimizer, ExperimentSettings]:
    """(optimizer, ExperimentSettings) for a loaded Experiment: the optimizer from
    `Experiment.build_optimizer`, the settings from the one manifest -> settings mapping
    (`morphml.distributed.settings`); the overrides win over the manifest (sub-second heartbeats
    are for tests and benchmarks: the CRD takes whole seconds)."""
    from morphml.distributed.settings import settings_for_experiment

    optimizer = experiment.build_optimizer()
    settings = settings_for_experiment(experiment, heartbeat_interval=heartbeat_interval,
                                       missed_heartbeats=missed_heartbeats, restart_hold_seconds=restart_hold_seconds,
                                       min_workers=min_workers, prefetch=prefetch)
    return optimizer, settings


def search_from_args(args: argparse.Namespace) -> tuple[Experiment, Optimizer, ExperimentSettings]:
    """(experiment, optimizer, settings) that `morphml run` or `morphml master` serves, from its arguments.

    Both commands come through here, so one manifest gives both the same search. They differ only
    where the command says so: `run` holds no leases after a restart (its workers are all new
    processes), `master` takes --restart-hold and --min-workers.
    """
    experiment = load_experiment(args.manifest, getattr(args, "overrides", None))
    if args.command == "run":
        restart_hold, min_workers = 0.0, 0
    else:
        restart_hold, min_workers = args.restart_hold, args.min_workers
    optimizer, settings = build_search(experiment, args.heartbeat_interval, args.missed_heartbeats, restart_hold,
                                       min_workers, args.prefetch)
    return experiment, optimizer, settings


def start_master(optimizer: Optimizer, settings: ExperimentSettings, journal_path: str, port: int, host: str | None,
                 token: str | None, journal_sync: str,
                 metrics_port: int | None = None, dashboard_port: int | None = None,
                 view_token: str | None = None) -> tuple[ExperimentCoordinator, MasterServer]:
    """Open the journal, resume from it, and serve (Prometheus /metrics too when metrics_port is
    not None, the web dashboard when dashboard_port is not None; 0 picks a free port); returns
    (coordinator, server)."""
    from morphml.distributed.checkpoints import make_store
    from morphml.distributed.coordinator import ExperimentCoordinator
    from morphml.distributed.journal import Journal
    from morphml.distributed.master import MasterServer

    journal = Journal(journal_path, journal_sync)
    coordinator = ExperimentCoordinator(optimizer, settings, journal)
    # Checkpoints and best/ live beside the journal (or in S3 per spec.artifacts); set before any
    # lease is granted, since a lease carries save_epochs only when there is a store.
    coordinator.artifact_store = make_store(settings.artifacts, Path(journal_path).resolve().parent)
    server = MasterServer(coordinator, port, host, token, metrics_port=metrics_port, dashboard_port=dashboard_port,
                          view_token=view_token)
    server.start()
    return coordinator, server


def write_outputs(coordinator: ExperimentCoordinator, out_dir: Path) -> None:
    """A finished experiment's files beside its journal: trials.csv (with best.json and
    convergence.png, morphml.results) and best/ (architecture.json, metrics.json, model.pt from
    the best trial's final checkpoint). A failure is logged: the master keeps serving."""
    from morphml.distributed.checkpoints import write_best
    from morphml.results import write_results

    st = coordinator.status()
    try:
        write_results(coordinator.journal.path, out_dir, st["metric"], st["goal"])
        written = write_best(out_dir, st["best"], coordinator.artifact_store, st["metric"])
        logging.getLogger("morphml.master").info("wrote %s/trials.csv and %s", out_dir, ", ".join(written))
    except Exception:
        logging.getLogger("morphml.master").exception("writing the results beside the journal failed")


# --- commands ----------------------------------------------------------------------------------
def cmd_master(args: argparse.Namespace) -> int:
    from morphml.distributed.auth import read_token

    token = read_token(args.token_file)
    view_token = read_token(args.view_token_file) if args.view_token_file else None
    _, optimizer, settings = search_from_args(args)
    coordinator, server = start_master(optimizer, settings, args.journal, args.port, args.host, token,
                                       args.journal_sync, args.metrics_port, args.dashboard_port, view_token)
    print(f"morphml master: serving on port {server.port} (journal {args.journal})", file=sys.stderr, flush=True)
    if server.metrics_port is not None:
        print(f"morphml master: metrics on port {server.metrics_port}", file=sys.stderr, flush=True)
    if server.dashboard_port is not None:
        print(f"morphml master: dashboard on port {server.dashboard_port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    wrote_outputs = False
    while not stop.wait(0.5):
        server.raise_if_failed()  # fail-stop: the journal failed, the server stopped serving
        if coordinator.done and not wrote_outputs:
            # best/ and trials.csv beside the journal, for `morphml results` (DownloadArtifact).
            wrote_outputs = True
            write_outputs(coordinator, Path(args.journal).resolve().parent)
        if args.exit_when_done and coordinator.done:
            break
    server.stop(grace=1.0)
    coordinator.journal.close()  # every change is already committed; closing checkpoints the WAL
    return 0 if coordinator.phase != "Failed" else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from morphml.distributed.auth import read_token
    from morphml.distributed.worker import WorkerConfig, WorkerNode

    token = read_token(args.token_file)
    config = WorkerConfig(master=args.master, token=token, name=args.name or "", gpus=args.gpus, slots=args.slots,
                          health_port=args.health_port, grace_seconds=args.grace_seconds,
                          give_up_after_seconds=args.give_up_after or None)
    node = WorkerNode(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: node.drain(signal.Signals(signum).name))
    if args.exit_with_parent:
        parent = os.getppid()

        def watch_parent() -> None:
            while not node.wait(1.0):
                if os.getppid() != parent:
                    node.drain("parent exited")
                    return

        threading.Thread(target=watch_parent, daemon=True).start()
    return node.start()


def cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from morphml.distributed.auth import read_token, token_metadata
    from morphml.distributed.proto import worker_pb2 as pb
    from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

    token = read_token(args.token_file)
    with grpc.insecure_channel(args.master) as channel:
        reply = pb_grpc.MasterStub(channel).GetStatus(pb.StatusRequest(include_dead_workers=True),
                                                      metadata=token_metadata(token), timeout=10)
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from morphml.results_fetch import ResultsError, fetch_results

    out = Path(args.out or Path("runs") / args.name)
    try:
        summary = fetch_results(args.name, args.namespace, out, kubeconfig=args.kubeconfig, context=args.context)
    except ResultsError as exc:
        raise CliError(str(exc)) from None
    best = summary["best"]
    line = f"{args.name}: {summary['phase']}"
    if best:
        line += f"; best {best.get('metric')} {best.get('value', 0.0):.4f} ({best.get('trialId')})"
    print(f"{line}\nwrote {out}/best/model.pt, best/architecture.json, best/metrics.json, trials.csv\n"
          f"load it with morphml.evaluation.load_model({str(out / 'best')!r})", flush=True)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from morphml.dashboard.data import DashboardData
    from morphml.dashboard.server import DashboardServer
    from morphml.distributed.auth import read_token

    path = Path(args.run)
    journal_path = path / "journal.db" if path.is_dir() else path
    if not journal_path.is_file():
        raise CliError(f"{args.run}: no journal there (expected a run directory holding journal.db, or a journal "
                       f"file)")
    token = read_token(args.token_file) if args.token_file else None
    data = DashboardData(journal_path, metric=args.metric, goal=args.goal)
    data.refresh()  # a file that is not a journal is refused here, before listening (exit 3)
    server = DashboardServer(data, args.host, args.port, [token] if token else [])
    try:
        server.start()
    except OSError as exc:
        raise CliError(str(exc)) from None
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"morphml dashboard: warning: listening on {args.host} with no token: anyone who can reach this port "
              f"can read the experiment (pass --token-file)", file=sys.stderr, flush=True)
    print(f"morphml dashboard: {server.url} (journal {journal_path}, read-only; Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_line(st: dict, started: float, done_at_start: int) -> str:
    done = st["succeeded"] + st["failed"] + st.get("stopped", 0)
    elapsed = time.monotonic() - started
    rate_done = done - done_at_start
    eta = (elapsed / rate_done * (st["budget"] - done)) if rate_done > 0 else None
    best = st["best"]
    best_text = f"best {st['metric']} {best['metric']:.4f} ({best['trial_id']})" if best else "best --"
    if st.get("pareto"):  # several objectives: the front's size too
        best_text += f" | front {st['pareto']['size']}"
    return (f"[{st['experiment_name']}] {done}/{st['budget']} done | running {st['running']} | "
            f"failed {st['failed']} | workers {st['workers_alive']} | {best_text} | ETA {_format_eta(eta)}")


def cmd_run(args: argparse.Namespace) -> int:
    from morphml.dashboard.report import write_report
    from morphml.results import write_results

    experiment, optimizer, settings = search_from_args(args)
    output = Path(args.output or Path("runs") / experiment.name)
    output.mkdir(parents=True, exist_ok=True)
    (output / "logs").mkdir(exist_ok=True)
    journal_path = output / "journal.db"
    resumed = journal_path.exists()
    logging.basicConfig(filename=output / "logs" / "master.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    token = secrets.token_hex(16)
    coordinator, server = start_master(optimizer, settings, str(journal_path), 0, "127.0.0.1", token, args.journal_sync,
                                       args.metrics_port)
    if server.metrics_port is not None:
        print(f"morphml run: metrics on http://127.0.0.1:{server.metrics_port}/metrics", flush=True)
    st = coordinator.status()
    finished_before = st["succeeded"] + st["failed"] + st.get("stopped", 0)
    print(f"morphml run: {experiment.name}: budget {st['budget']} trials, {args.workers} workers, output {output}"
          + (f" (resuming: {finished_before} trials already finished)" if resumed else ""), flush=True)
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    signal.signal(signal.SIGTERM, lambda *_: interrupted.set())
    workers: list[subprocess.Popen] = []
    env = dict(os.environ, MORPHML_TOKEN=token)
    slots = args.slots or experiment.workers.trials_per_worker
    if not coordinator.done:
        for i in range(args.workers):
            cmd = [sys.executable, "-m", "morphml.cli", "worker", "--master", f"127.0.0.1:{server.port}",
                   "--slots", str(slots), "--name", f"local-{i}", "--exit-with-parent", "--give-up-after", "60",
                   "--grace-seconds", "5"]
            # The worker keeps its own copy of the log's file descriptor; ours closes at once.
            with open(output / "logs" / f"worker-{i}.log", "ab") as log_file:
                # Own process group: a terminal Ctrl-C reaches only us; we stop the workers ourselves.
                workers.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=log_file,
                                                start_new_session=True))
    started = time.monotonic()
    done_at_start = st["succeeded"] + st["failed"] + st.get("stopped", 0)
    last_line, last_print = "", 0.0
    tty = sys.stdout.isatty()
    while not coordinator.done and not interrupted.is_set():
        coordinator.wait_done(0.5)
        line = progress_line(coordinator.status(), started, done_at_start)
        now = time.monotonic()
        # On a terminal the line redraws every second; in a log, a new line when the counts
        # change (the text before ETA) or every 10 s.
        changed = line.rsplit(" | ETA", 1)[0] != last_line.rsplit(" | ETA", 1)[0]
        due = now - last_print >= (1.0 if tty else 10.0)
        if line != last_line and (changed or due or coordinator.done) and (tty or changed or due):
            print(("\r" + line.ljust(len(last_line))) if tty else line, end="" if tty else "\n", flush=True)
            last_line, last_print = line, now
    if tty:
        print()
    for proc in workers:
        if proc.poll() is None and interrupted.is_set():
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in workers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    final = coordinator.status()
    server.stop(grace=0.5)
    coordinator.journal.close()
    summary = write_results(journal_path, output, final["metric"], final["goal"])
    write_report(journal_path, output, final["metric"], final["goal"], final["budget"])
    if coordinator.done:  # best/: the trained best model (morphml.evaluation.load_model reads it)
        from morphml.distributed.checkpoints import write_best

        summary["best_files"] = write_best(output, final["best"], coordinator.artifact_store, final["metric"])
    if interrupted.is_set() and not coordinator.done:
        print(f"interrupted: {summary['trials']}/{final['budget']} trials finished; rerun the same command to resume",
              flush=True)
        return 130
    if summary.get("plot_skipped"):
        print(summary["plot_skipped"], flush=True)
    best = summary["best"]
    print(f"{final['phase']}: {final['message']}. {summary['succeeded']} succeeded, "
          + (f"{summary['stopped']} stopped early, " if summary.get("stopped") else "")
          + f"{summary['failed']} failed; "
          + (f"best {final['metric']} {best['value']:.4f} ({best['trial_id']}: {best['summary']})"
             if best else "no best")
          + f"\nwrote {output}/trials.csv, best.json, convergence.png, report.html, journal.db", flush=True)
    return 0 if final["phase"] == "Succeeded" else 1


# --- parser ------------------------------------------------------------------------------------
def prefetch_arg(text: str) -> int | None:
    """--prefetch: 'auto' (None) or a count >= 0."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--prefetch {text!r}: allowed 'auto' or an integer >= 0")
    return value


def port_arg(text: str) -> int:
    """--metrics-port: a TCP port 0..65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed a port number 0..65535 (0: any free port)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morphml", description="Neural architecture search: local or on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    def heartbeat_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--heartbeat-interval", type=float, default=None,
                       help="seconds between worker heartbeats (overrides spec.faultTolerance; may be < 1)")
        p.add_argument("--missed-heartbeats", type=int, default=None,
                       help="heartbeats missed before a worker is dead (overrides spec.faultTolerance)")
        p.add_argument("--journal-sync", choices=["full", "normal"], default="full",
                       help="SQLite synchronous mode of the journal (see docs/architecture.md)")
        p.add_argument("--metrics-port", type=port_arg, default=None, metavar="PORT",
                       help="serve Prometheus /metrics on this port (0: a free one, printed); default off")
        p.add_argument("--prefetch", type=prefetch_arg, default=None, metavar="{auto,K}",
                       help="leases queued per worker beyond its slots; auto (default): 1 while the last trials "
                            "took under 2 s, else 0")

    p = sub.add_parser("run", help="run a search locally: master + N worker processes")
    p.add_argument("manifest")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--slots", type=int, default=None, help="trials per worker (default spec.workers.trialsPerWorker)")
    p.add_argument("--output", default=None, help="output directory (default runs/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="change a manifest field before it is validated, e.g. --set spec.budget.maxTrials=2 "
                        "(VALUE is YAML; repeatable; see docs/cli.md)")
    heartbeat_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("master", help="serve one experiment to workers (the master pod's entrypoint)")
    p.add_argument("manifest")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default=None, help="address to listen on (default $POD_IP if set, else all)")
    p.add_argument("--journal", required=True, help="SQLite journal file (resumes if it exists)")
    p.add_argument("--token-file", default=None, help="file holding the token (else $MORPHML_TOKEN)")
    p.add_argument("--exit-when-done", action="store_true", help="exit once the experiment is over")
    p.add_argument("--min-workers", type=int, default=0,
                   help="hand out no trial until this many workers are connected (at most 60 s)")
    p.add_argument("--restart-hold", type=float, default=None,
                   help="seconds a restarted master keeps leases for their workers (default: heartbeat timeout)")
    p.add_argument("--dashboard-port", type=port_arg, default=None, metavar="PORT",
                   help="serve the web dashboard on this port (0: a free one; default off); its API needs the "
                        "token or the view token")
    p.add_argument("--view-token-file", default=None,
                   help="file holding a read-only token for the dashboard (besides the experiment's token)")
    heartbeat_overrides(p)
    p.set_defaults(func=cmd_master)

    p = sub.add_parser("worker", help="run trials for a master (the worker pod's entrypoint)")
    p.add_argument("--master", required=True, help="HOST:PORT of the master")
    p.add_argument("--token-file", default=None, help="file holding the token (else $MORPHML_TOKEN)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs: one trial per GPU on cuda:0..K-1 (default 0: CPU)")
    p.add_argument("--slots", type=int, default=1, help="trials at once on CPU (default 1)")
    p.add_argument("--name", default=None, help="worker name (default $POD_NAME, else host-pid)")
    p.add_argument("--health-port", type=int, default=None, help="serve grpc.health.v1 on this port")
    p.add_argument("--grace-seconds", type=float, default=25.0, help="on SIGTERM, time to finish running trials")
    p.add_argument("--give-up-after", type=float, default=600.0,
                   help="exit when the master is unreachable this many seconds (0: never)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("dashboard", help="serve the web dashboard of a local run (read-only, from its journal)")
    p.add_argument("run", help="run directory (runs/<name>, holding journal.db) or a journal file")
    p.add_argument("--port", type=port_arg, default=8080, help="port to listen on (default 8080; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--token-file", default=None,
                   help="require this token (Authorization: Bearer) on the API; default none")
    p.add_argument("--metric", default=None, help="objective metric (default: the journaled optimizer's)")
    p.add_argument("--goal", choices=["maximize", "minimize"], default=None,
                   help="objective goal (default: the journaled optimizer's)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("results", help="fetch a finished cluster experiment's best model and trials.csv")
    p.add_argument("name", help="the NASExperiment's name")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    p.add_argument("--out", default=None, help="output directory (default runs/<name>, as morphml run)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG, else ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: its current one)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("status", help="print a master's status as JSON")
    p.add_argument("--master", required=True)
    p.add_argument("--token-file", default=None)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from morphml.distributed.auth import TokenError
    from morphml.distributed.journal import JournalError
    from morphml.distributed.s3store import S3StoreError
    from morphml.experiment import ManifestError

    try:
        return args.func(args)
    # S3StoreError: spec.artifacts.s3 unusable at the master's start (it names endpoint and bucket).
    except (TokenError, ManifestError, CliError, S3StoreError) as exc:
        print(f"morphml {args.command}: {exc}", file=sys.stderr)
        return 2
    except JournalError as exc:  # refused at open, or failed mid-run (fail-stop): the message names the file
        print(f"morphml {args.command}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
