"""Fixed search spaces shared by tests of more than one tier (imported as `tests.architectures`).

- `FIXED_CNN`: one architecture (every choice list has one entry), big enough that an epoch of
  digits takes a few seconds on the CPU: what the checkpoint-resume tests train (the process
  tier's tests/process/test_checkpoint_resume.py and the cluster's test_cluster_checkpoint_resume.py).

Imports: nothing.
"""

FIXED_CNN = [
    {"type": "conv2d", "filters": [32], "kernelSize": [3], "activation": ["relu"]},
    {"type": "conv2d", "filters": [32], "kernelSize": [3], "activation": ["relu"]},
    {"type": "maxpool", "poolSize": [2]},
    {"type": "flatten"},
    {"type": "dense", "units": [128], "activation": ["relu"]},
    {"type": "dropout", "rate": [0.2]},
]
