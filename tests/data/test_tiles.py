"""Tiles (model.tile): the grid covers every pixel, stitching keeps a constant map exact and shows no seam, a
defect on a tile border reaches the stitched map from both tiles, odd sizes and images smaller than a tile work,
tiles stream in batches; then train / test / predict / export / serve on tiles end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config

from dmdd.data.generated import make_demo_dataset
from dmdd.data.tiles import TileSpec, grid, random_tile, score_tiled, starts, weights


@pytest.mark.parametrize("hw", [(64, 64), (97, 203), (20, 30), (300, 64), (65, 65)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_the_grid_covers_every_pixel_once_or_more_and_stays_inside(hw, overlap):
    spec = TileSpec(64, overlap)
    h, w = max(hw[0], 64), max(hw[1], 64)  # smaller images are padded to one tile first
    covered = np.zeros((h, w), int)
    for t, x in grid((h, w), spec):
        assert 0 <= t <= h - 64 and 0 <= x <= w - 64
        covered[t : t + 64, x : x + 64] += 1
    assert covered.min() >= 1
    assert starts(200, 64, 48) == [0, 48, 96, 136] and starts(64, 64, 48) == [0] and starts(10, 64, 48) == [0]


@pytest.mark.parametrize("hw, scale", [((97, 203), 1.0), ((20, 30), 1.0), ((160, 240), 0.5), ((50, 70), 2.0)])
def test_a_constant_map_stitches_to_the_same_constant_at_the_images_size(hw, scale):
    spec = TileSpec(32, 0.25, scale)
    image = np.zeros((*hw, 3), np.uint8)
    calls = []

    def run(tiles):
        calls.append(len(tiles))
        return np.full(len(tiles), 3.0), np.full((len(tiles), 64, 64), 7.25, np.float32)  # model size 64 != tile 32

    score, stitched = score_tiled(image, spec, 64, run, batch=4)
    assert stitched.shape == hw and score == 3.0
    np.testing.assert_allclose(stitched, 7.25, rtol=1e-6)
    assert max(calls) <= 4  # tiles reach the model in batches of at most `batch`


def test_stitching_is_the_weighted_mean_of_the_overlapping_tiles_without_seams():
    """Each tile returns its own index as a constant map: the stitched value is the blend-weighted mean of the
    indices covering a pixel (recomputed by brute force), and along every row it changes smoothly (no jump)."""
    spec = TileSpec(32, 0.5)
    image = np.zeros((48, 80, 3), np.uint8)
    positions = grid((48, 80), spec)
    seen = iter(range(len(positions)))

    def run(tiles):
        idx = np.array([next(seen) for _ in range(len(tiles))], np.float32)
        return idx, np.repeat(idx[:, None, None], 32, axis=1).repeat(32, axis=2)

    _, stitched = score_tiled(image, spec, 32, run, batch=3)
    total, wsum = np.zeros((48, 80)), np.zeros((48, 80))
    for i, (t, x) in enumerate(positions):
        total[t : t + 32, x : x + 32] += i * weights(32)
        wsum[t : t + 32, x : x + 32] += weights(32)
    np.testing.assert_allclose(stitched, total / wsum, rtol=1e-5)
    steps = np.abs(np.diff(stitched, axis=1))
    assert steps.max() < 0.25 * (len(positions) - 1)  # a hard seam would jump by a whole index difference


def test_a_defect_on_a_tile_border_is_found_by_both_tiles_and_in_the_stitched_map():
    """A fake model whose map is the tile's red channel: a bright spot straddling the border between the first two
    tiles (stride 48, tiles 64 wide) shows in both tiles' maps and at full strength in the stitched map."""
    spec = TileSpec(64, 0.25)
    image = np.zeros((64, 112, 3), np.uint8)
    image[28:36, 44:52, 0] = 255  # columns 44-51: inside tile 0 (0-63) and tile 1 (48-111)
    hits = []

    def run(tiles):
        maps = tiles[..., 0].astype(np.float32) / 255.0
        hits.extend(m.max() for m in maps)
        return maps.reshape(len(maps), -1).max(axis=1), maps

    score, stitched = score_tiled(image, spec, 64, run)
    assert hits == [1.0, 1.0] and score == 1.0
    assert stitched[28:36, 44:52].min() == pytest.approx(1.0) and stitched[:20].max() == 0.0


