"""The model owner's data: the digits set or a folder of images, split into train and test.

Every image, whatever its source, goes through the same two steps as the user's single image
(:mod:`he_cnn.images`, which also holds :func:`~he_cnn.images.load_image_file` and
:func:`~he_cnn.images.quantize_image`) so that training and inference see the same pixels: grey values scaled to ``[0, 1]``
and a bilinear resize to ``size x size`` (:func:`~he_cnn.images.resize_images`). Loaders return
float32 arrays of shape ``(n, 1, size, size)``; the split into train and test is stratified and
seeded, so a seed always gives the same split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from he_cnn.errors import BadRequest
from he_cnn.images import DIGITS_MAX, IMAGE_SUFFIXES, load_image_file, resize_images


@dataclass(frozen=True)
class Dataset:
    """Train and test images ``(n, 1, size, size)`` float32 in ``[0, 1]`` with int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    size: int


def load_digits_dataset(size: int = 16, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """The scikit-learn digits (1797 images, 10 classes), scaled to [0, 1] and resized."""
    digits = load_digits()
    images = resize_images(digits.images / DIGITS_MAX, size)
    classes = [str(c) for c in digits.target_names]
    return _split(images, digits.target.astype(np.int64), classes, size, seed, test_fraction)


def load_image_folder(path: str | Path, size: int = 16, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """A data set from ``path/<class name>/<image>``; class indices follow the sorted folder names."""
    root = Path(path)
    if not root.is_dir():
        raise BadRequest(f"image folder {str(root)!r} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise BadRequest(
            f"image folder {str(root)!r} needs one sub-folder per class, at least 2; found {len(class_dirs)}"
        )
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise BadRequest(
                f"class folder {str(class_dir)!r} needs at least 2 PNG/JPEG images; found {len(files)}"
            )
        images.extend(load_image_file(f, size)[0] for f in files)
        labels.extend([label] * len(files))
    classes = [d.name for d in class_dirs]
    return _split(np.stack(images)[:, None], np.array(labels, dtype=np.int64), classes, size, seed, test_fraction)


def _split(
    images: np.ndarray, labels: np.ndarray, classes: list[str], size: int, seed: int, test_fraction: float
) -> Dataset:
    if not 0.0 < test_fraction < 1.0:
        raise BadRequest(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=test_fraction, random_state=seed, stratify=labels
        )
    except ValueError as e:  # too few images for a stratified split of this size
        raise BadRequest(f"cannot split {len(labels)} images into train and test: {e}") from e
    return Dataset(x_train, y_train, x_test, y_test, classes, size)
