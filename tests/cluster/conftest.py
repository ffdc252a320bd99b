"""Cluster tier fixtures: a real Kubernetes control plane and a real node, started once per session.

Fixtures (use these in tests/cluster/test_*.py):

- ``kube`` (session): a ``tests.cluster.kube.Kube`` with
    - ``kube.kubeconfig``: admin kubeconfig path (system:masters); ``kube.env``: os.environ plus
      ``KUBECONFIG`` and kubectl/helm on ``PATH`` (give it to an operator subprocess).
    - ``kube.kubectl(*args, input=None, check=True, timeout=60) -> CompletedProcess`` (text; raises
      AssertionError with stdout/stderr when it fails and check), ``kube.kubectl_json(*args)``,
      ``kube.apply(dict | list | yaml_text, namespace=None)``, ``kube.helm(*args, check=True, timeout=180)``.
    - ``kube.api`` (kubernetes ApiClient), ``kube.core``, ``kube.apps``, ``kube.rbac``, ``kube.custom``,
      ``kube.client_with_token(token)``.
    - ``kube.wait_for(predicate, timeout, interval, message)``, ``kube.pods(ns, selector)``,
      ``kube.pod_ready(pod)``, ``kube.wait_pods_ready(ns, selector, count, timeout)``.
    - ``kube.pod_log(ns, name, container=None, previous=False)`` (``kubectl logs``), ``kube.namespace_logs(ns)``.
    - ``kube.node``: the ``tests.cluster.node.RealNode`` (``.ctr(...)``, ``.images["testbox"]``,
      ``.ip``, ``.import_image(archive)``); None on ``MORPHML_TEST_KUBECONFIG``. ``kube.binder``: the
      hostPath volume binder (``.root``: claims bind to ``<root>/<namespace>/<claim>-<uid8>``).
      ``kube.node_name``, ``kube.bin_dir``.
    - Pod IPs are reachable from the test process (the host is on the node's pod bridge).
- ``kube_namespace`` (function): a fresh namespace named after the test, deleted afterwards (without
  waiting); on failure its pods' container logs are printed with the component logs.
- ``kube_cluster`` (session): the ``ControlPlane`` (or ``ExistingCluster``) itself: ``.logs``,
  ``.timings``, ``.log_tails()``.
- ``morphml_images`` (session): ``{"master": BuiltImage, "testworker": BuiltImage}`` built (or
  cached) for this tree and imported into the node (``tests.cluster.images``): the master image,
  and the test image (the master image plus tests/cluster/operator_trials.py on PYTHONPATH, for
  worker pods that run the tests' ``sleep_epochs`` evaluator; seconds to import).
- ``worker_image`` (session): the ``morphml-worker`` image (torch: 2.9 GB, imported in ~1.5 min), only
  for tests that train for real.
- ``operator`` (module): the chart installed in its own namespace with the built images (the
  operator a container of the master image); yields (namespace, operator pod name).
- ``real_kube`` / ``real_namespace``: ``kube`` / ``kube_namespace`` for tests that need the suite's
  own node (``ctr``, the host's view); skipped on ``MORPHML_TEST_KUBECONFIG``.
- ``real_node_stop`` (function): stops the session's node, returns what it left on the host.

The binaries are built (first run) and the control plane and node started right after collection,
and only if a selected test uses one of these fixtures, so test timeouts never include the build.
Not under ``--collect-only``. With ``MORPHML_TEST_KUBECONFIG=/path/kubeconfig`` the suite uses that
cluster instead and starts nothing (kubectl and helm still come from the cached build); the images
must then be available to that cluster's nodes under the names ``morphml_images`` reports. See
docs/testing.md.

Imports: pytest, this package's modules (relative imports).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import build, images, operator_trials, realnode_fixtures
from .kube import ExistingCluster, Kube

CLUSTER_FIXTURES = {"kube", "kube_cluster", "kube_namespace", "real_kube", "real_namespace", "real_node_stop",
                    "morphml_images", "worker_image", "operator"}
CHART = Path(__file__).resolve().parents[2] / "helm" / "morphml"
_state: dict[str, Any] = {}


def _needs_cluster(item: pytest.Item) -> bool:
    # These fixtures are defined here, so only tests under tests/cluster/ can get them: a test
    # elsewhere with a fixture of its own of the same name (a unit test's fake `kube`) must not
    # start the control plane and the node for a unit-only run.
    here = Path(__file__).resolve().parent
    return here in Path(str(item.path)).resolve().parents and bool(
        CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())))


def _image_roles(items: list[pytest.Item]) -> list[str]:
    """The images the selected tests need: "master" (with the test image) and/or "worker"."""
    names: set[str] = set()
    for item in items:
        names |= set(getattr(item, "fixturenames", ()))
    return (["master"] if names & {"morphml_images", "operator", "worker_image"} else []) + (
        ["worker"] if "worker_image" in names else [])


def _build_images(roles: list[str]) -> None:
    """Build (or find cached) the images of ``roles`` into ``_state["images"]``; a failure goes to
    ``_state["images_error"]`` (the image fixtures raise it)."""
    try:
        t0 = time.monotonic()
        built = dict(images.ensure_images(roles))
        built["testworker"] = images.ensure_test_image(built["master"])
        _state["images"] = built
        _state["images_seconds"] = time.monotonic() - t0
    except Exception as exc:
        _state["images_error"] = exc


def _start(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The cluster, and the images the selected tests need, before the first test: test timeouts
    never include a build, a node start or an image import. The images build in a thread beside
    the binaries' build and the node's start (on a fresh machine: pip downloads and buildah beside
    the go builds), then go into the node's containerd."""
    roles = _image_roles(items)
    builder = None
    if roles and os.geteuid() == 0:
        builder = threading.Thread(target=_build_images, args=(roles,), name="image-build", daemon=True)
        builder.start()
    _start_cluster(config)
    if builder is not None:
        builder.join()
    node = realnode_fixtures.node()
    if node is not None and "images" in _state:
        t0 = time.monotonic()
        try:
            for built in _state["images"].values():
                _import(node, built)
        except Exception as exc:
            _state["images_error"] = exc
        print(f"\nmorphml: images ready in {_state.get('images_seconds', 0):.1f} s, imported in "
              f"{time.monotonic() - t0:.1f} s ({', '.join(i.ref for i in _state['images'].values())})",
              file=sys.stderr, flush=True)


