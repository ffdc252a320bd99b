"""The images the real node runs: built from our Dockerfiles by buildah on a stand-in base, cached by input hash.

The first test that needs an image builds it (tests.cluster.images.ensure_image; the worker pulls
torch, several minutes cold), so these tests carry the build in their timeout; later ones find it
cached. Nothing is built unless one of these tests is selected. The hadolint check of both
Dockerfiles is tests/unit/test_chart.py::test_hadolint_is_clean.

Imports: pytest, the standard library, tests.cluster.images.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from . import images

pytestmark = pytest.mark.cluster

#: A cold worker build (torch and its CUDA libraries) plus the test itself.
BUILD_TIMEOUT = 3600


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The build inputs copied once: other work may edit the checkout while these tests run, and a
    cache-hit test must see the tree its images were built from (the key covers content, not place)."""
    dest = tmp_path_factory.mktemp("tree")
    images.snapshot_inputs(images.ROOT, dest)
    return dest


@pytest.fixture(scope="module")
def master_image(tree) -> images.BuiltImage:
    return images.ensure_image("master", root=tree)


@pytest.fixture(scope="module")
def worker_image(tree) -> images.BuiltImage:
    return images.ensure_image("worker", root=tree)


def archive_contents(archive: Path) -> tuple[dict, dict]:
    """(the index entry of the one image in an OCI archive, that image's config) read from the archive itself."""
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> dict:
            algorithm, hexdigest = digest.split(":", 1)
            member = tar.extractfile(f"blobs/{algorithm}/{hexdigest}")
            assert member is not None, f"{archive}: no blob {digest}"
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None, f"{archive}: no index.json"
        index = json.load(index_file)
        assert len(index["manifests"]) == 1, index
        entry = index["manifests"][0]
        manifest = blob(entry["digest"])
        return entry, blob(manifest["config"]["digest"])


