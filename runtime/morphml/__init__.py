"""MorphML: neural architecture search that runs on Kubernetes.

Layers, each importing only those before it (tests/unit/test_import_layers.py checks it):
ops -> graph -> space -> mutation -> optimizers -> evaluation -> experiment (manifest) ->
distributed -> results / cli.

The package root re-exports the search-space API the way MorphML 1.0 scripts import it
(`from morphml import SearchSpace, Layer`); optimizers stay in `morphml.optimizers`, as in 1.0.
`import morphml` must stay light: pure Python, no torch, no grpc at import time.
"""

from morphml.space import Block, Layer, SearchSpace, SearchSpaceError

__version__ = "0.1.0"

__all__ = ["Block", "Layer", "SearchSpace", "SearchSpaceError", "__version__"]
