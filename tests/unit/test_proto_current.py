"""Unit test: the committed worker_pb2*.py are what `python -m morphml.distributed.proto.regenerate`
produces from worker.proto today, and every message and field in worker.proto has a comment."""

import re
from pathlib import Path

import pytest

from morphml.distributed.proto import regenerate

pytestmark = pytest.mark.unit


def test_committed_generated_code_matches_worker_proto(tmp_path):
    fresh = regenerate.regenerate(tmp_path)
    for path in fresh:
        committed = regenerate.PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m morphml.distributed.proto.regenerate` and commit the result")


def test_every_message_and_field_in_worker_proto_is_commented():
    lines = (regenerate.PROTO_DIR / "worker.proto").read_text().splitlines()
    declaration = re.compile(r"^\s*(message \w+|rpc \w+|(repeated )?[\w.]+ \w+ = \d+;|oneof \w+)")
    for i, line in enumerate(lines):
        if declaration.match(line) and not line.strip().startswith("oneof"):
            assert lines[i - 1].strip().startswith("//"), f"worker.proto line {i + 1} has no comment: {line.strip()}"
