"""The synthetic data the other tests stand on: defects where the masks say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.synthetic import DEFECT_KINDS, good_image, inject_defect, write_category


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_exactly_the_masked_pixels(kind: str) -> None:
    rng = np.random.default_rng(3)
    good = good_image(rng)
    bad, mask = inject_defect(good, rng, kind)
    changed = np.any(bad != good, axis=-1)
    assert mask.any()
    assert set(np.unique(mask)) <= {0, 255}
    assert not changed[mask == 0].any()
    assert changed[mask > 0].mean() > 0.9  # the defect is visible where it is marked


def test_good_images_vary_but_stay_alike() -> None:
    rng = np.random.default_rng(0)
    a, b = good_image(rng), good_image(rng)
    assert not np.array_equal(a, b)
    assert abs(a.astype(float).mean() - b.astype(float).mean()) < 10


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown defect kind"):
        inject_defect(good_image(np.random.default_rng(0)), np.random.default_rng(0), "dent")


def test_category_layout(tmp_path: Path) -> None:
    cat = write_category(tmp_path, n_train=3, n_test_good=2, n_test_defective=3)
    assert len(list((cat / "train" / "good").glob("*.png"))) == 3
    assert len(list((cat / "test" / "good").glob("*.png"))) == 2
    for kind in DEFECT_KINDS:
        (img,) = (cat / "test" / kind).glob("*.png")
        assert (cat / "ground_truth" / kind / f"{img.stem}_mask.png").is_file()
