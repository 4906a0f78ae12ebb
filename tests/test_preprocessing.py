"""The model's preprocessing: one description, the same pixels on the owner's and the user's side.

The owner reads training images through :meth:`Preprocessing.load` (the data loaders) and the model's
spec carries that preprocessing; the user's client reads it from the spec and encodes a picture with
it. These tests check that both sides give the same integers for PNG, JPEG and .npy files, grey and
RGB, square and not; that the spec keeps the preprocessing (and that old specs without it still
load); and that every hostile value is refused with :class:`BadRequest`.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from he_cnn.errors import BadRequest, ProtocolError
from he_cnn.graph.integer_model import IntegerModel, build_model, load_integer_model, save_integer_model
from he_cnn.graph.layers import Dense, Flatten
from he_cnn.images import MAX_FILE_BYTES, Preprocessing, load_image_file, quantize_image
from he_cnn.training.data import load_image_folder
from he_cnn.user.query import ModelInfo, encode_image

ICNN_INPUT = Preprocessing(16, 16, "grey", 15)
COLOUR = Preprocessing(12, 10, "rgb", 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def dense_model(preprocessing: Preprocessing | None, input_shape=(3, 12, 10), input_max: int = 255) -> IntegerModel:
    """The smallest model of that input: flatten, then a dense layer to 3 classes."""
    inputs = int(np.prod(input_shape))
    weight = np.array([int(v) for v in np.random.default_rng(1).integers(-3, 4, 3 * inputs)], dtype=object)
    layers = (Flatten("flat", "input", "flat"), Dense("fc", "flat", "fc", weight.reshape(3, inputs),
                                                      np.array([0, 1, 2], dtype=object)))
    meta = {"classes": ["a", "b", "c"]}
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing.to_json()
    return build_model(layers, "input", input_shape, input_max, "fc", meta)


def user_info(spec: dict) -> ModelInfo:
    """What the user's client makes of S1's description of a model."""
    return ModelInfo.from_json({"model_id": "m", "key_id": "k", "spec": spec})


def photo(seed: int, height: int, width: int, mode: str) -> Image.Image:
    """A smooth random picture (JPEG keeps it close), distinct for each seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    picture = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    return picture.convert(mode)


def owner_and_user_encodings(tmp_path, preprocessing: Preprocessing, info: ModelInfo, mode: str):
    """Every picture of a two-class folder as the owner's data loader sees it (quantised with the model's
    preprocessing) and as the user's client encodes it."""
    files = []
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i, suffix in enumerate((".png", ".jpg", ".png", ".jpeg")):
            files.append(tmp_path / label / f"{i}{suffix}")
            photo(len(files), 37, 23, mode).save(files[-1], quality=90)
    data = load_image_folder(tmp_path, test_fraction=0.5, preprocessing=preprocessing)
    owner = sorted(tuple(data.preprocessing.quantize(x).ravel()) for x in np.concatenate([data.x_train, data.x_test]))
    user = sorted(tuple(encode_image(f, info).ravel()) for f in files)
    return owner, user, files


def test_rgb_non_square_owner_and_user_agree(tmp_path):
    model = dense_model(COLOUR)
    info = user_info(model.to_spec())
    assert info.preprocessing == COLOUR == model.preprocessing
    owner, user, files = owner_and_user_encodings(tmp_path, COLOUR, info, "RGB")
    assert owner == user and len(set(user)) == len(files)
    pixels = encode_image(files[0], info)
    assert pixels.shape == (3, 12, 10) and pixels.dtype == object and all(type(v) is int for v in pixels.flat)

    # the same pixels as a PNG and as .npy arrays, channel-last bytes or channel-first floats
    rgb = np.asarray(Image.open(files[0]).convert("RGB"))
    np.save(tmp_path / "hwc.npy", rgb)
    np.save(tmp_path / "chw.npy", rgb.transpose(2, 0, 1) / 255.0)
    for array in ("hwc.npy", "chw.npy"):
        assert np.array_equal(encode_image(tmp_path / array, info), pixels)


