"""A hostPath volume binder for the real node: what a storage provisioner does, in the test process.

The node has no storage provisioner (no CSI driver, no local-path-provisioner: nothing could be
pulled), and an experiment's journal claim must bind before its master pod starts. ``HostPathBinder``
watches PersistentVolumeClaims and, for each Pending claim without a volume, creates a hostPath
PersistentVolume pre-bound to it (``claimRef``) on a fresh directory
``<root>/<namespace>/<claim>-<first 8 of the claim's uid>``, owned by UID/GID 1000 (hostPath ignores
``fsGroup``, and the master runs as 1000). Tests read the journal from that directory
(``tests.cluster.operator_trials.journal_file``), and may mount something over
``<root>/<namespace>`` before the claim exists (the full-disk test mounts a small tmpfs there).

It binds only claims without a ``storageClassName`` other than ``""`` or the default (the
experiment's claims name none) and leaves claims a test pre-bound to its own volume alone. Its
volumes use ``persistentVolumeReclaimPolicy: Retain``: the directories go with the session's
state directory.

Imports: the standard library and the ``kubernetes`` client (lazily, through ``Kube``).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

UID = GID = 1000


class HostPathBinder:
    """``start()`` a thread binding Pending claims to hostPath volumes under ``root``; ``stop()`` it."""

    def __init__(self, kube: Any, root: Path, interval: float = 0.3):
        self.kube = kube
        self.root = Path(root)
        self.interval = interval
        self.bound: dict[str, Path] = {}  # "namespace/claim" -> directory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def claim_dir(self, namespace: str, claim: str, uid: str) -> Path:
        return self.root / namespace / f"{claim}-{uid[:8]}"

    def start(self) -> HostPathBinder:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="hostpath-binder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.kube.api)
        while not self._stop.wait(self.interval):
            try:
                claims = core.list_persistent_volume_claim_for_all_namespaces(_request_timeout=10).items
                for claim in claims:
                    if claim.status.phase == "Pending" and not claim.spec.volume_name \
                            and not claim.metadata.deletion_timestamp \
                            and claim.spec.storage_class_name in (None, ""):
                        self._bind(core, claim)
            except Exception as error:  # the API server restarting, a namespace going: try again
                message = f"{type(error).__name__}: {error}"
                if not self.errors or self.errors[-1] != message:
                    self.errors.append(message)
                    print(f"morphml: hostpath binder: {message}", file=sys.stderr, flush=True)

    def _bind(self, core: Any, claim: Any) -> None:
        from kubernetes.client.exceptions import ApiException

        meta = claim.metadata
        key = f"{meta.namespace}/{meta.name}"
        name = f"hostpath-{meta.uid}"
        directory = self.claim_dir(meta.namespace, meta.name, meta.uid)
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, UID, GID)
        size = (claim.spec.resources.requests or {}).get("storage", "1Gi")
        volume = {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"morphml.test/hostpath": "true"}},
            "spec": {"capacity": {"storage": size}, "accessModes": list(claim.spec.access_modes or ["ReadWriteOnce"]),
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": claim.spec.storage_class_name or "",
                     "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta.namespace,
                                  "name": meta.name, "uid": meta.uid},
                     "hostPath": {"path": str(directory), "type": "Directory"}},
        }
        try:
            core.create_persistent_volume(volume, _request_timeout=10)
        except ApiException as error:
            if error.status != 409:  # 409: made on an earlier pass, the PV controller binds it
                raise
        self.bound[key] = directory