def test_random_training_tiles_are_seeded_and_cut_the_foreground_with_the_image():
    spec = TileSpec(32)
    image = np.random.default_rng(0).integers(0, 256, (100, 60, 3), dtype=np.uint8)  # every tile distinct
    mask = np.zeros((100, 60), bool)
    mask[50:, :] = True
    a = random_tile(image, mask, spec, 32, np.random.default_rng(3))
    b = random_tile(image, mask, spec, 32, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[0].shape == (32, 32, 3)
    found = False
    for t in range(0, 69):
        for x in range(0, 29):
            if np.array_equal(image[t : t + 32, x : x + 32], a[0]):
                assert np.array_equal(mask[t : t + 32, x : x + 32], a[1])
                found = True
    assert found
    small, _ = random_tile(image[:10, :20], None, spec, 32, np.random.default_rng(0))  # padded to one tile
    assert small.shape == (32, 32, 3)


@pytest.mark.parametrize("args, message", [(["--tile", "10"], "model.tile (--tile) must be 0 (off) or at least 32"),
                                           (["--tile", "64", "--tile-overlap", "0.95"], "--tile-overlap"),
                                           (["--tile", "64", "--tile-scale", "0"], "--tile-scale")])  # fmt: skip
def test_bad_tile_values_give_one_clear_error(args, message, tiny_tree, tmp_path, capsys):
    from dmdd.cli import main

    assert main(["train", "--data", str(tiny_tree), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmdd: error:") and message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    from dmdd.training.loop import fit

    root = tmp_path_factory.mktemp("tiles")
    tree = make_demo_dataset(root, "metal", size=128, train=8, test_good=2, test_per_defect=1, seed=2)
    cfg = tiny_config(tree, steps=2).replace(model={"tile": 64, "tile_overlap": 0.25}, train={"eval_size": 128})
    return tree, fit(cfg, root / "run", progress=False)


def test_tiles_train_test_predict_export_and_serve_without_flags(tiled_run, tmp_path):
    from fastapi.testclient import TestClient

    from dmdd.checkpoint import load_checkpoint
    from dmdd.cli import main
    from dmdd.data.io import read_image
    from dmdd.deploy.inference import OnnxInferencer
    from dmdd.deploy.predict import Predictor
    from dmdd.deploy.serve import ServeSettings, create_app

    tree, ckpt = tiled_run
    payload = load_checkpoint(ckpt)
    assert payload["config"]["model"]["tile"] == 64 and payload["thresholds"]["image"] is not None
    assert payload["step"] == 2  # the budget, over one-tile-per-image epochs

    assert main(["test", str(ckpt), "--data", str(tree), "--out", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert 0 <= metrics["overall"]["image_auroc"] <= 1 and metrics["overall"]["images"] == 5
    assert "tile grid of" in (tmp_path / "t" / "report.html").read_text()  # the report shows the grid

    image_path = sorted((tree / "test").rglob("*.png"))[0]
    image = read_image(image_path)
    predictor = Predictor(ckpt, "cpu")
    ((score, amap),) = predictor.score_full([image])
    assert amap.shape == image.shape[:2] and predictor.tiles == TileSpec(64, 0.25, 1.0)
    assert main(["predict", str(ckpt), str(image_path), "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "results.json").read_text())["images"][0]
    assert result["score"] == pytest.approx(score, rel=1e-5)

    assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    onnx = OnnxInferencer(tmp_path / "e" / "model.onnx")
    detection = onnx.predict(image)  # tiles from the export's metadata, no flags
    assert onnx.tiles == predictor.tiles and detection.anomaly_map.shape == image.shape[:2]
    scale = max(1.0, float(np.abs(amap).max()))
    assert np.abs(detection.anomaly_map - amap).max() <= 1e-4 * scale and abs(detection.score - score) <= 1e-4 * scale

    c = TestClient(create_app(ServeSettings(models=[ckpt], device="cpu")))
    body = c.post("/predict", files=[("files", ("x.png", image_path.read_bytes(), "image/png"))]).json()
    assert body["results"][0]["score"] == pytest.approx(score, rel=1e-5)
