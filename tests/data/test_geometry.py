"""Non-square images: squash, pad and crop map a pixel to the square input and its map back to the same place."""

import numpy as np
import pytest

from dmdd.data.geometry import from_square, square_geometry, to_square


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
@pytest.mark.parametrize("hw", [(120, 160), (160, 120)])
def test_a_pixel_maps_to_the_square_and_back_to_the_same_place(mode, hw):
    h, w = hw
    y, x = (h * 2) // 5, (w * 3) // 5  # inside the centre crop too
    image = np.zeros((h, w, 3), np.uint8)
    image[y - 4 : y + 4, x - 4 : x + 4] = 255
    square = to_square(image, 64, mode)
    assert square.shape == (64, 64, 3)
    amap = square[..., 0].astype(np.float32) / 255.0  # a "map" that lights up where the bright patch went
    back = from_square(amap, (h, w), mode)
    assert back.shape == (h, w)
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert abs(peak[0] - y) <= 5 and abs(peak[1] - x) <= 5, (mode, peak, (y, x))


def test_pad_keeps_the_aspect_ratio_and_crop_fills_the_square():
    image = np.full((100, 200, 3), 200, np.uint8)
    padded = to_square(image, 64, "pad")
    assert square_geometry((100, 200), 64, "pad") == (32, 64, 16, 0)
    assert (padded[:16] == 0).all() and (padded[16:48] == 200).all() and (padded[48:] == 0).all()
    assert (to_square(image, 64, "crop") == 200).all()
    assert square_geometry((100, 200), 64, "crop") == (64, 128, 0, -32)


def test_crop_gives_unseen_parts_the_minimum_and_masks_follow_the_image():
    amap = np.random.default_rng(0).random((64, 64)).astype(np.float32) + 1.0
    back = from_square(amap, (100, 200), "crop")
    assert back.shape == (100, 200) and back[:, :20].max() == pytest.approx(amap.min())
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 90:110] = 1  # inside the centre crop
    for mode in ("squash", "pad", "crop"):
        sq = to_square(mask, 64, mode, nearest=True)
        assert set(np.unique(sq)) <= {0, 1} and sq.sum() > 0
    with pytest.raises(ValueError, match="resize mode"):
        square_geometry((10, 10), 8, "zoom")
