"""Images as the model sees them: one file read, grey values in ``[0, 1]``, resized, then quantised.

Both sides use this module so that training and inference see the same pixels: the owner's data
loaders (:mod:`he_cnn.training.data`) and the user's client (:mod:`he_cnn.user.query`). It needs only
numpy and Pillow, so the user's ``he-cnn user`` commands start without torch or scikit-learn.
:func:`resize_images` reproduces torch's ``F.interpolate(mode="bilinear", align_corners=False,
antialias=True)`` (the models were trained on images resized that way), :func:`quantize_image` is the
user's last step before encryption: float pixels become the integers ``0..input_max`` the integer
model expects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from he_cnn.errors import BadRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_MAX = 16  # sklearn's digits count ink in 4x4 blocks: values 0..16


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out_size, in_size)`` float64 matrix of a 1-D antialiased bilinear resize.

    Pillow's and torch's separable triangle filter: output pixel ``i`` is centred at input coordinate
    ``c = (i + 0.5) * s`` with ``s = in_size / out_size``; when shrinking (s > 1) the triangle is
    stretched to a support of ``s`` pixels on each side, so every input pixel contributes (no
    aliasing); when enlarging it is plain bilinear interpolation. Each row is normalised to sum 1,
    which also handles the borders (no padding).
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero, as the C++ casts of Pillow and torch do
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) / support))
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total else taps
    return weights


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(n, h, w)`` grey images to ``(n, 1, size, size)`` float32, bilinearly, clamped to [0, 1].

    Rows, then columns, with :func:`resize_weights` computed in float64. Antialiasing only matters
    when shrinking (a large photo); for the 8x8 digits it is plain bilinear upsampling.
    """
    batch = np.asarray(images, dtype=np.float64)
    if batch.ndim != 3:
        raise BadRequest(f"expected grey images of shape (n, h, w), got {batch.shape}")
    if batch.shape[1:] != (size, size):
        rows = resize_weights(batch.shape[1], size)
        columns = resize_weights(batch.shape[2], size)
        batch = rows @ (batch @ columns.T)
    return np.clip(batch, 0.0, 1.0).astype(np.float32)[:, None]


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
