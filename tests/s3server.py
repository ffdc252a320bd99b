"""A real S3-compatible server for the tests: SeaweedFS's `weed`, built from its Go module.

What lives here:

- `ensure_weed()`: the `weed` binary, built once by ``tests/s3bin/build.sh`` from the SeaweedFS
  version pinned in ``tests/s3bin/go.mod`` and cached like the Kubernetes binaries (the same cache
  root, ``MORPHML_KUBE_CACHE`` or ``~/.cache/morphml-kube``, in ``seaweedfs-<hash of go.mod, go.sum,
  build.sh>``; a lock, so parallel pytest processes build once). `prebuild()` starts that build in a
  thread and `wait_prebuilt()` joins it: tests/conftest.py calls them around collection when a
  selected test is marked ``s3``, so on a fresh machine the build runs beside the Kubernetes builds
  and before the first test, never inside a test's timeout.
- `S3Server`: one `weed server -s3` (master, volume server, filer and S3 gateway in one process)
  on 127.0.0.1 only, every port picked free, its data, config and sockets in a private directory
  that `stop()` removes; telemetry, the Iceberg and Lance listeners off. `start()` waits (with a
  timeout) until a signed ListBuckets answers; `stop()` always kills the process group.
- The `s3_server` context manager and `make_bucket`.

The credentials are this server's own identities (``-s3.config``): `ACCESS_KEY`/`SECRET_KEY` may
do everything, `READONLY_ACCESS_KEY` may only read and list.

Imports: the standard library, tests.cluster.build (cache and lock); boto3 in the helpers that
talk S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.cluster import build

S3BIN_DIR = Path(__file__).resolve().parent / "s3bin"
ACCESS_KEY = "morphmltestadmin"
SECRET_KEY = "morphml-test-secret-key-0123456789"
READONLY_ACCESS_KEY = "morphmltestreader"
READONLY_SECRET_KEY = "morphml-test-reader-key-0123456789"
REGION = "us-east-1"
START_TIMEOUT_S = 90.0


def weed_dir() -> Path:
    """Cache directory of the pinned weed build (may not exist yet)."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "build.sh"):
        digest.update(name.encode() + b"\0" + (S3BIN_DIR / name).read_bytes() + b"\0")
    return build.cache_root() / f"seaweedfs-{digest.hexdigest()[:16]}"


_prebuild: dict[str, object] = {}


def prebuild() -> None:
    """Start building weed in a daemon thread (no-op when cached or already started)."""
    if "thread" in _prebuild or build._complete(weed_dir(), ("weed",)):
        return

    def target() -> None:
        try:
            ensure_weed()
        except Exception as exc:  # raised again by ensure_weed in the first test that needs it
            _prebuild["error"] = exc

    thread = threading.Thread(target=target, name="weed-build", daemon=True)
    _prebuild["thread"] = thread
    thread.start()


def wait_prebuilt() -> None:
    thread = _prebuild.get("thread")
    if isinstance(thread, threading.Thread):
        thread.join()


def ensure_weed(log=None) -> Path:
    """The weed binary, built first when the cache lacks it (minutes on 2 cores, once)."""
    error = _prebuild.get("error")
    if isinstance(error, Exception):
        raise error
    # build._ensure is the kube binaries' cache/lock/log logic; it prunes other "seaweedfs-" builds
    # after a day unused.
    directory = build._ensure(weed_dir(), ("weed",), S3BIN_DIR / "build.sh", "SeaweedFS S3 server (weed)",
                              "several minutes on 2 cores", log)
    return directory / "weed"


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class S3Server:
    """One SeaweedFS server with its S3 gateway on loopback (see the module docstring)."""

    def __init__(self, weed: Path) -> None:
        self.weed = weed
        self.dir = Path(tempfile.mkdtemp(prefix="morphml-s3-"))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> S3Server:
        (master_http, master_grpc, volume_http, volume_grpc, filer_http, filer_grpc, s3_http,
         s3_grpc) = _free_ports(8)
        self.port = s3_http
        self._grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc]
        data = self.dir / "data"
        data.mkdir()
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}],
             "actions": ["Read", "List"]},
        ]}))
        command = [
            str(self.weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-master.telemetry=false",  # never reports anything anywhere
            f"-master.port={master_http}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64", "-volume.max=4",
            f"-volume.port={volume_http}", f"-volume.port.grpc={volume_grpc}",
            "-filer", f"-filer.port={filer_http}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3", f"-s3.port={s3_http}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]
        self.log_path = self.dir / "weed.log"
        with open(self.log_path, "wb") as log:
            # Own process group: stop() kills weed and anything it started. Dies with the test
            # process too (pdeathsig where setpriv exists), as the control plane does.
            prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
            self.proc = subprocess.Popen(prefix + command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        last_error = ""
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode} while starting; log:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return self
            except Exception as error:  # not up yet: connection refused, 503 while the filer starts
                last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 gateway on {self.endpoint} not answering after {timeout:.0f} s "
                           f"({last_error}); log:\n{self.log_tail()}")

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            config=Config(region_name=REGION, s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=20,
                          retries={"max_attempts": 1}))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # Nothing here needs a clean shutdown (the data is thrown away); weed's own takes
                # over 10 s, so it gets 3.
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # The gRPC sockets weed makes in /tmp (their path is not configurable) and our directory.
        for port in self._grpc_ports:
            for name in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def s3_server(timeout: float = START_TIMEOUT_S) -> Iterator[S3Server]:
    """A started S3Server, stopped and its directory removed however the block ends."""
    server = S3Server(ensure_weed())
    try:
        yield server.start(timeout)
    finally:
        server.stop()


def make_bucket(server: S3Server, name: str) -> str:
    server.client().create_bucket(Bucket=name)
    return name
