"""Regenerates the code and type stubs for worker.proto (a development tool).

Run: `python -m morphml.distributed.proto.regenerate [OUT_DIR]` (default: this folder).
Writes worker_pb2.py and worker_pb2_grpc.py (grpcio-tools' protoc and gRPC plugin) and their
stubs worker_pb2.pyi and worker_pb2_grpc.pyi (mypy-protobuf's protoc plugins), so mypy checks
every use of a message or an RPC. Needs grpcio-tools and mypy-protobuf (both in the `test`
extra); nothing at runtime imports this module. It imports only the standard library and, when
called, grpc_tools.

protoc names the message module `worker_pb2` as a top-level module in the generated grpc code and
stub; we rewrite that import to the package-relative form so both work inside
`morphml.distributed.proto`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("worker_pb2.py", "worker_pb2_grpc.py", "worker_pb2.pyi", "worker_pb2_grpc.pyi")
# (file, what protoc writes, what the package needs)
_RELATIVE_IMPORTS = (
    ("worker_pb2_grpc.py", "import worker_pb2 as worker__pb2", "from . import worker_pb2 as worker__pb2"),
    ("worker_pb2_grpc.pyi", "import worker_pb2 as _worker_pb2", "from . import worker_pb2 as _worker_pb2"),
)


def _plugin(name: str) -> str:
    """Path of a protoc plugin script installed with this interpreter (mypy-protobuf's)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH: pip install mypy-protobuf")
    return found


def regenerate(out_dir: Path = PROTO_DIR, proto: Path = PROTO_DIR / "worker.proto") -> list[Path]:
    """Runs protoc on proto (worker.proto) into out_dir and fixes the imports; returns the files written."""
    import grpc_tools  # dev-only dependency, hence imported here
    from grpc_tools import protoc

    out_dir, proto = Path(out_dir), Path(proto)
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto.parent}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        str(proto),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    for name, generated, relative in _RELATIVE_IMPORTS:
        path = out_dir / name
        text = path.read_text()
        if generated not in text:
            raise RuntimeError(f"{path}: expected the line {generated!r} to rewrite; has the generator changed?")
        path.write_text(text.replace(generated, relative))
    return [out_dir / name for name in GENERATED]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR
    for written in regenerate(target):
        print(written)
