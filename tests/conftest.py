"""Suite-wide pytest setup shared by every tier (unit, process, cluster).

Tier-specific fixtures live in the tier's own conftest (tests/process/, tests/cluster/).
"""

import os

# Two cores are shared by everything a test starts; one BLAS/torch thread per process keeps
# parallel worker processes from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
