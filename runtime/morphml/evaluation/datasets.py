"""Datasets a trial trains on, read from `spec.evaluation.dataset`.

- digits: scikit-learn's bundled 8x8 digits (no network), pixels scaled to [0, 1], shape [1, 8, 8],
  10 classes, a fixed stratified 80/20 split (seed 0).
- digits-hard: {seed, copies, validationCopies}; the same bundled digits made harder, for
  benchmarks where search methods separate (plain digits saturates near 0.98-0.99 for most
  architectures): each 8x8 image is upscaled to 16x16 (shape [1, 16, 16], 10 classes) through a
  random affine map (rotation up to +-20 degrees, scale 0.85-1.1 of a 12x12 digit, shift up to +-2
  pixels; bilinear), then Gaussian noise (sigma 0.25) is added (a linear model gets ~0.35 where it
  gets ~0.96 on digits). The split is digits' own (stratified 80/20, seed 0, by original image, so
  no image has variants on both sides); every original training image gives `copies` variants
  (default DIGITS_HARD_COPIES, 2) and every validation image `validationCopies` (default:
  `copies`). More copies make an epoch more steps of fresh variants and the validation accuracy
  less noisy (718 validation examples by default, a standard error of about 0.014 at accuracy 0.84;
  8 copies, 2872 examples: about 0.007). Deterministic given `seed` (default 0) and the copies: the
  same settings, the same arrays; the defaults give the arrays digits-hard always had (`seed` is
  for the Python API; the CRD has no such field, so a manifest gets seed 0).
- synthetic: {shape, classes, size, seed}; each class has a fixed random pattern and samples are
  that pattern plus noise, so a small model learns it in a few epochs.
- npz: {path}; arrays x_train/y_train/x_val/y_val, or x/y that are split 80/20 (seed 0).
  Loaded with allow_pickle=False.
- torchvision: {torchvisionName, root}; needs the torchvision package and, for a first download,
  network access from the worker.

`dataset_shape(spec)` answers (input_shape, num_classes) without importing torch for digits,
synthetic and npz (the master uses it to complete sampled graphs). Arrays are numpy
(float32 inputs, int64 labels); the trainer turns them into tensors. Loaded datasets are cached
per process.

Imports numpy; scikit-learn and torchvision only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from morphml.evaluation.errors import EvaluationSpecError

DATASET_NAMES = ("digits", "digits-hard", "synthetic", "npz", "torchvision")
FIELD = "spec.evaluation.dataset"
SPLIT_SEED = 0
VAL_FRACTION = 0.2
# digits-hard: the variants' geometry and noise (see the module docstring).
DIGITS_HARD_SIZE = 16
DIGITS_HARD_COPIES = 2
DIGITS_HARD_MAX_COPIES = 64  # the CRD's maximum of copies and validationCopies
DIGITS_HARD_ROTATION_DEGREES = 20.0
DIGITS_HARD_SCALE = (0.85, 1.1)  # times the base zoom, which maps the 8x8 digit onto 12x12 pixels
DIGITS_HARD_SHIFT = 2.0  # pixels of the 16x16 output, each axis
DIGITS_HARD_NOISE = 0.25  # standard deviation of the added Gaussian noise (pixels are in [0, 1])
SYNTHETIC_DEFAULTS = {"shape": [1, 8, 8], "classes": 10, "size": 1000, "seed": 0}

# Shapes of common torchvision datasets, so dataset_shape needs neither torch nor a download.
TORCHVISION_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "MNIST": ((1, 28, 28), 10),
    "FashionMNIST": ((1, 28, 28), 10),
    "KMNIST": ((1, 28, 28), 10),
    "CIFAR10": ((3, 32, 32), 10),
    "CIFAR100": ((3, 32, 32), 100),
    "SVHN": ((3, 32, 32), 10),
}


@dataclass(frozen=True)
class Dataset:
    """Train/validation arrays: x as float32 [N, *input_shape], y as int64 class indices."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


_CACHE: dict[str, Dataset] = {}


def _dataset_spec(spec: Any) -> dict:
    if spec is None:
        raise EvaluationSpecError(FIELD, f"is required: an object with name one of {', '.join(DATASET_NAMES)}")
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise EvaluationSpecError(FIELD, f"must be an object with a name, got {spec!r}")
    name = spec.get("name")
    if name not in DATASET_NAMES:
        raise EvaluationSpecError(f"{FIELD}.name", f"{name!r} is not one of {', '.join(DATASET_NAMES)}")
    for key in ("copies", "validationCopies"):  # as the CRD's rules say
        if spec.get(key) is not None and name != "digits-hard":
            raise EvaluationSpecError(f"{FIELD}.{key}", f"applies only to the digits-hard dataset, not {name}")
    return dict(spec)


