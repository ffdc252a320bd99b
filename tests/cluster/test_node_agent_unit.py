"""Unit tests of the process node's pure string handling: $(VAR) expansion, mount-path and
Service-name rewriting, quantities. No cluster is started for these.

Imports: pytest and tests/cluster/node_agent.py (standard library only).
"""

import re

import pytest

from .node_agent import expand, parse_quantity, rewrite_mount_paths, service_host_patterns

pytestmark = pytest.mark.unit


def test_expand_follows_kubernetes_rules():
    env = {"A": "1", "POD_IP": "127.3.0.2"}
    assert expand("$(A)-$(POD_IP)", env) == "1-127.3.0.2"
    assert expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand("$$(A) is escaped", env) == "$(A) is escaped"
    assert expand("cost $5", env) == "cost $5"


MOUNTS = sorted([("/etc/morphml", "/L/cfg"), ("/etc/morphml/token", "/L/tok"), ("/var/lib/morphml", "/L/data")],
                key=lambda m: -len(m[0]))


@pytest.mark.parametrize("text, expected", [
    ("/etc/morphml/experiment.yaml", "/L/cfg/experiment.yaml"),
    ("/etc/morphml/token/token", "/L/tok/token"),
    ("--journal=/var/lib/morphml/journal.db", "--journal=/L/data/journal.db"),
    ("/etc/morphml", "/L/cfg"),
    ("a:/etc/morphml/x b", "a:/L/cfg/x b"),
    ("/srv/etc/morphml/x", "/srv/etc/morphml/x"),  # not at a path start
    ("/etc/morphml-other/x", "/etc/morphml-other/x"),  # a different directory
    ("/etc/morphmlx", "/etc/morphmlx"),
])
def test_mount_paths_are_rewritten_only_as_whole_path_prefixes(text, expected):
    assert rewrite_mount_paths(text, MOUNTS) == expected


def test_rewritten_paths_are_not_rewritten_again():
    # A mount at /tmp while the local directories themselves live under /tmp.
    mounts = [("/tmp", "/tmp/agent/pod/volumes/tmp"), ("/etc/morphml/token", "/tmp/agent/pod/volumes/token")]
    assert rewrite_mount_paths("--token-file /etc/morphml/token/token", mounts) == \
        "--token-file /tmp/agent/pod/volumes/token/token"
    assert rewrite_mount_paths("/tmp/x /etc/morphml/token", mounts) == \
        "/tmp/agent/pod/volumes/tmp/x /tmp/agent/pod/volumes/token"


def _rewrite(text: str, same_namespace: bool = True) -> str:
    for pattern in service_host_patterns("master", "exp", same_namespace):
        text = pattern.sub(lambda m: "IP" + (":" + next(g for g in m.groups() if g) if any(m.groups()) else ""),
                           text)
    return text


@pytest.mark.parametrize("text, expected", [
    ("master:50051", "IP:50051"),
    ("master.exp:50051", "IP:50051"),
    ("master.exp.svc:50051", "IP:50051"),
    ("master.exp.svc.cluster.local:50051", "IP:50051"),
    ("http://master.exp.svc.cluster.local/health", "http://IP/health"),
    ("http://master/health", "http://IP/health"),
    ("http://master:80/x", "http://IP:80/x"),
    ("master.exp.svc.cluster.local", "IP"),
    # The bare name is left alone where it is not clearly a host.
    ("master", "master"),
    ("morphml master /etc/x", "morphml master /etc/x"),
    ("master-0:50051", "master-0:50051"),
    ("my-master:50051", "my-master:50051"),
    ("master.other:50051", "master.other:50051"),
    ("master.exp.example.com", "master.exp.example.com"),
])
def test_service_names_match_only_as_hosts(text, expected):
    assert _rewrite(text) == expected


def test_bare_service_name_only_from_its_own_namespace():
    assert _rewrite("master:50051", same_namespace=False) == "master:50051"
    assert _rewrite("master.exp:50051", same_namespace=False) == "IP:50051"


@pytest.mark.parametrize("value, expected", [("8", 8), ("500m", 0.5), ("1Gi", 2**30), ("2k", 2000), ("1e3", 1000)])
def test_quantities(value, expected):
    assert parse_quantity(value) == pytest.approx(expected)


def test_bad_quantity_names_the_value():
    with pytest.raises(ValueError, match=re.escape("'12XB'")):
        parse_quantity("12XB")
