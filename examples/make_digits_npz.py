"""Write an .npz dataset for examples/npz-dataset.yaml from scikit-learn's bundled digits.

    python3 examples/make_digits_npz.py            # writes data/digits16.npz under the current directory
    python3 examples/make_digits_npz.py --out FILE

The 8x8 digits are upscaled to 16x16, shifted by up to 2 pixels and given a little noise, so the
file stands for "your own images": arrays x_train [N, 1, 16, 16] float32 in [0, 1], y_train [N]
int64, and x_val, y_val (a fixed stratified 80/20 split, seed 0). No download; about 1.3 MB.
Any .npz with those four arrays (or just x and y, which MorphML splits 80/20) works the same way:
see docs/evaluation.md, "Datasets".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def make(seed: int = 0) -> dict[str, np.ndarray]:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    big = np.kron(images, np.ones((1, 2, 2), dtype=np.float32))  # [N, 16, 16]
    shifted = np.empty_like(big)
    for i, image in enumerate(big):
        dy, dx = rng.integers(-2, 3, size=2)
        shifted[i] = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    x = np.clip(shifted + rng.normal(0.0, 0.05, size=shifted.shape), 0.0, 1.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    val = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):  # stratified: 20 % of each class to validation
        idx = rng.permutation(np.flatnonzero(y == label))
        val[idx[: round(len(idx) * 0.2)]] = True
    return {"x_train": x[~val], "y_train": y[~val], "x_val": x[val], "y_val": y[val]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits16.npz", help="where to write (default data/digits16.npz)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = make()
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(arrays['y_train'])} train, {len(arrays['y_val'])} validation, "
          f"x shape {list(arrays['x_train'].shape[1:])}")


if __name__ == "__main__":
    main()
