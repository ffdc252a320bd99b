"""MorphML: neural architecture search that runs on Kubernetes.

Layers, each importing only those above it:
space -> graph -> optimizers -> evaluation -> experiment (manifest) -> distributed -> cli.

`import morphml` must stay light: no torch, no grpc at import time.
"""

__version__ = "0.1.0"
