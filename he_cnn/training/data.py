"""The model owner's data: the digits set (or a folder of images) and the user's single image.

Every image, whatever its source, goes through the same two steps so that training and inference
see the same pixels: grey values scaled to ``[0, 1]`` and a bilinear resize to ``size x size``
(:func:`resize_images`). Loaders return float32 arrays of shape ``(n, 1, size, size)``; the split into
train and test is stratified and seeded, so a seed always gives the same split.
:func:`quantize_image` is the user's last step before encryption: float pixels become the integers
``0..input_max`` the integer model expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from he_cnn.errors import BadRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_MAX = 16  # sklearn's digits count ink in 4x4 blocks: values 0..16


@dataclass(frozen=True)
class Dataset:
    """Train and test images ``(n, 1, size, size)`` float32 in ``[0, 1]`` with int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    size: int


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(n, h, w)`` grey images to ``(n, 1, size, size)`` float32, bilinearly.

    ``antialias`` only matters when shrinking (a large photo); for the 8x8 digits it is plain
    bilinear upsampling.
    """
    batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    if batch.shape[-2:] != (size, size):
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return batch.clamp(0.0, 1.0).numpy()


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
        images.extend(_read_picture(f, size)[0] for f in files)
        labels.extend([label] * len(files))
    classes = [d.name for d in class_dirs]
    return _split(np.stack(images)[:, None], np.array(labels, dtype=np.int64), classes, size, seed, test_fraction)


def load_image_file(path: str | Path, size: int) -> np.ndarray:
    """One image as float32 ``(1, size, size)`` in [0, 1], from a PNG/JPEG or a 2-D ``.npy`` array.

    A ``.npy`` array whose values exceed 1 is read as digits counts (max <= 16) or as 8-bit grey
    (max <= 255).
    """
    file = Path(path)
    if not file.is_file():
        raise BadRequest(f"image file {str(file)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        return _read_array(file, size)
    if suffix in IMAGE_SUFFIXES:
        return _read_picture(file, size)
    raise BadRequest(f"image file {str(file)!r}: expected .png, .jpg, .jpeg or .npy, got {suffix or 'no suffix'!r}")


def quantize_image(x: np.ndarray, input_max: int) -> np.ndarray:
    """Float pixels in [0, 1] to Python ints ``round(x * input_max)`` in ``[0, input_max]`` (dtype object)."""
    if x.ndim != 3 or x.shape[0] != 1:
        raise BadRequest(f"expected an image of shape (1, H, W), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise BadRequest("image contains NaN or infinite pixels")
    levels = np.clip(np.rint(np.asarray(x, dtype=np.float64) * input_max), 0, input_max)
    return levels.astype(np.int64).astype(object)


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


def _read_picture(file: Path, size: int) -> np.ndarray:
    try:
        with Image.open(file) as picture:
            grey = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise BadRequest(f"cannot read image {str(file)!r}: {e}") from e
    return resize_images(grey[None], size)[0]


def _read_array(file: Path, size: int) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadRequest(f"cannot read {str(file)!r} as a numpy array: {e}") from e
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.ndim != 2 or not numeric or array.size == 0:
        raise BadRequest(
            f"{str(file)!r}: expected a non-empty 2-D numeric array, got shape {array.shape} dtype {array.dtype}"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
        raise BadRequest(f"{str(file)!r}: pixel values must be finite and within [0, 255]")
    peak = array.max()
    if peak > 1:
        array = array / (DIGITS_MAX if peak <= DIGITS_MAX else 255.0)
    return resize_images(array[None], size)[0]