def _synthetic_settings(spec: Mapping) -> tuple[tuple[int, ...], int, int, int]:
    def get(key: str) -> Any:
        value = spec.get(key)
        return SYNTHETIC_DEFAULTS[key] if value is None else value

    shape, classes, size, seed = get("shape"), get("classes"), get("size"), get("seed")
    if (
        not isinstance(shape, (list, tuple)) or len(shape) not in (1, 3)
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
    ):
        raise EvaluationSpecError(f"{FIELD}.shape", f"{shape!r} must be [C, H, W] or [F] with positive integers")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise EvaluationSpecError(f"{FIELD}.classes", f"{classes!r} must be an integer >= 2")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2 * classes:
        raise EvaluationSpecError(f"{FIELD}.size", f"{size!r} must be an integer >= 2 * classes ({2 * classes})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvaluationSpecError(f"{FIELD}.seed", f"{seed!r} must be an integer")
    return tuple(shape), classes, size, seed


def _npz_path(spec: Mapping) -> str:
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        raise EvaluationSpecError(f"{FIELD}.path", "is required for the npz dataset: a path to a .npz file")
    if not os.path.isfile(path):
        raise EvaluationSpecError(f"{FIELD}.path", f"{path!r} does not exist or is not a file")
    return path


def _torchvision_name(spec: Mapping) -> str:
    name = spec.get("torchvisionName")
    if not isinstance(name, str) or not name:
        raise EvaluationSpecError(
            f"{FIELD}.torchvisionName",
            f"is required for the torchvision dataset, e.g. one of {', '.join(TORCHVISION_SHAPES)}",
        )
    return name


def dataset_shape(dataset_spec: Any) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of a dataset; no torch for digits, synthetic and npz."""
    spec = _dataset_spec(dataset_spec)
    name = spec["name"]
    if name == "digits":
        return (1, 8, 8), 10
    if name == "digits-hard":
        _digits_hard_seed(spec)
        _digits_hard_copies(spec)
        return (1, DIGITS_HARD_SIZE, DIGITS_HARD_SIZE), 10
    if name == "synthetic":
        shape, classes, _, _ = _synthetic_settings(spec)
        return shape, classes
    if name == "torchvision":
        tv_name = _torchvision_name(spec)
        if tv_name in TORCHVISION_SHAPES:
            return TORCHVISION_SHAPES[tv_name]
    dataset = load_dataset(spec)
    return dataset.input_shape, dataset.num_classes


def load_dataset(dataset_spec: Any) -> Dataset:
    """Load (or return the per-process cached copy of) the dataset named by the spec."""
    spec = _dataset_spec(dataset_spec)
    key = json.dumps(spec, sort_keys=True, default=str)
    if spec["name"] == "npz":
        path = _npz_path(spec)
        stat = os.stat(path)
        key += f"|{stat.st_mtime_ns}|{stat.st_size}"
    if key not in _CACHE:
        loader = {"digits": _load_digits, "digits-hard": _load_digits_hard, "synthetic": _load_synthetic,
                  "npz": _load_npz, "torchvision": _load_torchvision}[spec["name"]]
        _CACHE[key] = loader(spec)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget loaded datasets (tests; a worker that wants memory back)."""
    _CACHE.clear()


def _stratified_split(
    x: np.ndarray, y: np.ndarray, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic split keeping class proportions (per class: shuffle, first 20% to validation)."""
    rng = np.random.default_rng(seed)
    val_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_val = round(len(idx) * VAL_FRACTION)
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train = np.sort(np.concatenate(train_idx))
    val = np.sort(np.concatenate(val_idx))
    return x[train], y[train], x[val], y[val]


def _load_digits(spec: Mapping) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, y_train, x_val, y_val = _stratified_split(x, y)
    return Dataset("digits", (1, 8, 8), 10, x_train, y_train, x_val, y_val)


def _digits_hard_seed(spec: Mapping) -> int:
    seed = spec.get("seed")
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvaluationSpecError(f"{FIELD}.seed", f"{seed!r} must be an integer >= 0")
    return seed


def _digits_hard_copies(spec: Mapping) -> tuple[int, int]:
    """(copies, validationCopies) of a digits-hard spec."""
    def read(key: str, default: int) -> int:
        value = spec.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= DIGITS_HARD_MAX_COPIES:
            raise EvaluationSpecError(f"{FIELD}.{key}",
                                      f"{value!r} must be an integer from 1 to {DIGITS_HARD_MAX_COPIES}")
        return value

    copies = read("copies", DIGITS_HARD_COPIES)
    return copies, read("validationCopies", copies)


def _affine_variants(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variant of each [N, 8, 8] image: [N, 16, 16], bilinear, zero outside the digit."""
    n, h, w = images.shape
    out = DIGITS_HARD_SIZE
    angle = np.deg2rad(rng.uniform(-DIGITS_HARD_ROTATION_DEGREES, DIGITS_HARD_ROTATION_DEGREES, n))
    zoom = (out * 0.75 / h) * rng.uniform(*DIGITS_HARD_SCALE, n)
    shift = rng.uniform(-DIGITS_HARD_SHIFT, DIGITS_HARD_SHIFT, (n, 2))
    # Inverse map: each output pixel q reads the source at R(-angle) (q - centre - shift) / zoom.
    rows, cols = np.meshgrid(np.arange(out, dtype=np.float64), np.arange(out, dtype=np.float64), indexing="ij")
    dr = rows[None] - (out - 1) / 2 - shift[:, 0, None, None]
    dc = cols[None] - (out - 1) / 2 - shift[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    src_r = (cos * dr + sin * dc) / zoom[:, None, None] + (h - 1) / 2
    src_c = (-sin * dr + cos * dc) / zoom[:, None, None] + (w - 1) / 2
    # Bilinear interpolation over the image padded with one ring of zeros.
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    r = np.clip(src_r + 1, 0, h + 1 - 1e-6)
    c = np.clip(src_c + 1, 0, w + 1 - 1e-6)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    r1, c1 = np.minimum(r0 + 1, h + 1), np.minimum(c0 + 1, w + 1)
    fr, fc = r - r0, c - c0
    index = np.arange(n)[:, None, None]
    return (padded[index, r0, c0] * (1 - fr) * (1 - fc) + padded[index, r0, c1] * (1 - fr) * fc
            + padded[index, r1, c0] * fr * (1 - fc) + padded[index, r1, c1] * fr * fc)


def _load_digits_hard(spec: Mapping) -> Dataset:
    seed = _digits_hard_seed(spec)
    copies, validation_copies = _digits_hard_copies(spec)
    digits = _load_digits({"name": "digits"})
    rng = np.random.default_rng([seed, 8, 16])

    def variants(x: np.ndarray, y: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        images = np.concatenate([_affine_variants(x[:, 0].astype(np.float64), rng) for _ in range(count)])
        images += rng.normal(0.0, DIGITS_HARD_NOISE, images.shape)
        return images[:, None].astype(np.float32), np.tile(y, count)

    # Training variants are drawn first, so the validation copies never change the training set.
    x_train, y_train = variants(digits.x_train, digits.y_train, copies)
    x_val, y_val = variants(digits.x_val, digits.y_val, validation_copies)
    shape = (1, DIGITS_HARD_SIZE, DIGITS_HARD_SIZE)
    return Dataset("digits-hard", shape, 10, x_train, y_train, x_val, y_val)


def _load_synthetic(spec: Mapping) -> Dataset:
    shape, classes, size, seed = _synthetic_settings(spec)
    rng = np.random.default_rng(seed)
    # One fixed pattern per class; samples are the pattern plus noise of equal scale, so the task
    # is learnable in a few epochs but not solved by a constant.
    patterns = rng.normal(0.0, 1.0, size=(classes,) + shape).astype(np.float32)
    y = np.arange(size, dtype=np.int64) % classes
    rng.shuffle(y)
    noise = rng.normal(0.0, 1.0, size=(size,) + shape).astype(np.float32)
    x = patterns[y] + noise
    x_train, y_train, x_val, y_val = _stratified_split(x, y, seed)
    return Dataset("synthetic", shape, classes, x_train, y_train, x_val, y_val)


def _check_arrays(path: str, x: np.ndarray, y: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3:  # [N, H, W] grey images: add the channel axis
        x = x[:, None, :, :]
    if x.ndim not in (2, 4):
        raise EvaluationSpecError(
            f"{FIELD}.path", f"{path!r}: x{which} has shape {list(x.shape)}; expected [N, C, H, W], [N, H, W] or [N, F]"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise EvaluationSpecError(
            f"{FIELD}.path", f"{path!r}: y{which} has shape {list(y.shape)}; expected [N] with N={len(x)} like x{which}"
        )
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise EvaluationSpecError(f"{FIELD}.path", f"{path!r}: y{which} must hold non-negative integer class indices")
    if not np.issubdtype(x.dtype, np.number):
        raise EvaluationSpecError(f"{FIELD}.path", f"{path!r}: x{which} must be numeric, got dtype {x.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


def _load_npz(spec: Mapping) -> Dataset:
    path = _npz_path(spec)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # not a zip, truncated, object arrays needing pickle
        raise EvaluationSpecError(f"{FIELD}.path",
                                  f"{path!r} is not a readable .npz file of numeric arrays: {exc}") from None
    if {"x_train", "y_train", "x_val", "y_val"} <= arrays.keys():
        x_train, y_train = _check_arrays(path, arrays["x_train"], arrays["y_train"], "_train")
        x_val, y_val = _check_arrays(path, arrays["x_val"], arrays["y_val"], "_val")
    elif {"x", "y"} <= arrays.keys():
        x, y = _check_arrays(path, arrays["x"], arrays["y"], "")
        x_train, y_train, x_val, y_val = _stratified_split(x, y)
    else:
        raise EvaluationSpecError(
            f"{FIELD}.path",
            f"{path!r} has arrays {sorted(arrays)}; expected x_train, y_train, x_val, y_val (or x, y to be split)",
        )
    if x_train.shape[1:] != x_val.shape[1:]:
        raise EvaluationSpecError(
            f"{FIELD}.path",
            f"{path!r}: x_train samples {list(x_train.shape[1:])} and x_val samples {list(x_val.shape[1:])} differ",
        )
    if len(x_train) == 0 or len(x_val) == 0:
        raise EvaluationSpecError(f"{FIELD}.path", f"{path!r}: training and validation sets must not be empty")
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    if spec.get("classes") is not None:
        classes = spec["classes"]
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < num_classes:
            raise EvaluationSpecError(f"{FIELD}.classes",
                                      f"{classes!r} must be an integer >= {num_classes} (largest label + 1)")
        num_classes = classes
    num_classes = max(num_classes, 2)
    return Dataset("npz", tuple(int(d) for d in x_train.shape[1:]), num_classes, x_train, y_train, x_val, y_val)


def _load_torchvision(spec: Mapping) -> Dataset:
    tv_name = _torchvision_name(spec)
    root = spec.get("root") or os.path.join(os.path.expanduser("~"), ".cache", "morphml", "torchvision")
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise EvaluationSpecError(
            f"{FIELD}.torchvisionName",
            f"{tv_name!r} needs the torchvision package, which is not installed in this worker ({exc}); "
            "install torchvision in the worker image or use the npz dataset",
        ) from None
    cls = getattr(tv_datasets, tv_name, None)
    if not isinstance(cls, type):
        raise EvaluationSpecError(f"{FIELD}.torchvisionName", f"{tv_name!r} is not a dataset in torchvision.datasets")
    try:
        if tv_name == "SVHN":
            train, val = cls(root, split="train", download=True), cls(root, split="test", download=True)
        else:
            train, val = cls(root, train=True, download=True), cls(root, train=False, download=True)
        x_train, y_train = _torchvision_arrays(train)
        x_val, y_val = _torchvision_arrays(val)
    except Exception as exc:
        raise EvaluationSpecError(
            f"{FIELD}.torchvisionName",
            f"could not load torchvision dataset {tv_name!r} into root {root!r} (download failed or no network?): "
            f"{type(exc).__name__}: {exc}",
        ) from None
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    return Dataset("torchvision", tuple(x_train.shape[1:]), num_classes, x_train, y_train, x_val, y_val)


def _torchvision_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N, C, H, W] in [0, 1] and labels as int64."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", getattr(ds, "labels", None))
    if data is None or targets is None:
        raise ValueError(f"{type(ds).__name__} has no data/targets arrays")
    x = np.asarray(data)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # channels-last (CIFAR) -> channels-first
    x = x.astype(np.float32)
    if x.max() > 1.0:
        x /= 255.0
    return np.ascontiguousarray(x), np.asarray(targets, dtype=np.int64)
