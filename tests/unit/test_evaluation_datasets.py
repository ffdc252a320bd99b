"""Datasets from spec.evaluation.dataset: shapes, deterministic splits, per-process cache, and
errors that name the field. dataset_shape and `import morphml.evaluation` never load torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from morphml.evaluation import EvaluationSpecError, clear_cache, dataset_shape, load_dataset

pytestmark = pytest.mark.unit


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_importing_evaluation_and_reading_dataset_shapes_does_not_import_torch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((20, 5), np.float32), y=np.arange(20) % 4)
    code = (
        "import sys, morphml.evaluation as ev\n"
        "assert 'torch' not in sys.modules\n"
        "assert ev.dataset_shape({'name': 'digits'}) == ((1, 8, 8), 10)\n"
        "assert ev.dataset_shape({'name': 'digits-hard'}) == ((1, 16, 16), 10)\n"
        "assert ev.dataset_shape({'name': 'synthetic', 'shape': [3, 4, 4], 'classes': 5}) == ((3, 4, 4), 5)\n"
        f"assert ev.dataset_shape({{'name': 'npz', 'path': {str(path)!r}}}) == ((5,), 4)\n"
        "assert ev.dataset_shape({'name': 'torchvision', 'torchvisionName': 'CIFAR10'}) == ((3, 32, 32), 10)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('clean')\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stdout


def test_digits_is_scaled_split_80_20_stratified_and_fixed():
    data = load_dataset({"name": "digits"})
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    total = len(data.x_train) + len(data.x_val)
    assert total == 1797
    assert abs(len(data.x_val) / total - 0.2) < 0.01
    assert set(np.unique(data.y_val)) == set(range(10))
    clear_cache()
    again = load_dataset({"name": "digits"})
    assert again is not data
    np.testing.assert_array_equal(again.y_val, data.y_val)
    np.testing.assert_array_equal(again.x_train, data.x_train)


def test_digits_hard_is_digits_upscaled_and_distorted_two_variants_per_image_with_digits_split():
    digits = load_dataset({"name": "digits"})
    hard = load_dataset({"name": "digits-hard"})
    assert hard.input_shape == (1, 16, 16) and hard.num_classes == 10
    assert hard.x_train.shape == (2 * len(digits.x_train), 1, 16, 16) and hard.x_train.dtype == np.float32
    assert hard.x_val.shape == (2 * len(digits.x_val), 1, 16, 16) and hard.y_val.dtype == np.int64
    # digits' own split, each original image giving its variants on its own side
    np.testing.assert_array_equal(hard.y_train, np.tile(digits.y_train, 2))
    np.testing.assert_array_equal(hard.y_val, np.tile(digits.y_val, 2))
    # the two variants of one image differ (random affine map and noise drawn per variant)
    n = len(digits.x_train)
    assert not np.allclose(hard.x_train[:n], hard.x_train[n:])
    assert 0.1 < hard.x_train.mean() < 0.3 and 0.2 < hard.x_train.std() < 0.6  # digit ink plus sigma-0.25 noise


def test_digits_hard_is_deterministic_given_its_seed():
    first = load_dataset({"name": "digits-hard"})
    clear_cache()
    again = load_dataset({"name": "digits-hard", "seed": 0})
    assert again is not first
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.x_val, first.x_val)
    other = load_dataset({"name": "digits-hard", "seed": 1})
    assert not np.allclose(other.x_train, first.x_train)
    np.testing.assert_array_equal(other.y_train, first.y_train)


def test_digits_hard_copies_set_the_variants_per_image_and_validation_copies_leave_training_alone():
    default = load_dataset({"name": "digits-hard"})
    explicit = load_dataset({"name": "digits-hard", "copies": 2, "validationCopies": 2})
    np.testing.assert_array_equal(explicit.x_train, default.x_train)  # the defaults are the arrays it always had
    np.testing.assert_array_equal(explicit.x_val, default.x_val)
    n_train, n_val = len(default.x_train) // 2, len(default.x_val) // 2
    wide = load_dataset({"name": "digits-hard", "validationCopies": 8})
    np.testing.assert_array_equal(wide.x_train, default.x_train)  # training variants are drawn first
    np.testing.assert_array_equal(wide.y_train, default.y_train)
    assert wide.x_val.shape == (8 * n_val, 1, 16, 16)
    np.testing.assert_array_equal(wide.y_val, np.tile(default.y_val[:n_val], 8))
    more = load_dataset({"name": "digits-hard", "copies": 3})
    assert more.x_train.shape == (3 * n_train, 1, 16, 16) and more.x_val.shape == (3 * n_val, 1, 16, 16)
    assert not np.allclose(more.x_train[2 * n_train:], more.x_train[:n_train])
    assert dataset_shape({"name": "digits-hard", "copies": 3}) == ((1, 16, 16), 10)


@pytest.mark.timeout(120)
def test_digits_hard_is_harder_than_digits_for_a_linear_model():
    """Its purpose: plain digits saturates (a linear model gets ~0.96); on digits-hard the same
    model falls far below, so architectures (and the methods searching them) separate."""
    from sklearn.linear_model import LogisticRegression

    def linear_accuracy(data):
        model = LogisticRegression(max_iter=300)
        model.fit(data.x_train.reshape(len(data.x_train), -1), data.y_train)
        return model.score(data.x_val.reshape(len(data.x_val), -1), data.y_val)

    easy = linear_accuracy(load_dataset({"name": "digits"}))
    hard = linear_accuracy(load_dataset({"name": "digits-hard"}))
    assert easy > 0.93
    assert hard < 0.75, f"digits-hard linear accuracy {hard:.3f}: not hard enough to separate search methods"


def test_loaded_datasets_are_cached_per_process():
    assert load_dataset({"name": "digits"}) is load_dataset({"name": "digits"})


def test_synthetic_has_requested_shape_classes_size_and_depends_on_seed():
    spec = {"name": "synthetic", "shape": [2, 4, 4], "classes": 3, "size": 300, "seed": 1}
    data = load_dataset(spec)
    assert data.input_shape == (2, 4, 4) and data.num_classes == 3
    assert len(data.x_train) + len(data.x_val) == 300
    assert set(np.unique(data.y_train)) == {0, 1, 2}
    other = load_dataset({**spec, "seed": 2})
    assert not np.array_equal(other.x_train, data.x_train)


def test_synthetic_flat_defaults():
    assert dataset_shape({"name": "synthetic"}) == ((1, 8, 8), 10)
    assert dataset_shape({"name": "synthetic", "shape": [12], "classes": 2}) == ((12,), 2)


def test_npz_with_explicit_train_and_validation_arrays(tmp_path):
    path = tmp_path / "explicit.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((30, 1, 6, 6)), y_train=np.arange(30) % 3,
             x_val=rng.random((9, 1, 6, 6)), y_val=np.arange(9) % 3)
    data = load_dataset({"name": "npz", "path": str(path)})
    assert data.input_shape == (1, 6, 6) and data.num_classes == 3
    assert len(data.x_train) == 30 and len(data.x_val) == 9
    assert data.x_train.dtype == np.float32 and data.y_val.dtype == np.int64


def test_npz_with_x_y_is_split_and_grey_images_get_a_channel(tmp_path):
    path = tmp_path / "xy.npz"
    np.savez(path, x=np.random.default_rng(0).random((50, 5, 5)), y=np.arange(50) % 5)
    data = load_dataset({"name": "npz", "path": str(path)})
    assert data.input_shape == (1, 5, 5) and data.num_classes == 5
    assert len(data.x_train) == 40 and len(data.x_val) == 10


@pytest.mark.parametrize(
    "spec,field,words",
    [
        (None, "spec.evaluation.dataset", "is required"),
        ({"name": "imagenet"}, "spec.evaluation.dataset.name",
         "'imagenet' is not one of digits, digits-hard, synthetic, npz, torchvision"),
        ({"name": "digits-hard", "seed": -1}, "spec.evaluation.dataset.seed", "-1 must be an integer >= 0"),
        ({"name": "digits-hard", "seed": "x"}, "spec.evaluation.dataset.seed", "'x' must be an integer >= 0"),
        ({"name": "digits-hard", "copies": 0}, "spec.evaluation.dataset.copies", "0 must be an integer from 1 to 64"),
        ({"name": "digits-hard", "validationCopies": True}, "spec.evaluation.dataset.validationCopies",
         "True must be an integer from 1 to 64"),
        ({"name": "digits-hard", "copies": 65}, "spec.evaluation.dataset.copies", "65 must be an integer from 1 to 64"),
        ({"name": "digits", "copies": 4}, "spec.evaluation.dataset.copies",
         "applies only to the digits-hard dataset, not digits"),
        ({"name": "npz"}, "spec.evaluation.dataset.path", "is required"),
        ({"name": "npz", "path": "/nonexistent/data.npz"}, "spec.evaluation.dataset.path", "does not exist"),
        ({"name": "synthetic", "classes": 1}, "spec.evaluation.dataset.classes", "must be an integer >= 2"),
        ({"name": "synthetic", "shape": [0, 2]}, "spec.evaluation.dataset.shape", "must be [C, H, W] or [F]"),
        ({"name": "torchvision"}, "spec.evaluation.dataset.torchvisionName", "is required"),
    ],
)
def test_bad_dataset_spec_names_the_field(spec, field, words):
    with pytest.raises(EvaluationSpecError) as info:
        dataset_shape(spec)
    assert str(info.value).startswith(field + ":")
    assert words in str(info.value)


def test_npz_with_wrong_keys_says_which_keys_it_has_and_expects(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, images=np.zeros((4, 3)), labels=np.zeros(4, dtype=int))
    with pytest.raises(EvaluationSpecError) as info:
        load_dataset({"name": "npz", "path": str(path)})
    text = str(info.value)
    assert text.startswith("spec.evaluation.dataset.path:")
    assert "['images', 'labels']" in text and "x_train, y_train, x_val, y_val" in text


def test_npz_that_is_not_an_archive_or_needs_pickle_is_refused(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(EvaluationSpecError, match=r"spec\.evaluation\.dataset\.path: .* is not a readable \.npz"):
        load_dataset({"name": "npz", "path": str(garbage)})
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=int))
    with pytest.raises(EvaluationSpecError, match=r"not a readable \.npz"):
        load_dataset({"name": "npz", "path": str(pickled)})


def test_npz_with_mismatched_lengths_or_float_labels_is_refused(tmp_path):
    path = tmp_path / "lengths.npz"
    np.savez(path, x=np.zeros((10, 4)), y=np.zeros(9, dtype=int))
    with pytest.raises(EvaluationSpecError, match=r"y has shape \[9\]; expected \[N\] with N=10"):
        load_dataset({"name": "npz", "path": str(path)})
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((10, 4)), y=np.zeros(10))
    with pytest.raises(EvaluationSpecError, match="non-negative integer class indices"):
        load_dataset({"name": "npz", "path": str(floats)})


@pytest.mark.timeout(60)
def test_torchvision_without_the_package_says_it_is_not_installed():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:  # with torchvision present, the error for a name it does not have is the case to pin
        with pytest.raises(EvaluationSpecError, match="torchvisionName: 'NoSuchSet' is not a dataset in torchvision"):
            load_dataset({"name": "torchvision", "torchvisionName": "NoSuchSet"})
        return
    with pytest.raises(EvaluationSpecError) as info:
        load_dataset({"name": "torchvision", "torchvisionName": "MNIST"})
    text = str(info.value)
    assert text.startswith("spec.evaluation.dataset.torchvisionName:")
    assert "torchvision package, which is not installed" in text
