"""`morphml results NAME -n NAMESPACE`: a finished experiment's best model and trials out of the cluster.

What lives here:

- `fetch_results(name, namespace, out_dir, kubeconfig=None)`: through the Kubernetes API with the
  user's kubeconfig (the way `kubectl port-forward` does): the NASExperiment (it must exist and
  be finished), the experiment's token from its Secret, and the master pod; then a port-forward
  to the master's gRPC port and `DownloadArtifact` of `best/model.pt`, `best/architecture.json`,
  `best/metrics.json` and `trials.csv` into `out_dir` (the same layout `morphml run` leaves in
  `runs/<name>/`, so `morphml.evaluation.load_model(out_dir / "best")` works on both).
- `download_artifacts(address, token, out_dir)`: the gRPC half alone (also what a test against a
  local master uses).
- `ResultsError`: a user error with what to do (no such experiment, not finished, no master pod,
  a file the master does not have: `ResultsNotWritten`, which `fetch_results` waits out for
  WRITE_WAIT_S, since the master writes the files a moment after its phase turns terminal).

Each file is written to a temporary name in its folder, its size checked against the one the
master announced, then renamed: a broken transfer never leaves a half file under the real name.

Imports: the standard library, grpc and morphml.distributed (proto, the names of the operator's
objects are repeated here, not imported: the runtime does not depend on the operator package);
the kubernetes client inside `fetch_results` only (the operator extra).
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from morphml.distributed.proto import worker_pb2 as pb
from morphml.distributed.proto import worker_pb2_grpc as pb_grpc

#: What `morphml results` fetches, relative to the master's journal directory and to out_dir.
RESULT_FILES = ("best/model.pt", "best/architecture.json", "best/metrics.json", "trials.csv")
GROUP, VERSION, PLURAL = "morphml.io", "v1alpha1", "nasexperiments"
MASTER_PORT = 50051  # morphml_operator.builders.MASTER_PORT
FINISHED_PHASES = ("Succeeded", "Failed")
RPC_TIMEOUT_S = 120.0
#: The master writes best/ and trials.csv a moment after its phase turns terminal (and again after
#: a restart on the finished journal): a fetch right at the end waits this long for them.
WRITE_WAIT_S = 30.0


class ResultsError(Exception):
    """`morphml results` cannot go on; the message says why and what to do."""


class ResultsNotWritten(ResultsError):
    """The master has not (yet) the file asked for (gRPC NOT_FOUND)."""


def master_pod_name(name: str) -> str:
    return f"{name}-master"  # morphml_operator.builders.master_name


def token_secret_name(name: str) -> str:
    return f"{name}-token"  # morphml_operator.builders.token_secret_name


def download_artifacts(address: str, token: str, out_dir: Path, files: tuple[str, ...] = RESULT_FILES,
                       timeout: float = RPC_TIMEOUT_S) -> list[Path]:
    """DownloadArtifact each of `files` from the master at `address` into `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MasterStub(channel)
        for key in files:
            target = out_dir / key
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                expected, received = -1, 0
                with os.fdopen(fd, "wb") as out:
                    for chunk in stub.DownloadArtifact(pb.ArtifactRequest(key=key), timeout=timeout,
                                                       metadata=metadata):
                        if expected < 0:
                            expected = chunk.size
                        out.write(chunk.data)
                        received += len(chunk.data)
                    out.flush()
                    os.fsync(out.fileno())
                if expected >= 0 and received != expected:
                    raise ResultsError(f"{key}: received {received} bytes, the master announced {expected}; "
                                       f"run the command again")
                os.replace(tmp_name, target)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    raise ResultsNotWritten(f"the master has no {key} (is the experiment finished with a best trial? "
                                       f"{error.details()})") from None
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise ResultsError(f"the master refused the experiment's token for {key}: "
                                       f"{error.details()}") from None
                raise ResultsError(f"downloading {key} from the master failed: {code.name}: "
                                   f"{error.details()}") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
            written.append(target)
    return written


class PortForward:
    """A local TCP listener on 127.0.0.1 whose connections go to `port` of a pod through the API
    server's portforward subresource (what `kubectl port-forward` does), one forward per connection."""

    def __init__(self, core: Any, pod: str, namespace: str, port: int) -> None:
        self.core, self.pod, self.namespace, self.remote_port = core, pod, namespace, port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._forwards: list[Any] = []
        self._thread = threading.Thread(target=self._accept, name="results-port-forward", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        from kubernetes.stream import portforward

        while not self._closed.is_set():
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            try:
                forward = portforward(self.core.connect_get_namespaced_pod_portforward, self.pod, self.namespace,
                                      ports=str(self.remote_port))
            except Exception:
                local.close()
                continue
            self._forwards.append(forward)
            remote = forward.socket(self.remote_port)
            threading.Thread(target=_pump, args=(local, remote), daemon=True).start()
            threading.Thread(target=_pump, args=(remote, local), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for forward in self._forwards:
            with contextlib.suppress(Exception):
                forward.close()


def _pump(source: Any, sink: Any) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _forward(core: Any, pod: str, namespace: str, port: int) -> Iterator[PortForward]:
    forward = PortForward(core, pod, namespace, port)
    try:
        yield forward
    finally:
        forward.close()


def fetch_results(name: str, namespace: str, out_dir: Path, kubeconfig: str | None = None,
                  context: str | None = None) -> dict:
    """Fetch a finished experiment's best/ and trials.csv into `out_dir`; returns a summary
    {"phase", "best", "files"}. ResultsError for what the user can fix."""
    try:
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException
    except ImportError:
        raise ResultsError("morphml results needs the kubernetes client: pip install 'morphml[operator]'") from None
    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    except Exception as error:  # a missing or broken kubeconfig: the client's own message says which
        raise ResultsError(f"cannot load the kubeconfig{f' {kubeconfig}' if kubeconfig else ''}: {error}") from None
    with api_client:
        custom = client.CustomObjectsApi(api_client)
        core = client.CoreV1Api(api_client)
        where = f"NASExperiment {name} in namespace {namespace}"
        try:
            experiment: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                raise ResultsError(f"no {where} (kubectl get nasexperiments -n {namespace} lists them)") from None
            raise ResultsError(f"reading {where} failed: {error.status} {error.reason}") from None
        status: dict = experiment.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase not in FINISHED_PHASES:
            raise ResultsError(f"{where} has not finished (phase {phase}, trials {status.get('trialsSummary', '?')}); "
                               f"the best model is written when it finishes: wait for phase Succeeded "
                               f"(kubectl get nasexperiment {name} -n {namespace} -w)")
        try:
            secret = core.read_namespaced_secret(token_secret_name(name), namespace)
            token = base64.b64decode((secret.data or {})["token"]).decode()
        except ApiException as error:
            if error.status == 404:
                raise ResultsError(f"{where} has no token Secret {token_secret_name(name)} (the operator "
                                   f"creates it with the experiment)") from None
            raise ResultsError(f"cannot read the experiment's token Secret {token_secret_name(name)} in "
                               f"{namespace}: {error.status} {error.reason} (your account needs get on "
                               f"secrets there)") from None
        except KeyError:
            raise ResultsError(f"Secret {token_secret_name(name)} has no key token") from None
        pod_name = master_pod_name(name)
        try:
            pod = core.read_namespaced_pod(pod_name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise ResultsError(f"{where} has no master pod {pod_name} right now: the operator makes it "
                                   f"again within a few seconds (it serves the results until the experiment is "
                                   f"deleted); try again, or see kubectl describe nasexperiment {name} -n "
                                   f"{namespace}") from None
            raise ResultsError(f"reading pod {pod_name} failed: {error.status} {error.reason}") from None
        if (pod.status.phase if pod.status else None) != "Running":
            raise ResultsError(f"the master pod {pod_name} is not running (phase "
                               f"{pod.status.phase if pod.status else 'unknown'}); try again once it is")
        with _forward(core, pod_name, namespace, MASTER_PORT) as forward:
            deadline = time.monotonic() + WRITE_WAIT_S
            while True:
                try:
                    files = download_artifacts(f"127.0.0.1:{forward.port}", token, Path(out_dir))
                    break
                except ResultsNotWritten:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(1.0)
    return {"phase": phase, "best": status.get("best") or {}, "files": [str(f) for f in files]}