def test_grey_owner_and_user_agree_for_an_icnn_spec_without_preprocessing(tmp_path):
    """The existing models: 16x16 grey in 0..15, and specs stored before the preprocessing existed."""
    spec = dense_model(None, (1, 16, 16), 15).to_spec()
    del spec["preprocessing"]
    info = user_info(spec)
    assert info.preprocessing == ICNN_INPUT
    owner, user, files = owner_and_user_encodings(tmp_path, ICNN_INPUT, info, "L")
    assert owner == user
    for file in files:  # the former path: load_image_file, then quantize_image
        assert np.array_equal(encode_image(file, info), quantize_image(load_image_file(file, 16), 15))
    grey = np.asarray(Image.open(files[0]))
    np.save(tmp_path / "grey.npy", grey)
    assert np.array_equal(encode_image(tmp_path / "grey.npy", info), encode_image(files[0], info))


def test_load_matches_torch_and_converts_channels(tmp_path):
    torch = pytest.importorskip("torch")
    photo(7, 37, 23, "RGB").save(tmp_path / "p.png")
    rgb = np.asarray(Image.open(tmp_path / "p.png"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    expected = torch.nn.functional.interpolate(torch.from_numpy(rgb)[None], size=(12, 10), mode="bilinear",
                                               align_corners=False, antialias=True)[0].clamp(0, 1).numpy()
    loaded = COLOUR.load(tmp_path / "p.png")
    assert loaded.shape == (3, 12, 10) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-5)
    bgr = Preprocessing(12, 10, "bgr").load(tmp_path / "p.png")
    assert np.array_equal(bgr, loaded[::-1])
    # a grey model reads a colour picture as Pillow's luma; a colour model repeats a grey one
    Image.open(tmp_path / "p.png").convert("L").save(tmp_path / "l.png")
    assert np.array_equal(Preprocessing(12, 10).load(tmp_path / "p.png"), Preprocessing(12, 10).load(tmp_path / "l.png"))
    np.save(tmp_path / "g.npy", np.full((5, 5), 0.25))
    assert np.allclose(Preprocessing(5, 5, "rgb").load(tmp_path / "g.npy"), 0.25)
    np.save(tmp_path / "c.npy", np.stack([np.full((5, 5), v) for v in (1.0, 0.0, 0.0)], axis=-1))
    assert np.allclose(Preprocessing(5, 5).load(tmp_path / "c.npy"), 0.299)


# -- the spec -----------------------------------------------------------------------------------------

def test_spec_and_file_round_trip_keep_the_preprocessing(tmp_path):
    model = dense_model(COLOUR)
    spec = model.to_spec()
    assert spec["preprocessing"] == COLOUR.to_json()
    public = IntegerModel.from_spec(spec)
    assert public.preprocessing == COLOUR and public.to_spec() == spec
    assert model.public().preprocessing == COLOUR
    save_integer_model(model, tmp_path / "m.json")
    assert load_integer_model(tmp_path / "m.json").preprocessing == COLOUR


def test_a_spec_without_preprocessing_gets_the_default():
    spec = dense_model(None, (1, 16, 16), 15).to_spec()
    assert spec["preprocessing"] == ICNN_INPUT.to_json()  # derived for a model that declares none
    del spec["preprocessing"]
    assert IntegerModel.from_spec(spec).preprocessing == ICNN_INPUT
    colour = dense_model(None).to_spec()
    del colour["preprocessing"]
    assert IntegerModel.from_spec(colour).preprocessing == Preprocessing(12, 10, "rgb", 255)


@pytest.mark.parametrize("change, message", [
    ({"height": 13}, "the model takes"),
    ({"input_max": 15}, "the model takes"),
    ({"channels": "grey", "mean": [0.0], "std": [1.0]}, "the model takes"),
    ({"channels": "cmyk"}, "channels must be one of"),
])
def test_a_spec_whose_preprocessing_disagrees_is_refused(change, message):
    spec = dense_model(COLOUR).to_spec()
    spec["preprocessing"].update(change)
    with pytest.raises(BadRequest, match=message):
        IntegerModel.from_spec(spec)
    with pytest.raises(ProtocolError, match="unexpected form"):  # the user's client: S1 sent nonsense
        user_info(spec)


def test_a_model_file_with_a_wrong_preprocessing_is_refused(tmp_path):
    model = dense_model(Preprocessing(12, 11, "rgb"))
    with pytest.raises(BadRequest, match="the model takes"):
        model.to_spec()
    save_integer_model(model, tmp_path / "bad.json")
    with pytest.raises(BadRequest, match="invalid: preprocessing"):
        load_integer_model(tmp_path / "bad.json")


# -- hostile values -----------------------------------------------------------------------------------

def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


GOOD = COLOUR.to_json()


@pytest.mark.parametrize("value", [
    None, [], "rgb", 16, nested(100_000),
    {**GOOD, "height": "16"}, {**GOOD, "height": 16.0}, {**GOOD, "width": True}, {**GOOD, "height": None},
    {**GOOD, "height": 0}, {**GOOD, "width": 1025}, {**GOOD, "height": 10**100},
    {**GOOD, "input_max": 0}, {**GOOD, "input_max": 65536}, {**GOOD, "input_max": 2**40000}, {**GOOD, "input_max": 1.5},
    {**GOOD, "channels": "RGB"}, {**GOOD, "channels": ["rgb"]}, {**GOOD, "channels": {"a": 1}}, {**GOOD, "channels": None},
    {**GOOD, "mean": [0.5, 0.4]}, {**GOOD, "mean": [0.5] * 10**6}, {**GOOD, "mean": 0.5}, {**GOOD, "mean": {"r": 0.5}},
    {**GOOD, "mean": [float("nan"), 0.0, 0.0]}, {**GOOD, "mean": [float("inf"), 0.0, 0.0]},
    {**GOOD, "mean": ["0.5", 0.0, 0.0]}, {**GOOD, "mean": [True, 0.0, 0.0]}, {**GOOD, "mean": [2**40000, 0, 0]}, {**GOOD, "mean": [nested(100_000), 0, 0]},
    {**GOOD, "std": [0.0, 1.0, 1.0]}, {**GOOD, "std": [-1.0, 1.0, 1.0]}, {**GOOD, "std": [1e400, 1.0, 1.0]},
    {**GOOD, "height": nested(100_000)}, {**GOOD, "extra": 1}, {**GOOD, "x" * 10**6: 1}, {1: 2, **GOOD},
    {k: v for k, v in GOOD.items() if k != "height"}, {k: v for k, v in GOOD.items() if k != "width"},
], ids=lambda v: type(v).__name__)
def test_from_json_refuses_hostile_values(value):
    with pytest.raises(BadRequest) as caught:
        Preprocessing.from_json(value)
    assert len(str(caught.value)) < 300  # the message never echoes a hostile value back


def test_from_json_round_trip_and_defaults():
    assert Preprocessing.from_json(GOOD) == COLOUR
    assert Preprocessing.from_json({"height": 3, "width": 4}) == Preprocessing(3, 4, "grey", 255, (0.0,), (1.0,))
    assert Preprocessing(3, 4, "rgb", mean=(0.5,)).mean == (0.5, 0.5, 0.5)
    assert Preprocessing(3, 4, "bgr").input_shape == (3, 3, 4) and ICNN_INPUT.channel_count == 1
    with pytest.raises(BadRequest):
        Preprocessing(3, 4, "rgb", mean=(0.5, 0.5))


# -- hostile files --------------------------------------------------------------------------------------

def test_files_are_bounded_before_they_are_decoded(tmp_path):
    big = tmp_path / "big.npy"
    with big.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(BadRequest, match="exceeds 64 MiB"):
        ICNN_INPUT.encode(big)
    Image.new("L", (6000, 5000)).save(tmp_path / "huge.png")  # 30 megapixels in a few kilobytes
    with pytest.raises(BadRequest, match="more than"):
        ICNN_INPUT.encode(tmp_path / "huge.png")


@pytest.mark.parametrize("array, message", [
    (np.array([{"a": 1}, None], dtype=object), "cannot read"),  # needs pickle
    (np.zeros((1, 4, 4, 4)), "2-D or 3-D"),
    (np.zeros((4, 4), dtype=bool), "numeric"),
    (np.zeros((5, 4, 4)), "C = 1 or 3"),
    (np.full((3, 4, 4), 256.0), "within"),
    (np.full((4, 4), np.nan), "finite"),
])
def test_hostile_arrays_are_refused(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array, allow_pickle=True)
    with pytest.raises(BadRequest, match=message):
        COLOUR.encode(tmp_path / "x.npy")


def test_an_archive_named_npy_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((4, 4)))
    (tmp_path / "x.npz").rename(tmp_path / "x.npy")
    with pytest.raises(BadRequest, match="archive"):
        ICNN_INPUT.encode(tmp_path / "x.npy")


def test_quantize_checks_the_shape():
    with pytest.raises(BadRequest, match=r"\(3, 12, 10\)"):
        COLOUR.quantize(np.zeros((1, 12, 10), dtype=np.float32))
