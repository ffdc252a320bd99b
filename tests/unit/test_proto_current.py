"""Unit test: the committed worker_pb2*.py and their .pyi stubs are what
`python -m morphml.distributed.proto.regenerate` produces from worker.proto today, and every message
and field in worker.proto has a comment.

The comparison is by meaning, not byte for byte, so it does not depend on which grpcio-tools (protoc)
or mypy-protobuf release is installed: generators stamp their version into the code (`# Protobuf
Python Version`, `GRPC_GENERATED_VERSION`, the runtime version check) and reformat it between
releases. What must agree is what the proto decides:
- worker_pb2.py: the FileDescriptorProto it registers (messages, fields, numbers, types, services);
- worker_pb2_grpc.py: its classes and functions with their docstrings (the proto's comments), and
  the RPC table (each method's path, kind, and request/response types);
- the .pyi stubs: every public class and member name with its docstring.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from morphml.distributed.proto import regenerate

pytestmark = pytest.mark.unit

STALE = "is stale: run `python -m morphml.distributed.proto.regenerate` and commit the result"


def _registered_descriptor(pb2: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto that a generated *_pb2.py passes to AddSerializedFile, parsed."""
    for node in ast.walk(ast.parse(pb2.read_text())):
        if isinstance(node, ast.Call) and _dotted(node.func).endswith(".AddSerializedFile"):
            argument = node.args[0]
            assert isinstance(argument, ast.Constant) and isinstance(argument.value, bytes), ast.dump(argument)
            return descriptor_pb2.FileDescriptorProto.FromString(argument.value)
    raise AssertionError(f"{pb2}: no AddSerializedFile(b'...') call found")


def _doc(node: ast.AST) -> str:
    text = ast.get_docstring(node, clean=True) if isinstance(node, ast.ClassDef | ast.FunctionDef) else None
    return " ".join((text or "").split())


def _dotted(node: ast.AST) -> str:
    return ast.unparse(node) if isinstance(node, ast.Attribute | ast.Name) else ""


def _shape(source: Path, *, public_only: bool) -> set[tuple[str, ...]]:
    """What a generated module or stub says about the protocol, without the generator's own details.

    Classes and functions (by qualified name, with their docstrings), class-level names, and every
    call that refers to a message type (the RPC bindings: method path, kind, serializers).
    """
    shape: set[tuple[str, ...]] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                if public_only and node.name.startswith("_") and node.name != "__init__":
                    continue
                name = prefix + node.name
                shape.add(("def", name, _doc(node)))
                visit(node.body, name + ".")
            elif (prefix and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                  and not (public_only and node.target.id.startswith("_"))):
                shape.add(("member", prefix + node.target.id))

    tree = ast.parse(source.read_text())
    visit(tree.body, "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
            types = tuple(_dotted(a) for a in arguments if "worker__pb2." in _dotted(a))
            if types:
                paths = tuple(a.value for a in arguments if isinstance(a, ast.Constant) and isinstance(a.value, str))
                shape.add(("call", _dotted(node.func).rsplit(".", 1)[-1], *paths, *types))
    return shape


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    regenerate.regenerate(out)
    return out


def test_regenerate_writes_code_and_stubs_with_package_relative_imports(fresh: Path) -> None:
    assert sorted(p.name for p in fresh.iterdir() if p.is_file()) == sorted(regenerate.GENERATED)
    for name in ("worker_pb2_grpc.py", "worker_pb2_grpc.pyi"):
        text = (fresh / name).read_text()
        assert "from . import worker_pb2 as " in text, name
        assert not re.search(r"^import worker_pb2\b", text, re.MULTILINE), name
    for name in regenerate.GENERATED:
        assert (regenerate.PROTO_DIR / name).is_file(), f"{name} is not committed next to worker.proto"


def test_committed_message_module_registers_the_descriptor_of_worker_proto(fresh: Path) -> None:
    committed = _registered_descriptor(regenerate.PROTO_DIR / "worker_pb2.py")
    assert committed.name == "worker.proto"
    assert committed == _registered_descriptor(fresh / "worker_pb2.py"), f"worker_pb2.py {STALE}"


@pytest.mark.parametrize(("name", "public_only"), [
    ("worker_pb2_grpc.py", False),
    ("worker_pb2.pyi", True),
    ("worker_pb2_grpc.pyi", True),
])
def test_committed_grpc_module_and_stubs_match_worker_proto(fresh: Path, name: str, public_only: bool) -> None:
    committed = _shape(regenerate.PROTO_DIR / name, public_only=public_only)
    expected = _shape(fresh / name, public_only=public_only)
    assert committed, f"nothing recognised in {name}"
    missing, extra = sorted(expected - committed), sorted(committed - expected)
    assert not missing and not extra, f"{name} {STALE}\nmissing: {missing[:10]}\nunexpected: {extra[:10]}"


def test_version_stamps_do_not_change_the_comparison(fresh: Path, tmp_path: Path) -> None:
    """Another grpcio-tools release stamps other versions and reformats; the comparison ignores that."""
    for name in ("worker_pb2.py", "worker_pb2_grpc.py"):
        text = (fresh / name).read_text()
        text = re.sub(r"(Protobuf Python Version: )[\d.]+", r"\g<1>99.0.1", text)
        text = re.sub(r"(GRPC_GENERATED_VERSION = )'[\d.]+'", r"\g<1>'9.99.9'", text)
        text = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+", r"\g<1>99, 0, 1", text)
        text = text.replace("\n\n\n", "\n\n")
        assert text != (fresh / name).read_text(), f"{name}: the version stamps were not found"
        (tmp_path / name).write_text(text)
    assert _registered_descriptor(tmp_path / "worker_pb2.py") == _registered_descriptor(fresh / "worker_pb2.py")
    assert _shape(tmp_path / "worker_pb2_grpc.py", public_only=False) == _shape(
        fresh / "worker_pb2_grpc.py", public_only=False)


def test_a_changed_proto_is_detected(tmp_path: Path) -> None:
    """The comparison can fail: a proto with one more field and one more RPC differs in every file."""
    original = (regenerate.PROTO_DIR / "worker.proto").read_text()
    proto = original.replace("message LeaseRef {", "message LeaseRef {\n  // added\n  string extra_field = 99;", 1)
    rpc = "\n  // added\n  rpc ExtraCall(LeaseRef) returns (LeaseRef);"
    proto = proto.replace("service Master {", "service Master {" + rpc, 1)
    assert proto.count("// added") == original.count("// added") + 2
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "worker.proto").write_text(proto)
    out = tmp_path / "out"
    regenerate.regenerate(out, changed / "worker.proto")
    committed = regenerate.PROTO_DIR
    assert _registered_descriptor(out / "worker_pb2.py") != _registered_descriptor(committed / "worker_pb2.py")
    for name, public_only in (("worker_pb2_grpc.py", False), ("worker_pb2.pyi", True), ("worker_pb2_grpc.pyi", True)):
        assert _shape(out / name, public_only=public_only) != _shape(committed / name, public_only=public_only), name


def test_every_message_and_field_in_worker_proto_is_commented() -> None:
    lines = (regenerate.PROTO_DIR / "worker.proto").read_text().splitlines()
    declaration = re.compile(r"^\s*(message \w+|rpc \w+|((repeated|optional) )?[\w.]+ \w+ = \d+;|oneof \w+)")
    for i, line in enumerate(lines):
        if declaration.match(line) and not line.strip().startswith("oneof"):
            assert lines[i - 1].strip().startswith("//"), f"worker.proto line {i + 1} has no comment: {line.strip()}"