def run_ok(ref: str, argv: list[str], timeout: float = 300) -> str:
    done = images.run_in_image(ref, argv, timeout=timeout)
    assert done.returncode == 0, (f"{argv} in {ref} exited {done.returncode}:\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("role", images.ROLES)
def test_archive_is_an_oci_image_named_for_the_node_running_morphml_as_uid_1000(role: str, request):
    image: images.BuiltImage = request.getfixturevalue(f"{role}_image")
    assert image.repository == f"morphml-{role}"
    assert image.ref == f"docker.io/library/morphml-{role}:{image.tag}"
    assert image.tag.startswith(images.project_version() + "-") and image.tag.endswith(image.key[:12])
    entry, config = archive_contents(image.archive)
    # ctr images import keeps a full reference as the image name; the kubelet resolves
    # `morphml-<role>:<tag>` to exactly this.
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == image.ref
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    settings = config["config"]
    assert settings["User"] == "1000:1000"
    assert settings["Entrypoint"] == ["morphml"]
    assert settings["WorkingDir"] == "/tmp"
    assert "HOME=/tmp" in settings["Env"]  # caches go to the /tmp emptyDir on a read-only root filesystem
    assert settings["Labels"][images.KEY_LABEL] == image.key
    assert images.image_config(image.ref)["User"] == "1000:1000"


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_master_image_runs_morphml_and_the_operator_as_uid_1000_without_torch(master_image):
    help_text = run_ok(master_image.ref, ["morphml", "--help"])
    assert "usage: morphml" in help_text and "master" in help_text and "worker" in help_text
    probe = textwrap.dedent("""
        import importlib.util, json, os
        import kopf, morphml, morphml_operator, morphml_operator.handlers
        import optuna  # spec.optimizer.algorithm tpe / nsga2 run in the master
        print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "home": os.environ["HOME"],
                          "torch": importlib.util.find_spec("torch") is not None,
                          "morphml": morphml.__file__}))
    """)
    facts = json.loads(run_ok(master_image.ref, ["python3", "-c", probe]).strip().splitlines()[-1])
    assert facts["uid"] == 1000 and facts["gid"] == 1000 and facts["home"] == "/tmp"
    assert facts["torch"] is False, "the master image must not carry torch"
    # An installed package, not the sources (those are deleted in the build).
    assert "/dist-packages/" in facts["morphml"] or "/site-packages/" in facts["morphml"], facts
    # The journal's default directory is writable by the pod's user.
    run_ok(master_image.ref, ["sh", "-c", "touch /var/lib/morphml/probe && rm /var/lib/morphml/probe"])


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_worker_image_trains_one_digits_epoch_on_cpu_as_uid_1000(worker_image):
    run_ok(worker_image.ref, ["morphml", "worker", "--help"])
    # As UID 1000 nothing outside /tmp (HOME) is writable, so this also shows training needs no other writes.
    probe = textwrap.dedent("""
        import json, os
        import torch
        import morphml.evaluation as evaluation
        arch = {
            "input_shape": [1, 8, 8], "num_classes": 10,
            "nodes": [
                {"id": "in", "op": "input", "params": {}},
                {"id": "conv", "op": "conv2d",
                 "params": {"filters": 16, "kernel_size": 3, "stride": 1, "activation": "relu"}},
                {"id": "pool", "op": "maxpool", "params": {"pool_size": 2}},
                {"id": "flat", "op": "flatten", "params": {}},
                {"id": "out", "op": "output", "params": {"units": 10}},
            ],
            "edges": [["in", "conv"], ["conv", "pool"], ["pool", "flat"], ["flat", "out"]],
        }
        spec = {"dataset": {"name": "digits"}, "epochs": 1, "batchSize": 64, "learningRate": 0.005,
                "optimizer": "adam"}
        metrics = evaluation.evaluate_architecture(arch, spec, device="cpu", seed=0)
        print(json.dumps({"uid": os.getuid(), "torch_cuda": torch.version.cuda, "metrics": metrics}))
    """)
    facts = json.loads(run_ok(worker_image.ref, ["python3", "-c", probe], timeout=600).strip().splitlines()[-1])
    assert facts["uid"] == 1000
    # PyPI's torch: built for CUDA (its libraries come as wheels), so no CUDA base image is needed.
    assert facts["torch_cuda"], facts
    metrics = facts["metrics"]
    assert metrics["epochs"] == 1 and metrics["device"] == "cpu"
    assert metrics["val_accuracy"] > 0.3, metrics  # ten classes: chance is 0.1


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_unchanged_tree_is_a_cache_hit(tree, master_image, worker_image):
    mtimes = {image.archive: image.archive.stat().st_mtime_ns for image in (master_image, worker_image)}
    started = time.monotonic()
    again = images.ensure_images(root=tree)
    elapsed = time.monotonic() - started
    assert all(image.cached for image in again.values()), again
    assert again["master"].archive == master_image.archive and again["worker"].archive == worker_image.archive
    assert {image.archive: image.archive.stat().st_mtime_ns for image in again.values()} == mtimes
    assert elapsed < 30, f"a cache hit took {elapsed:.1f} s"


def copy_inputs(source: Path, dest: Path) -> Path:
    for name in (*images.INPUT_FILES, *images.DOCKERFILES.values()):
        shutil.copy2(source / name, dest / name)
    for top in images.INPUT_DIRS:
        shutil.copytree(source / top, dest / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dest


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_changed_input_rebuilds_the_image(tree, master_image, tmp_path):
    changed = copy_inputs(tree, tmp_path)
    assert images.input_key("master", changed) == master_image.key
    marker = f"# changed by {__name__} at {time.time()}"
    init = changed / "runtime" / "morphml" / "__init__.py"
    init.write_text(init.read_text() + marker + "\n")
    rebuilt = images.ensure_image("master", root=changed)
    try:
        assert not rebuilt.cached and rebuilt.key != master_image.key and rebuilt.tag != master_image.tag
        assert rebuilt.archive.is_file() and rebuilt.archive != master_image.archive
        # The new image carries the change (a rebuild, not a retag).
        installed = run_ok(rebuilt.ref, ["python3", "-c", "import morphml; print(open(morphml.__file__).read())"])
        assert marker in installed
        # and the original is still cached.
        assert images.ensure_image("master", root=tree).cached
    finally:
        images.forget(rebuilt)


def test_input_key_covers_what_the_dockerfile_copies_and_nothing_else(tmp_path):
    tree = copy_inputs(images.ROOT, tmp_path)
    recipe = "r" * 64
    key = images.input_key("worker", tree, recipe)
    assert images.input_key("worker", tree, recipe) == key
    assert images.input_key("master", tree, recipe) != key
    assert images.input_key("worker", tree, "s" * 64) != key  # the base's recipe

    (tree / "runtime" / "morphml" / "__pycache__").mkdir(exist_ok=True)
    (tree / "runtime" / "morphml" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (tree / "operator" / "stray.egg-info").mkdir()
    (tree / "tests").mkdir()
    (tree / "tests" / "test_x.py").write_text("x = 1\n")  # not copied into the image
    assert images.input_key("worker", tree, recipe) == key

    changes = [
        lambda: (tree / "Dockerfile.worker").write_text((tree / "Dockerfile.worker").read_text() + "# x\n"),
        lambda: (tree / "operator" / "morphml_operator" / "new_module.py").write_text("X = 1\n"),
        lambda: (tree / "README.md").write_text("changed\n"),
        lambda: (tree / "pyproject.toml").chmod(0o755),
    ]
    seen = {key}
    for change in changes:
        change()
        new = images.input_key("worker", tree, recipe)
        assert new not in seen
        seen.add(new)


def test_stand_in_base_uses_the_hosts_debian_bookworm_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.test/debian bookworm main contrib\n"
        "deb-src http://mirror.test/debian bookworm main\n"
        "deb http://mirror.test/debian trixie main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.test/x\nSuites: nodistro\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.test/debian\nSuites: bookworm\nComponents: main\n")
    (tmp_path / "sources.list.d" / "google.list.disabled").write_text("deb http://skip.test/ bookworm main\n")
    text = images.debian_sources(tmp_path)
    assert text == (
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/k.gpg\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n")
    (tmp_path / "sources.list").write_text("deb http://mirror.test/debian trixie main\n")
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(images.ImageBuildError, match="no Debian bookworm"):
        images.debian_sources(tmp_path)


def test_prune_keeps_images_in_use_and_the_three_latest_per_repository_and_drops_day_old_ones():
    now = 1_000_000.0
    archives = Path("/cache/archives")

    def record(repository: str, tag: str, age: float) -> tuple[Path, float, str]:
        return archives / f"{repository}-{tag}.json", now - age, repository

    masters = [record("morphml-master", f"m{i}", age=60.0 * i) for i in range(6)]  # m0 newest
    workers = [record("morphml-worker", "w0", age=10.0), record("morphml-worker", "old", age=2 * 86400.0)]
    tests = [record("morphml-testworker", f"t{i}", age=60.0 * i) for i in range(3)]
    in_use = {masters[5][0]}  # the oldest master is the one this build uses

    doomed = set(images.prunable([*masters, *workers, *tests], in_use, now))

    # In use + the two newest others = three masters left; a day-old worker goes, the newest stays;
    # three test images are within the limit.
    assert doomed == {masters[2][0], masters[3][0], masters[4][0], workers[1][0]}
