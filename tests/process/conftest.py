"""Process-tier fixtures (helpers live in proc_helpers.py, a uniquely named module)."""

import pytest

from proc_helpers import Procs


@pytest.fixture
def procs(tmp_path):
    """Starts master/worker processes in their own process groups; kills them all afterwards."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()
