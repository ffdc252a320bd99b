"""The MorphML master image (built from Dockerfile.master by tests/cluster/images.py) runs as a pod
on the real node: from the archive imported into the node's containerd, as UID 1000, with a
read-only root filesystem that the runtime really enforces (a write outside /tmp fails).

The image is built (if the tree changed) and imported before the first test, by conftest's
``morphml_images``.
"""

from __future__ import annotations

from typing import Any

import pytest

from . import images
from .kube import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

PROBE = """
import os, morphml
print("uid", os.getuid(), "gid", os.getgid())
try:
    open("/opt/probe", "w")
    print("root write: allowed")
except OSError as err:
    print("root write:", err.strerror)
with open("/tmp/probe", "w") as f:
    f.write("x")
print("tmp write: ok")
print("morphml from", os.path.dirname(morphml.__file__))
"""


@pytest.fixture(scope="module")
def master_in_node(real_kube: Kube, morphml_images: dict[str, images.BuiltImage]) -> str:
    return morphml_images["master"].ref


def _end(kube: Kube, ns: str, name: str, timeout: float = 120) -> tuple[str, str]:
    def ended() -> bool:
        phase = kube.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}", check=False).stdout
        return phase in ("Succeeded", "Failed")

    kube.wait_for(ended, timeout, 0.3, f"pod {name} to end")
    phase = kube.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}").stdout
    return phase, kube.kubectl("logs", name, "-n", ns).stdout


def _pod(name: str, ns: str, ref: str, container: dict[str, Any], read_only: bool = True) -> dict[str, Any]:
    security = {"readOnlyRootFilesystem": read_only, "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"restartPolicy": "Never", "securityContext": {"runAsNonRoot": True},
                     "containers": [{"name": "main", "image": ref, "imagePullPolicy": "Never",
                                     "securityContext": security,
                                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}], **container}],
                     "volumes": [{"name": "tmp", "emptyDir": {}}]}}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_master_image_runs_as_uid_1000_on_a_read_only_root(real_kube: Kube, real_namespace: str,
                                                                 master_in_node: str) -> None:
    ns = real_namespace
    # The image's own entrypoint (morphml) and default user.
    real_kube.apply(_pod("help", ns, master_in_node, {"args": ["--help"]}))
    phase, logs = _end(real_kube, ns, "help")
    assert phase == "Succeeded", logs
    assert "usage: morphml" in logs, logs
    real_kube.apply(_pod("probe", ns, master_in_node, {"command": ["python", "-c", PROBE]}))
    phase, logs = _end(real_kube, ns, "probe")
    assert phase == "Succeeded", logs
    assert "uid 1000 gid 1000" in logs, logs
    assert "root write: Read-only file system" in logs, logs
    assert "tmp write: ok" in logs, logs
    # The container ran from that image in the node's containerd.
    listing = real_kube.node.ctr("containers", "list")  # type: ignore[attr-defined]
    assert master_in_node in listing, listing
    # The same image with a writable root: the write goes through, so the refusal above is the
    # runtime enforcing readOnlyRootFilesystem, not a permission of the image.
    real_kube.apply(_pod("writable", ns, master_in_node, {"command": ["python", "-c", PROBE]}, read_only=False))
    phase, logs = _end(real_kube, ns, "writable")
    assert phase == "Succeeded", logs
    assert "root write: Read-only file system" not in logs, logs
