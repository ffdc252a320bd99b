"""Regenerates worker_pb2.py / worker_pb2_grpc.py from worker.proto (a development tool).

Run: `python -m morphml.distributed.proto.regenerate [OUT_DIR]` (default: this folder).
Needs grpcio-tools (the `test` extra); nothing at runtime imports this module.
The generated grpc module imports `worker_pb2` as a top-level module; we rewrite that import
to the package-relative form so the code works inside `morphml.distributed.proto`.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("worker_pb2.py", "worker_pb2_grpc.py")


def regenerate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Runs protoc on worker.proto into out_dir and fixes the import; returns the files."""
    from grpc_tools import protoc  # dev-only dependency
    import grpc_tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "worker.proto"),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_file = out_dir / "worker_pb2_grpc.py"
    text = grpc_file.read_text()
    text = text.replace("import worker_pb2 as worker__pb2", "from . import worker_pb2 as worker__pb2")
    grpc_file.write_text(text)
    return [out_dir / name for name in GENERATED]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for path in regenerate(target):
        print(path)
