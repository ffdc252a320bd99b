"""Suite-wide pytest setup shared by every tier (unit, process, cluster).

Tier-specific fixtures live in the tier's own conftest (tests/process/, tests/cluster/).

Tests marked ``s3`` use the real SeaweedFS server (tests/s3server.py). When one is selected, its
``weed`` binary (a Go build of several minutes on a fresh machine) is built in a thread started
right after collection, beside the cluster tier's Kubernetes builds, and joined before the first
test runs, so no test's timeout includes it. Not under ``--collect-only``.
"""

import os

import pytest

# Two cores are shared by everything a test starts; one BLAS/torch thread per process keeps
# parallel worker processes from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "s3: needs the real S3-compatible server (SeaweedFS, tests/s3server.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("s3") for item in session.items):
        from tests import s3server

        s3server.prebuild()


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    from tests import s3server

    s3server.wait_prebuilt()
