"""Checkpoints without processes (issue 12): the store (keys, durable atomic put), the checkpoint
file (save, and every way reading one is refused: truncated, corrupt, not torch, pickle, bad keys,
wrong architecture), the trainer's segments (a resumed run is the uninterrupted run, epoch for
epoch; a checkpoint it cannot use means a fresh start with checkpoint_fallback naming the key),
and the best model out (write_best + load_model give back the recorded val_accuracy)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from morphml.distributed.checkpoints import (  # noqa: E402
    ArtifactSettings,
    LocalStore,
    checkpoint_key,
    make_store,
    validate_key,
    write_best,
)
from morphml.evaluation import evaluate_architecture, load_model, validation_metrics  # noqa: E402
from morphml.evaluation.checkpoint_file import (  # noqa: E402
    CheckpointError,
    check_fits,
    read_checkpoint,
    save_checkpoint,
)
from morphml.evaluation.model import build_model  # noqa: E402
from morphml.evaluation.segments import Segment  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluation_trainer import DIGITS, mlp, small_cnn  # noqa: E402

pytestmark = pytest.mark.unit
EVAL = dict(DIGITS, epochs=4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- keys and the store

def test_keys_are_store_relative_and_bad_ones_are_refused_naming_them():
    assert checkpoint_key("t000001", 3) == "checkpoints/t000001/epoch-0003.pt"
    assert checkpoint_key("t000001", 3, attempt=2) == "checkpoints/t000001/epoch-0003.a2.pt"
    for bad in ["/etc/passwd", "checkpoints/../journal.db", "a//b", "a b", "", "x/./y", "caf\u00e9"]:
        with pytest.raises(ValueError, match="artifact key"):
            validate_key(bad)
    with pytest.raises(ValueError, match="epoch"):
        checkpoint_key("t1", -1)


def test_local_store_put_is_whole_and_durable_and_never_leaves_temporaries(tmp_path):
    store = make_store(ArtifactSettings(), tmp_path)
    assert isinstance(store, LocalStore) and store.describe() == f"local {tmp_path}"
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 5000)
    key = checkpoint_key("t7", 1, 1)
    store.put_file(key, src)
    assert store.exists(key)
    assert b"".join(store.open_chunks(key, 1000)) == src.read_bytes()
    assert [p.name for p in (tmp_path / "checkpoints" / "t7").iterdir()] == ["epoch-0001.a1.pt"]
    # A put that fails half way (the source vanishes) leaves the old file and no temporary.
    with pytest.raises(FileNotFoundError):
        store.put_file(key, tmp_path / "missing")
    assert b"".join(store.open_chunks(key)) == src.read_bytes()
    assert [p.name for p in (tmp_path / "checkpoints" / "t7").iterdir()] == ["epoch-0001.a1.pt"]
    with pytest.raises(KeyError):
        store.open_chunks("checkpoints/t7/epoch-0002.pt")
    store.delete(key)
    store.delete(key)  # missing is fine
    assert not store.exists(key)
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        store.put_file("../outside", src)


def test_artifact_settings_from_spec_names_the_field():
    assert ArtifactSettings.from_spec(None) == ArtifactSettings(checkpoint_interval=1, keep="best")
    assert ArtifactSettings.from_spec({"checkpointIntervalEpochs": 0, "keep": "all"}).checkpoint_interval == 0
    for spec, field in [({"checkpointIntervalEpochs": -1}, "checkpointIntervalEpochs"),
                        ({"checkpointIntervalEpochs": True}, "checkpointIntervalEpochs"),
                        ({"keep": "some"}, "keep"), ({"bogus": 1}, "bogus"), ("x", "spec.artifacts")]:
        with pytest.raises(ValueError, match=field):
            ArtifactSettings.from_spec(spec)


# --------------------------------------------------------------------------- the checkpoint file

def saved_checkpoint(tmp_path: Path, arch=None, epoch: int = 2, name: str = "c.pt") -> tuple[Path, object]:
    arch = arch or small_cnn()
    model = build_model(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.zeros(2, *arch["input_shape"])).sum().backward()
    optimizer.step()
    path = tmp_path / name
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=epoch, arch_hash="a" * 64,
                    data_generator=torch.Generator().manual_seed(1), train_loss=0.5)
    return path, model


def test_a_saved_checkpoint_reads_back_with_weights_only_and_fits_its_model(tmp_path):
    path, model = saved_checkpoint(tmp_path)
    state = read_checkpoint(path, sha256=sha(path), size=path.stat().st_size, arch_hash="a" * 64)
    assert state["epoch"] == 2 and state["rng_torch"].dtype == torch.uint8
    check_fits(state, build_model(small_cnn()))
    for key, tensor in model.state_dict().items():
        assert torch.equal(state["model"][key], tensor)
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_corrupt_and_foreign_files_are_refused_naming_the_file(tmp_path):
    path, _ = saved_checkpoint(tmp_path)
    digest, size = sha(path), path.stat().st_size
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint truncated.pt: .* bytes, the journal says .*truncated"):
        read_checkpoint(truncated, sha256=digest, size=size)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    with pytest.raises(CheckpointError, match=r"checkpoint corrupt.pt: sha256 .* does not match .*corrupt"):
        read_checkpoint(corrupt, sha256=digest, size=size)
    # Without a journaled digest the damage is still caught: torch cannot load it.
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 100)
    with pytest.raises(CheckpointError, match=r"checkpoint garbage\.pt: not a loadable torch file"):
        read_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(tmp_path / "absent.pt", name="checkpoints/t1/epoch-0001.pt")


class Payload:
    """An arbitrary object: what weights_only refuses to unpickle."""


def test_a_pickled_object_and_bad_keys_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "morphml-checkpoint-1", "payload": Payload()}, evil)
    with pytest.raises(CheckpointError, match="not a loadable torch file"):
        read_checkpoint(evil)
    path, _ = saved_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    for change, message in [(lambda s: s.pop("optimizer"), "key 'optimizer' is missing"),
                            (lambda s: s.update(epoch="2"), "key 'epoch' is a str, expected int"),
                            (lambda s: s.update(format="other-1"), "format 'other-1'"),
                            (lambda s: s.update(rng_torch=[1, 2]), "key 'rng_torch' is a list")]:
        broken = dict(state)
        change(broken)
        bad = tmp_path / "bad.pt"
        torch.save(broken, bad)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(bad, name="checkpoints/t1/epoch-0002.pt")
    with pytest.raises(CheckpointError, match=r"key 'arch_hash' .*\(wrong architecture\)"):
        read_checkpoint(path, arch_hash="b" * 64)


def test_a_checkpoint_of_another_architecture_does_not_fit(tmp_path):
    path, _ = saved_checkpoint(tmp_path)
    state = read_checkpoint(path)
    other = small_cnn()
    other["nodes"][1]["params"]["filters"] = 8  # same keys, other shapes
    with pytest.raises(CheckpointError,
                       match=r"key 'model\.layers\.1\.0\.weight' has shape \[16, 1, 3, 3\], the architecture needs"):
        check_fits(state, build_model(other))
    with pytest.raises(CheckpointError, match=r"key 'model' does not fit the architecture .*missing"):
        check_fits(state, build_model(mlp(64, 10)))


# --------------------------------------------------------------------------- training in segments

def run(seed=3, **segment):
    curve: list[tuple[int, float]] = []
    metrics = evaluate_architecture(small_cnn(), EVAL, device="cpu", seed=seed,
                                    progress=lambda step, m: curve.append((step, m["val_accuracy"])) or False,
                                    segment=Segment(task_id="t1", **segment) if segment else None)
    return metrics, curve


def test_a_resumed_segment_continues_the_uninterrupted_run_epoch_for_epoch(tmp_path):
    saved: dict[int, tuple[str, str, int]] = {}
    full, full_curve = run(attempt=1, save_epochs=(1, 2, 3, 4), checkpoint_dir=str(tmp_path),
                           on_checkpoint=lambda e, p, s, n: saved.update({e: (p, s, n)}))
    assert sorted(saved) == [1, 2, 3, 4] and full["epochs"] == 4
    for epoch, (path, digest, size) in saved.items():
        assert sha(Path(path)) == digest and Path(path).stat().st_size == size
        assert torch.load(path, weights_only=True)["epoch"] == epoch
    _, plain_curve = run()
    assert plain_curve == full_curve  # saving draws no random numbers
    path, digest, size = saved[2]
    resumed, resumed_curve = run(attempt=2, start_epoch=2, resume=path, resume_sha256=digest, resume_size=size)
    assert [s for s, _ in resumed_curve] == [3, 4]  # absolute epochs
    assert resumed_curve == full_curve[2:]
    assert resumed["val_accuracy"] == full["val_accuracy"] and resumed["epochs"] == 4
    assert resumed["resumed_from_epoch"] == 2 and "checkpoint_fallback" not in resumed
    # A segment that stops early (a rung) trains only to stop_epoch.
    rung, rung_curve = run(attempt=1, stop_epoch=1)
    assert rung["epochs"] == 1 and rung_curve == full_curve[:1]


def test_an_unusable_checkpoint_means_a_fresh_start_with_the_reason(tmp_path):
    saved: dict[int, tuple[str, str, int]] = {}
    fresh, fresh_curve = run(attempt=1, save_epochs=(2,), checkpoint_dir=str(tmp_path),
                             on_checkpoint=lambda e, p, s, n: saved.update({e: (p, s, n)}))
    path, digest, size = saved[2]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:500] + bytes([data[500] ^ 1]) + data[501:])
    key = "checkpoints/t1/epoch-0002.a1.pt"
    metrics, curve = run(attempt=2, start_epoch=2, resume=path, resume_key=key, resume_sha256=digest,
                         resume_size=size)
    assert metrics["checkpoint_fallback"].startswith(f"checkpoint {key}: sha256")
    assert [s for s, _ in curve] == [1, 2, 3, 4] and curve == fresh_curve  # exactly the fresh run
    assert metrics["val_accuracy"] == fresh["val_accuracy"] and metrics["epochs"] == 4

    # A whole, correctly hashed checkpoint of another architecture: refused by its shapes.
    other = small_cnn()
    other["nodes"][1]["params"]["filters"] = 8
    wrong, _ = saved_checkpoint(tmp_path, other, epoch=2, name="wrong.pt")
    metrics, curve = run(attempt=3, start_epoch=2, resume=str(wrong), resume_key=key, resume_sha256=sha(wrong),
                         resume_size=wrong.stat().st_size)
    assert "wrong architecture" in metrics["checkpoint_fallback"] and key in metrics["checkpoint_fallback"]
    assert curve == fresh_curve and metrics["val_accuracy"] == fresh["val_accuracy"]

    # The worker could not download it: the same fresh start, its reason passed on.
    metrics, curve = run(attempt=4, start_epoch=2, fallback=f"checkpoint {key}: download failed (NOT_FOUND: gone)")
    assert metrics["checkpoint_fallback"] == f"checkpoint {key}: download failed (NOT_FOUND: gone)"
    assert curve == fresh_curve


def echo_epochs(arch_json: dict, evaluation_spec: dict, device: str | None) -> dict:
    return {"val_accuracy": 0.5, "epochs": evaluation_spec["epochs"]}


def test_a_custom_evaluator_gets_the_segments_stop_epoch_as_its_epochs():
    spec = {"evaluator": f"{__name__}:echo_epochs", "epochs": 9}
    assert evaluate_architecture(small_cnn(), spec, segment=Segment(stop_epoch=3))["epochs"] == 3
    assert evaluate_architecture(small_cnn(), spec, segment=Segment(save_epochs=(1,)))["epochs"] == 9


# --------------------------------------------------------------------------- the best model out

def test_write_best_and_load_model_give_back_the_recorded_accuracy(tmp_path):
    saved: dict[int, tuple[str, str, int]] = {}
    metrics, _ = run(attempt=1, save_epochs=(4,), checkpoint_dir=str(tmp_path),
                     on_checkpoint=lambda e, p, s, n: saved.update({e: (p, s, n)}))
    store = LocalStore(tmp_path / "exp")
    key = checkpoint_key("t1", 4, 1)
    store.put_file(key, Path(saved[4][0]))
    best = {"trial_id": "t1", "metric": metrics["val_accuracy"], "arch_json": json.dumps(small_cnn()),
            "metrics": metrics, "checkpoint": key}
    written = write_best(tmp_path / "exp", best, store)
    assert written == ["best/model.pt", "best/architecture.json", "best/metrics.json"]
    model = load_model(tmp_path / "exp" / "best")
    assert not model.training
    assert validation_metrics(model, EVAL)["val_accuracy"] == metrics["val_accuracy"]
    doc = json.loads((tmp_path / "exp" / "best" / "metrics.json").read_text())
    assert doc["trial_id"] == "t1" and doc["checkpoint"] == key and doc["metrics"]["epochs"] == 4
    # The architecture.json of another model: refused naming the key.
    other = small_cnn()
    other["nodes"][4]["params"]["units"] = 32
    (tmp_path / "exp" / "best" / "architecture.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match=r"model.pt: key 'model\.layers\.\d+\.\d+\.weight' has shape"):
        load_model(tmp_path / "exp" / "best")
    # No checkpoint (checkpoints off): architecture and metrics only, no stale model.pt.
    assert write_best(tmp_path / "exp", dict(best, checkpoint=None), store) == ["best/architecture.json",
                                                                                  "best/metrics.json"]
    assert not (tmp_path / "exp" / "best" / "model.pt").exists()
    with pytest.raises(FileNotFoundError, match=r"model\.pt does not exist"):
        load_model(tmp_path / "exp" / "best")


def test_a_checkpoint_that_cannot_be_written_costs_the_checkpoint_not_the_trial(tmp_path, capfd):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the checkpoint folder should be")
    saved: list[int] = []
    metrics, curve = run(attempt=1, save_epochs=(1, 2), checkpoint_dir=str(blocked / "sub"),
                         on_checkpoint=lambda e, p, s, n: saved.append(e))
    assert saved == [] and metrics["epochs"] == 4 and [s for s, _ in curve] == [1, 2, 3, 4]
    assert "checkpoint after epoch 1 not saved" in capfd.readouterr().err
