"""Cluster tier fixtures: a real Kubernetes control plane and a process node, started once per session.

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
    - ``kube.pod_log(ns, name, container=None, previous=False)``, ``kube.namespace_logs(ns)``.
    - ``kube.process_node`` (pods run as local processes here; False on ``MORPHML_TEST_KUBECONFIG``),
      ``kube.node_name``, ``kube.bin_dir``.
- ``kube_namespace`` (function): a fresh namespace named after the test, deleted afterwards (without
  waiting); on failure its pods' container logs are printed with the component logs.
- ``kube_cluster`` (session): the ``ControlPlane`` (or ``ExistingCluster``) itself: ``.logs``,
  ``.timings``, ``.log_tails()``, ``.node_state_dir``.

The binaries are built (first run) and the control plane started right after collection, and only if a
selected test uses one of these fixtures, so test timeouts never include the build. With
``MORPHML_TEST_KUBECONFIG=/path/kubeconfig`` the suite uses that cluster instead and starts nothing
(kubectl and helm still come from the cached build). See docs/testing.md.

Imports: pytest, this package's modules (relative imports).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys

import pytest

from . import build, realnode_fixtures
from .controlplane import ControlPlane
from .kube import ExistingCluster, Kube
from .realnode_fixtures import real_kube, real_namespace, real_node_stop  # noqa: F401  (fixtures of test_real_node*.py)

CLUSTER_FIXTURES = {"kube", "kube_cluster", "kube_namespace"}
_state: dict = {}


def _needs_cluster(item) -> bool:
    return bool(CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())))


def _start(config) -> None:
    existing = os.environ.get("MORPHML_TEST_KUBECONFIG")
    try:
        bin_dir = build.ensure_built()
        if existing:
            cluster = ExistingCluster(existing, bin_dir)
        else:
            cluster = ControlPlane(bin_dir=bin_dir).start()
            config.add_cleanup(lambda: _stop(cluster))
            _stop_on_sigterm()
            print(f"\nmorphml: control plane ready in {cluster.timings.get('start_seconds', 0):.1f} s "
                  f"(kubeconfig {cluster.kubeconfig})", file=sys.stderr, flush=True)
        _state["cluster"] = cluster
    except Exception as exc:  # reported by every test that needs the cluster, not swallowed
        _state["error"] = exc


def _stop(cluster) -> None:
    cluster.stop()
    session = _state.get("session")
    # Keep the logs (etcd data, component and pod logs, ~60 MB) only when something failed.
    if session is not None and not session.testsfailed and not os.environ.get("MORPHML_KEEP_CLUSTER_STATE"):
        shutil.rmtree(cluster.workdir, ignore_errors=True)
    else:
        print(f"\nmorphml: control plane logs kept in {cluster.workdir / 'logs'}", file=sys.stderr)


def _stop_on_sigterm() -> None:
    """A SIGTERM to pytest (a CI timeout) unwinds like Ctrl-C so the cleanup still kills the cluster."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def interrupt(*_):
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, interrupt)


def pytest_sessionstart(session) -> None:
    _state["session"] = session
    realnode_fixtures.session_started(session)


def pytest_configure(config) -> None:
    _state["config"] = config
    realnode_fixtures.configure(config)


def pytest_collection_modifyitems(items) -> None:
    realnode_fixtures.collection_modifyitems(items)


def pytest_collection_finish(session) -> None:
    _state["session"] = session
    if any(_needs_cluster(item) for item in session.items) and "cluster" not in _state:
        _start(session.config)
    realnode_fixtures.collection_finish(session)


@pytest.fixture(scope="session")
def kube_cluster():
    if "cluster" not in _state and "error" not in _state:
        _start(_state["config"])
    if "error" in _state:
        raise _state["error"]
    cluster = _state["cluster"]
    cluster.check_alive()
    return cluster


@pytest.fixture(scope="session")
def kube(kube_cluster) -> Kube:
    return Kube(kube_cluster)


@pytest.fixture
def kube_namespace(kube, request) -> str:
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.extend(realnode_fixtures.failure_sections(item))
    if report.failed and _needs_cluster(item) and "cluster" in _state:
        cluster = _state["cluster"]
        report.sections.append(("control plane logs (tails)", cluster.log_tails(25)))
        namespace = getattr(item, "kube_namespace", None)
        if namespace:
            logs = Kube(cluster).namespace_logs(namespace)
            if logs:
                report.sections.append((f"pod logs in {namespace}", logs))