def _start_cluster(config: pytest.Config) -> None:
    existing = os.environ.get("MORPHML_TEST_KUBECONFIG")
    try:
        if existing:
            _state["cluster"] = ExistingCluster(existing, build.ensure_built())
            return
        realnode_fixtures.start(config)
        _state["cluster"] = realnode_fixtures.plane()
    except Exception as exc:  # reported by every test that needs the cluster, not swallowed
        _state["error"] = exc


def pytest_sessionstart(session: pytest.Session) -> None:
    _state["session"] = session
    realnode_fixtures.session_started(session)


def pytest_configure(config: pytest.Config) -> None:
    _state["config"] = config
    realnode_fixtures.configure(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    realnode_fixtures.collection_modifyitems(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    _state["session"] = session
    if session.config.option.collectonly:
        return  # listing tests starts nothing
    if any(_needs_cluster(item) for item in session.items) and "cluster" not in _state:
        _start(session.config, session.items)


@pytest.fixture(scope="session")
def kube_cluster() -> Any:
    if "cluster" not in _state and "error" not in _state:
        _start_cluster(_state["config"])
    if "error" in _state:
        raise _state["error"]
    cluster = _state["cluster"]
    cluster.check_alive()
    node = realnode_fixtures.node()
    if node is not None:
        node.check_alive()
    elif not isinstance(cluster, ExistingCluster):
        raise RuntimeError("the real node was stopped (a real_node_teardown test ran before this one)")
    return cluster


@pytest.fixture(scope="session")
def kube(kube_cluster: Any) -> Kube:
    kube = Kube(kube_cluster)
    kube.node = realnode_fixtures.node()
    kube.binder = realnode_fixtures.binder()
    return kube


@pytest.fixture
def kube_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{os.urandom(4).hex()}"  # 8 hex digits: parametrized tests share the base
    kube.cluster.check_alive()  # a dead component fails here with its log, not as a timeout later
    kube.kubectl("create", "namespace", name)
    # Pods need the namespace's default ServiceAccount, made by a controller a moment later.
    kube.wait_for(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
                  30, 0.1, f"ServiceAccount default in {name}")
    request.node.kube_namespace = name
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def real_kube(kube: Kube) -> Kube:
    if kube.node is None:
        pytest.skip("needs the suite's own node (its containerd and host), not MORPHML_TEST_KUBECONFIG's cluster")
    return kube


@pytest.fixture
def real_namespace(real_kube: Kube, kube_namespace: str) -> str:
    return kube_namespace


@pytest.fixture
def real_node_stop(real_kube: Kube) -> Any:
    """``stop()`` of the session's node, for the teardown tests."""
    return realnode_fixtures.stop


def _import(node: Any, built: images.BuiltImage) -> None:
    if built.ref not in _state.setdefault("imported", set()):
        node.import_image(built.archive)
        _state["imported"].add(built.ref)


def _image(kube: Kube, role: str) -> images.BuiltImage:
    """The session's image of ``role``, built and imported before the tests (or now, when a test
    asked for it without the collection seeing it)."""
    if "images_error" in _state:
        raise _state["images_error"]
    built = _state.setdefault("images", {})
    if role not in built:
        if role == "testworker":
            built["testworker"] = images.ensure_test_image(_image(kube, "master"))
        else:
            built[role] = images.ensure_image(role)
    if kube.node is not None:
        _import(kube.node, built[role])
    return built[role]


@pytest.fixture(scope="session")
def morphml_images(kube: Kube) -> dict[str, images.BuiltImage]:
    """The master and test images, built (or cached) for this tree, in the node's containerd."""
    found = {"master": _image(kube, "master"), "testworker": _image(kube, "testworker")}
    operator_trials.IMAGES["testworker"] = found["testworker"].ref
    return found


@pytest.fixture(scope="session")
def worker_image(kube: Kube) -> images.BuiltImage:
    """The worker image (torch), built (or cached) for this tree, in the node's containerd."""
    worker = _image(kube, "worker")
    operator_trials.IMAGES["worker"] = worker.ref
    return worker


@pytest.fixture(scope="module")
def operator(kube: Kube, morphml_images: dict[str, images.BuiltImage]) -> Iterator[tuple[str, str]]:
    """The chart installed in its own namespace with the built master image; yields (namespace, pod name).

    ``workerImage.tag`` is this tree's worker tag (computed, not built: experiments that train for
    real name ``worker_image.ref`` in ``spec.workers.image``, the others the test image)."""
    namespace = f"morphml-system-{os.urandom(2).hex()}"
    kube.kubectl("create", "namespace", namespace)
    kube.wait_for(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                       check=False).returncode == 0, 30, 0.1, "the default ServiceAccount")
    try:
        # pullPolicy Never: the images are in the node's containerd or the pods fail at once
        # (nothing is pulled from anywhere).
        kube.helm("install", "morphml", str(CHART), "--namespace", namespace,
                  "--set", f"image.tag={morphml_images['master'].tag}",
                  "--set", f"workerImage.tag={images.image_tag('worker')}",
                  "--set", "image.pullPolicy=Never",
                  "--set", "operator.statusIntervalSeconds=2", "--set", "operator.postingLevel=WARNING",
                  "--wait", "--timeout", "180s", timeout=240)
        pods = kube.wait_pods_ready(namespace, "app.kubernetes.io/component=operator", 1, timeout=60)
        yield namespace, pods[0]["metadata"]["name"]
    finally:
        kube.helm("uninstall", "morphml", "--namespace", namespace, "--wait", "--timeout", "60s", check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _needs_cluster(item) and "cluster" in _state:
        cluster = _state["cluster"]
        node = realnode_fixtures.node()
        tails = (node.log_tails(25) + "\n" if node is not None else "") + cluster.log_tails(15)
        report.sections.append(("cluster logs (tails)", tails))
        namespace = getattr(item, "kube_namespace", None)
        if namespace:
            logs = Kube(cluster).namespace_logs(namespace)
            if logs:
                report.sections.append((f"pod logs in {namespace}", logs))
