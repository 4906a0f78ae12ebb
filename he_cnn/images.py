"""Images as the model sees them: one file read, scaled to ``[0, 1]``, resized, then quantised.

Both sides use this module so that training and inference see the same pixels: the owner's data
loaders (:mod:`he_cnn.training.data`), the compiler, and the user's client (:mod:`he_cnn.user.query`).
:class:`Preprocessing` is the one description of that path a model carries in its public spec: input
size, channel order (grey, RGB or BGR), the integer range ``0..input_max`` a pixel is sent as, and the
normalisation the float model was trained with (folded into the model, never applied by the user).
It needs only numpy and Pillow, so the user's ``he-cnn user`` commands start without torch or
scikit-learn. :func:`resize_images` reproduces torch's ``F.interpolate(mode="bilinear",
align_corners=False, antialias=True)`` (the models were trained on images resized that way),
:func:`quantize_image` is the user's last step before encryption. Every file is bounded in bytes and
pixels before it is decoded, and every failure is a :class:`~he_cnn.errors.BadRequest`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from he_cnn.errors import BadRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIX = ".npy"
DIGITS_MAX = 16  # sklearn's digits count ink in 4x4 blocks: values 0..16
#: a model input's channel orders and how many channels each has
CHANNEL_COUNTS = {"grey": 1, "rgb": 3, "bgr": 3}
#: the channel order of a model input that declares none, by its channel count
DEFAULT_CHANNELS = {1: "grey", 3: "rgb"}
#: the largest height or width a model input may declare
MAX_SIDE = 1024
#: the largest integer a pixel may be sent as (16-bit images)
MAX_INPUT_MAX = 65535
#: the largest image file read (PNG, JPEG or .npy), checked before anything is decoded
MAX_FILE_BYTES = 64 << 20
#: the most pixels a picture or array may hold: a small compressed file can claim a huge canvas
MAX_PIXELS = 25_000_000
#: ITU-R 601-2 luma, Pillow's ``convert("L")``: how a three-channel array becomes grey
LUMA = np.array([0.299, 0.587, 0.114])
_FIELDS = ("height", "width", "channels", "input_max", "mean", "std")


@dataclass(frozen=True)
class Preprocessing:
    """How a user's picture becomes the model's integer input ``(C, H, W)``.

    A pixel ``p`` in [0, 1] is resized to ``height x width``, put in the ``channels`` order and sent
    as ``round(p * input_max)``. ``mean`` and ``std`` (one value per channel) are the normalisation
    ``(p - mean) / std`` the float model was trained with: the compiler folds them into the first
    layer, so the user never applies them and a model trained on raw pixels keeps 0 and 1. A single
    ``mean`` or ``std`` value is used for every channel. Invalid values raise :class:`BadRequest`.
    """

    height: int
    width: int
    channels: str = "grey"
    input_max: int = 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        _check_int(self.height, "height", MAX_SIDE)
        _check_int(self.width, "width", MAX_SIDE)
        if not isinstance(self.channels, str) or self.channels not in CHANNEL_COUNTS:
            raise BadRequest(f"preprocessing: channels must be one of {sorted(CHANNEL_COUNTS)}, "
                             f"got {_kind(self.channels)}")
        _check_int(self.input_max, "input_max", MAX_INPUT_MAX)
        # frozen: the normalised per-channel tuples replace what the caller passed
        object.__setattr__(self, "mean", _per_channel(self.mean, "mean", self.channel_count, positive=False))
        object.__setattr__(self, "std", _per_channel(self.std, "std", self.channel_count, positive=True))

    @property
    def channel_count(self) -> int:
        return CHANNEL_COUNTS[self.channels]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input's ``(C, H, W)``."""
        return self.channel_count, self.height, self.width

    @classmethod
    def default_for(cls, input_shape: tuple[int, ...], input_max: int) -> "Preprocessing":
        """The preprocessing of a model that declares none (specs written before it existed): raw
        pixels, grey for one channel and RGB for three."""
        if len(input_shape) != 3 or input_shape[0] not in DEFAULT_CHANNELS:
            raise BadRequest(f"a model input of shape {list(input_shape)} needs a declared preprocessing: "
                             f"only 1 (grey) or 3 (RGB) channels have a default")
        return cls(input_shape[1], input_shape[2], DEFAULT_CHANNELS[input_shape[0]], input_max)

    @classmethod
    def declared(cls, value: Any, input_shape: tuple[int, ...], input_max: int) -> "Preprocessing":
        """The preprocessing a model spec declares (``value``, its JSON form, or None when the spec has
        none), checked against the model's input: its ``(C, H, W)`` and ``input_max`` must agree."""
        preprocessing = cls.default_for(input_shape, input_max) if value is None else cls.from_json(value)
        if preprocessing.input_shape != tuple(input_shape) or preprocessing.input_max != input_max:
            raise BadRequest(f"preprocessing gives input {list(preprocessing.input_shape)} with input_max "
                             f"{preprocessing.input_max}; the model takes {list(input_shape)} with {input_max}")
        return preprocessing

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "channels": self.channels,
                "input_max": self.input_max, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, value: Any) -> "Preprocessing":
        """Read :meth:`to_json`'s form from outside: only known fields, ``mean`` and ``std`` lists of
        exactly one number per channel; :class:`BadRequest` for anything else."""
        if not isinstance(value, dict):
            raise BadRequest(f"preprocessing must be a JSON object, got {_kind(value)}")
        unknown = [key for key in value if key not in _FIELDS]
        if unknown:
            raise BadRequest(f"preprocessing has {len(unknown)} unknown field(s), e.g. {_kind(unknown[0])}; "
                             f"expected {', '.join(_FIELDS)}")
        for name in ("height", "width"):
            if name not in value:
                raise BadRequest(f"preprocessing lacks {name!r}")
        channels = value.get("channels", "grey")
        if not isinstance(channels, str) or channels not in CHANNEL_COUNTS:
            raise BadRequest(f"preprocessing: channels must be one of {sorted(CHANNEL_COUNTS)}, got {_kind(channels)}")
        normalisation = {}
        for name in ("mean", "std"):
            if name in value:
                items = value[name]
                if not isinstance(items, list) or len(items) != CHANNEL_COUNTS[channels]:
                    raise BadRequest(f"preprocessing: {name} must be a list of {CHANNEL_COUNTS[channels]} numbers "
                                     f"(one per {channels} channel), got {_kind(items)}")
                normalisation[name] = tuple(items)
        return cls(value["height"], value["width"], channels, value.get("input_max", 255), **normalisation)

    # -- pixels -------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> np.ndarray:
        """The image at ``path`` as float32 ``(C, H, W)`` in [0, 1]: read, put in this channel order, resized.

        PNG and JPEG are converted by Pillow to grey (``L``) or RGB. A ``.npy`` array may be
        ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C = 1 or 3 (channel-last wins when both
        fit); three channels are taken as RGB, like a picture's. Values are floats in [0, 1] or 0..255;
        a 2-D array whose values lie in 0..16 holds the digits' ink counts.
        """
        file = _image_file(path)
        image = _read_array(file) if file.suffix.lower() == ARRAY_SUFFIX else _read_picture(file, self.channel_count)
        if image.shape[0] != self.channel_count:
            image = np.repeat(image, 3, axis=0) if self.channel_count == 3 else np.tensordot(LUMA, image, 1)[None]
        if self.channels == "bgr":
            image = image[::-1]
        return resize_images(image[None], (self.height, self.width))[0]

    def quantize(self, image: np.ndarray) -> np.ndarray:
        """A float ``(C, H, W)`` image in [0, 1] of this input shape as the model's integer input."""
        if image.shape != self.input_shape:
            raise BadRequest(f"expected an image of shape {self.input_shape}, got {image.shape}")
        return quantize_image(image, self.input_max)

    def encode(self, path: str | Path) -> np.ndarray:
        """The image at ``path`` as the model's integer input: ``(C, H, W)`` Python ints in [0, input_max]."""
        return self.quantize(self.load(path))


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


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize images to ``size`` (a side, or ``(height, width)``), bilinearly, as float32 clamped to [0, 1].

    ``(n, h, w)`` grey images become ``(n, 1, H, W)``; ``(n, C, h, w)`` images keep their C. Rows,
    then columns, with :func:`resize_weights` computed in float64, one channel at a time so a large
    photo never needs a float64 copy of all its channels. Antialiasing only matters when shrinking
    (a large photo); for the 8x8 digits it is plain bilinear upsampling.
    """
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[:, None]
    elif batch.ndim != 4:
        raise BadRequest(f"expected grey images of shape (n, h, w) or images (n, C, h, w), got {batch.shape}")
    height, width = (size, size) if isinstance(size, int) else size
    if batch.shape[2:] != (height, width):
        rows = resize_weights(batch.shape[2], height)
        columns = resize_weights(batch.shape[3], width)
        planes = batch.reshape(-1, *batch.shape[2:])
        resized = np.stack([rows @ (np.asarray(plane, dtype=np.float64) @ columns.T) for plane in planes])
        batch = resized.reshape(*batch.shape[:2], height, width)
    return np.clip(batch, 0.0, 1.0).astype(np.float32)


def load_image_file(path: str | Path, size: int) -> np.ndarray:
    """One image as grey float32 ``(1, size, size)`` in [0, 1]: :meth:`Preprocessing.load` of a square grey input."""
    return Preprocessing(size, size).load(path)


def quantize_image(x: np.ndarray, input_max: int) -> np.ndarray:
    """Float ``(C, H, W)`` pixels in [0, 1] to Python ints ``round(x * input_max)`` in ``[0, input_max]`` (dtype object)."""
    if x.ndim != 3:
        raise BadRequest(f"expected an image of shape (C, H, W), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise BadRequest("image contains NaN or infinite pixels")
    levels = np.clip(np.rint(np.asarray(x, dtype=np.float64) * input_max), 0, input_max)
    return levels.astype(np.int64).astype(object)


def _kind(value: Any) -> str:
    """What arrived, for a message: a number or the start of a string, else only its type (never the
    repr of a deeply nested value, nor the digits of a huge integer)."""
    if isinstance(value, str):
        return repr(value[:40])
    if type(value) is float or (type(value) is int and value.bit_length() <= 64):
        return repr(value)
    return f"an integer of {value.bit_length()} bits" if type(value) is int else type(value).__name__


def _check_int(value: Any, what: str, high: int) -> None:
    if type(value) is not int or not 1 <= value <= high:  # bool and float are not ints here
        raise BadRequest(f"preprocessing: {what} must be an integer in [1, {high}], got {_kind(value)}")


def _per_channel(values: Any, what: str, count: int, positive: bool) -> tuple[float, ...]:
    """``values`` as ``count`` finite floats (one value stands for every channel)."""
    if not isinstance(values, (list, tuple)) or len(values) not in (1, count):
        raise BadRequest(f"preprocessing: {what} must hold 1 or {count} numbers, got {_kind(values)}")
    checked = []
    for v in values:
        try:
            number = float(v) if type(v) in (int, float) else math.nan  # bool and str are not numbers here
        except OverflowError:  # an int beyond float's range
            number = math.inf
        if not math.isfinite(number) or (positive and number <= 0):
            rule = "positive finite numbers" if positive else "finite numbers"
            raise BadRequest(f"preprocessing: {what} must hold {rule}, got {_kind(v)}")
        checked.append(number)
    return tuple(checked * (count // len(checked)))


def _image_file(path: str | Path) -> Path:
    """``path`` if it is an image file of a known suffix and at most :data:`MAX_FILE_BYTES`."""
    file = Path(path)
    if not file.is_file():
        raise BadRequest(f"image file {str(file)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix != ARRAY_SUFFIX and suffix not in IMAGE_SUFFIXES:
        raise BadRequest(f"image file {str(file)!r}: expected .png, .jpg, .jpeg or .npy, got {suffix or 'no suffix'!r}")
    if file.stat().st_size > MAX_FILE_BYTES:
        raise BadRequest(f"image file {str(file)!r} exceeds {MAX_FILE_BYTES >> 20} MiB")
    return file


def _read_picture(file: Path, channels: int) -> np.ndarray:
    """A PNG/JPEG as float ``(channels, h, w)`` in [0, 1], Pillow converting it to grey or RGB."""
    try:
        with Image.open(file) as picture:  # reads the header only: the size is known before decoding
            if picture.width * picture.height > MAX_PIXELS:
                raise BadRequest(f"image {str(file)!r} has {picture.width}x{picture.height} pixels, "
                                 f"more than {MAX_PIXELS}")
            pixels = np.asarray(picture.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadRequest(f"cannot read image {str(file)!r}: {e}") from e
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def read_npy(file: Path) -> np.ndarray:
    """One numeric array from a ``.npy`` file (the caller bounds the file's size first); pickled
    (object) arrays, archives and anything unreadable are refused with :class:`BadRequest`."""
    try:
        array = np.load(file, allow_pickle=False)  # object arrays need pickle: refused
    except (ValueError, OSError, EOFError) as e:
        raise BadRequest(f"cannot read {str(file)!r} as a numpy array: {e}") from e
    if not isinstance(array, np.ndarray):  # an .npz archive renamed .npy
        array.close()
        raise BadRequest(f"{str(file)!r} is a numpy archive, not one array")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise BadRequest(f"{str(file)!r}: expected a numeric array, got dtype {array.dtype}")
    return array


def _read_array(file: Path) -> np.ndarray:
    """A ``.npy`` image as float64 ``(1 or 3, h, w)`` in [0, 1] (see :meth:`Preprocessing.load`)."""
    array = read_npy(file)
    if array.ndim not in (2, 3) or array.size == 0 or array.size > MAX_PIXELS:
        raise BadRequest(f"{str(file)!r}: expected a 2-D or 3-D numeric array of at most {MAX_PIXELS} values, "
                         f"got shape {array.shape} dtype {array.dtype}")
    if array.ndim == 2:
        image = array[None]
    elif array.shape[2] in (1, 3):
        image = array.transpose(2, 0, 1)
    elif array.shape[0] in (1, 3):
        image = array
    else:
        raise BadRequest(f"{str(file)!r}: expected (H, W), (H, W, C) or (C, H, W) with C = 1 or 3, got {array.shape}")
    image = image.astype(np.float64)
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
        raise BadRequest(f"{str(file)!r}: pixel values must be finite and within [0, 255]")
    peak = image.max()
    if peak > 1:
        image = image / (DIGITS_MAX if array.ndim == 2 and peak <= DIGITS_MAX else 255.0)
    return image
