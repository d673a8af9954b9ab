"""The trainer takes a category's colour from its images and keeps it with
the model: a grey category is fitted, scored and exported as a grey model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export.data import category_colour, category_spec, checkpoint_spec, load_tensor
from service.contract import InputSpec
from service.preprocessing import denormalise
from service.rejection import InputRejected, Reject
from tests.helpers.synthetic import encode, good_image


def _category(root: Path, images: dict[str, np.ndarray]) -> Path:
    good = root / "cat" / "train" / "good"
    good.mkdir(parents=True)
    for name, img in images.items():
        (good / name).write_bytes(encode(Path(name).suffix, img))
    return root / "cat"


def _colour(seed: int = 0) -> np.ndarray:
    return cv2.cvtColor(good_image(np.random.default_rng(seed)), cv2.COLOR_RGB2BGR)


def _grey(seed: int = 0) -> np.ndarray:
    return cv2.cvtColor(_colour(seed), cv2.COLOR_BGR2GRAY)


def test_a_category_of_single_channel_images_is_grey(tmp_path: Path) -> None:
    cat = _category(tmp_path, {"a.png": _grey(0), "b.jpg": _grey(1), "c.bmp": _grey(2)})
    assert category_colour(cat) == "grey"
    assert category_spec(cat) == InputSpec(color="grey")


def test_one_colour_image_makes_the_category_rgb(tmp_path: Path) -> None:
    cat = _category(tmp_path, {"a.png": _grey(0), "b.png": _grey(1), "c.png": _colour(2)})
    assert category_colour(cat) == "RGB"
    assert category_spec(cat) == InputSpec()


def test_an_empty_category_has_no_colour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        category_colour(_category(tmp_path, {}))


def test_checkpoint_spec_is_the_recorded_one_else_the_categorys(tmp_path: Path) -> None:
    grey_cat = _category(tmp_path / "g", {"a.png": _grey(0), "b.png": _grey(1)})
    colour_cat = _category(tmp_path / "c", {"a.png": _colour(0), "b.png": _colour(1)})
    recorded = {"data": str(colour_cat), "input": InputSpec(color="grey").model_dump(mode="json")}
    assert checkpoint_spec(recorded).color == "grey"  # what training recorded wins
    assert checkpoint_spec({"data": str(grey_cat)}).color == "grey"  # older checkpoints
    assert checkpoint_spec({"data": str(colour_cat)}).color == "RGB"


def test_a_grey_spec_loads_colour_as_luma_and_an_rgb_spec_refuses_grey(tmp_path: Path) -> None:
    cat = _category(tmp_path, {"a.png": _colour(0), "b.png": _grey(1)})
    grey = InputSpec(color="grey")
    x = load_tensor(cat / "train" / "good" / "a.png", grey)
    assert x.shape == (3, 300, 300)
    pixels = denormalise(x.numpy(), grey)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)
    with pytest.raises(InputRejected) as err:
        load_tensor(cat / "train" / "good" / "b.png", InputSpec())
    assert err.value.reason == Reject.WRONG_COLOUR
