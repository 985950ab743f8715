"""Dataset layouts on generated miniature trees and on the real data; every bad-input case."""

from pathlib import Path

import numpy as np
import pytest
from conftest import real_category
from PIL import Image

from dmdd.data import AnomalyDataset, detect_layout, load_category, load_folder, read_image, read_mask
from dmdd.errors import DatasetError, ImageReadError


def img(path: Path, size=(40, 30), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


def mask(path: Path, size=(40, 30)):
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[5:10, 5:10] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_mvtec_layout_sorted_and_labelled(tmp_path):
    root = tmp_path / "bottle"
    for n in ("b.png", "a.png"):
        img(root / "train/good" / n)
    img(root / "test/good/000.png")
    img(root / "test/crack/001.png")
    mask(root / "ground_truth/crack/001_mask.png")
    cat = load_category(tmp_path, "bottle")
    assert [r.image.name for r in cat.train] == ["a.png", "b.png"]
    assert [(r.defect_type, r.label) for r in cat.test] == [("crack", 1), ("good", 0)]
    sample = AnomalyDataset(cat.test, 32)[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    assert sample["mask"].max() == 1 and sample["label"] == 1
    assert AnomalyDataset(cat.test, 32)[1]["mask"].sum() == 0
    assert load_category(root).name == "bottle"  # the category folder itself


def test_btad_layout_with_bmp_masks(tmp_path):
    root = tmp_path / "01"
    img(root / "train/ok/0.bmp")
    img(root / "test/ok/0.bmp")
    img(root / "test/ko/3.bmp")
    mask(root / "ground_truth/ko/3.bmp")
    cat = load_category(tmp_path, "01")
    assert detect_layout(root) == "btad"
    assert [(r.defect_type, r.label, r.mask.suffix if r.mask else None) for r in cat.test] == [
        ("good", 0, None), ("ko", 1, ".bmp")]  # fmt: skip


def test_visa_layout_from_split_csv(tmp_path):
    root = tmp_path / "candle"
    img(root / "Data/Images/Normal/0000.JPG")
    img(root / "Data/Images/Normal/0001.JPG")
    img(root / "Data/Images/Anomaly/000.JPG")
    mask(root / "Data/Masks/Anomaly/000.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "capsules,train,normal,capsules/Data/Images/Normal/0000.JPG,\n"
    )
    cat = load_category(tmp_path, "candle")
    assert detect_layout(root) == "visa" and len(cat.train) == 1
    assert [(r.label, r.mask is not None) for r in cat.test] == [(0, False), (1, True)]


def test_mvtec3d_rgb_layout(tmp_path):
    root = tmp_path / "tire"
    img(root / "train/good/rgb/000.png")
    img(root / "test/good/rgb/000.png")
    img(root / "test/cut/rgb/000.png")
    mask(root / "test/cut/gt/000.png")
    cat = load_category(tmp_path, "tire")
    assert detect_layout(root) == "mvtec3d"
    assert len(cat.train) == 1 and [r.defect_type for r in cat.test] == ["cut", "good"]


def test_generic_folder_source(tmp_path):
    img(tmp_path / "ok/1.png")
    img(tmp_path / "bad/7.png")
    mask(tmp_path / "masks/7_mask.png")
    cat = load_folder(tmp_path / "ok", {"good": tmp_path / "ok", "bad": tmp_path / "bad"}, tmp_path / "masks")
    assert len(cat.train) == 1 and sorted(r.label for r in cat.test) == [0, 1]


def test_missing_mask_names_the_image_and_expected_file(tmp_path):
    root = tmp_path / "c"
    img(root / "train/good/0.png")
    img(root / "test/hole/5.png")
    with pytest.raises(DatasetError, match=r"defect image .*5\.png has no mask; expected .*5_mask\.png"):
        load_category(root)


def test_mask_size_mismatch_is_an_error(tmp_path):
    root = tmp_path / "c"
    img(root / "train/good/0.png")
    img(root / "test/hole/5.png", size=(40, 30))
    mask(root / "ground_truth/hole/5_mask.png", size=(20, 20))
    cat = load_category(root)
    with pytest.raises(DatasetError, match=r"mask .*5_mask\.png is 20x20 but its image is 40x30"):
        AnomalyDataset(cat.test, 32)[0]


def test_empty_train_folder_and_unknown_layout(tmp_path):
    (tmp_path / "c/train/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images in .*train/good"):
        load_category(tmp_path / "c")
    (tmp_path / "d/images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        load_category(tmp_path / "d")
    with pytest.raises(DatasetError, match="data folder not found"):
        load_category(tmp_path / "missing")
    with pytest.raises(DatasetError, match="category 'zz' not found"):
        load_category(tmp_path, "zz")


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is text, not a PNG", "not a readable image"), (None, "corrupt or truncated")],
)
def test_unreadable_images_raise_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is None:
        img(tmp_path / "good.png", size=(64, 64))
        path.write_bytes((tmp_path / "good.png").read_bytes()[:-40])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path, 32)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_other_modes_load_as_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (20, 10)).save(path)
    arr = read_image(path)
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16)).save(path)
    assert abs(int(read_image(path)[0, 0, 0]) - 127) <= 1


def test_non_binary_mask_is_thresholded_at_half_with_a_warning_naming_it(tmp_path):
    arr = np.repeat(np.array([[0, 127, 128, 255]], np.uint8), 8, axis=0).repeat(2, axis=1)
    Image.fromarray(arr).save(tmp_path / "m.png")
    with pytest.warns(UserWarning, match=r"mask .*m\.png is not binary"):
        mask = read_mask(tmp_path / "m.png")
    assert mask[0].tolist() == [False, False, False, False, True, True, True, True]


@pytest.mark.realdata
@pytest.mark.parametrize("name, counts", [("magnetic_tile", (761, 191, 392)), ("tire", (210, 25, 87))])
def test_real_datasets_load_with_expected_counts(name, counts):
    folder = real_category(name)
    cat = load_category(folder)
    got = (len(cat.train), sum(r.label == 0 for r in cat.test), sum(r.label == 1 for r in cat.test))
    assert got == counts
    sample = AnomalyDataset(cat.test[-1:], 64)[0]
    assert sample["label"] == 1 and sample["mask"].sum() > 0 and sample["image"].shape == (3, 64, 64)
