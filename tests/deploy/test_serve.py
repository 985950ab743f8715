"""`dmdd serve`: every endpoint and error path through the framework's test client, on a tiny trained model."""

from __future__ import annotations

import base64
import io
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import tiny_config
from fastapi.testclient import TestClient
from PIL import Image

from dmdd.checkpoint import load_checkpoint, restore_model
from dmdd.data.geometry import to_square
from dmdd.data.io import decode_image, read_image
from dmdd.deploy.export import export_onnx
from dmdd.deploy.predict import Predictor
from dmdd.deploy.serve import ServeSettings, create_app
from dmdd.errors import DmddError
from dmdd.training.loop import fit

TRAIN_ARGS = ["--threads", "1", "--batch-size", "4", "--image-size", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def served(tiny_tree, tmp_path_factory):
    """A trained tiny checkpoint, its ONNX export, and the data root above the tiny category."""
    out = tmp_path_factory.mktemp("serve")
    ckpt = fit(tiny_config(tiny_tree), out / "run", progress=False)
    model, payload = restore_model(ckpt)
    export_onnx(model, out / "export" / "model.onnx", payload["thresholds"])
    return {"ckpt": ckpt, "onnx": out / "export" / "model.onnx", "root": tiny_tree.parent, "category": tiny_tree,
            "out": out}  # fmt: skip


def client(served, **settings) -> TestClient:
    base = {"models": [served["ckpt"]], "data_root": served["root"], "runs_dir": served["out"] / "jobs",
            "train_args": TRAIN_ARGS, "device": "cpu"}  # fmt: skip
    return TestClient(create_app(ServeSettings(**{**base, **settings})))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def a_test_image(served) -> tuple[str, bytes]:
    path = sorted((served["category"] / "test").rglob("*.png"))[0]
    return path.name, path.read_bytes()


def test_health_and_models_describe_the_loaded_checkpoint(served):
    c = client(served)
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["active_model"] == "run" and health["training_job"] is None
    body = c.get("/models").json()
    (m,) = body["models"]
    thresholds = Predictor(served["ckpt"], "cpu")
    assert body["active"] == "run" and m["backbone"] == "efficientnet_lite0" and m["image_size"] == 64
    assert m["image_threshold"] == thresholds.image_threshold and m["pixel_threshold"] == thresholds.pixel_threshold
    assert m["training_data"] == str(served["root"] / served["category"].name) and m["runtime"] == "pytorch"
    assert "/predict" in c.get("/openapi.json").json()["paths"]


def test_predict_scores_like_the_predictor_and_a_threshold_per_request_decides(served):
    c = client(served)
    name, data = a_test_image(served)
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = float(Predictor(served["ckpt"], "cpu").score([to_square(image, 64)])[0][0])
    body = c.post("/predict", files={"files": (name, data, "image/png")}).json()
    (row,) = body["results"]
    assert row["name"] == name and row["score"] == pytest.approx(expected, abs=1e-5)
    assert row["anomalous"] == (row["score"] >= body["image_threshold"]) and "overlay_png" not in row
    low = c.post("/predict", params={"threshold": row["score"] - 1}, files={"files": (name, data)}).json()
    high = c.post("/predict", params={"threshold": row["score"] + 1}, files={"files": (name, data)}).json()
    assert low["results"][0]["anomalous"] is True and high["results"][0]["anomalous"] is False
    assert (low["image_threshold"], high["image_threshold"]) == (row["score"] - 1, row["score"] + 1)


def test_predict_returns_maps_as_base64_or_as_png(served):
    c = client(served)
    name, data = a_test_image(served)
    row = c.post("/predict", params={"map": "base64"}, files={"files": (name, data)}).json()["results"][0]
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(row["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(row["mask_png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert overlay.shape == (row["height"], row["width"], 3) and mask.shape == (row["height"], row["width"])
    assert (mask > 0).mean() == pytest.approx(row["anomalous_area"])
    r = c.post("/predict", params={"map": "png"}, files={"files": (name, data)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-dmdd-score"]) == pytest.approx(row["score"], rel=1e-5)
    two = [("files", (name, data)), ("files", ("b.png", data))]
    assert c.post("/predict", params={"map": "png"}, files=two).status_code == 400
    many = c.post("/predict", files=two).json()["results"]
    assert [r["name"] for r in many] == [name, "b.png"] and many[0]["score"] == many[1]["score"]


def test_onnx_model_serves_the_same_scores_and_can_be_made_active(served):
    c = client(served, models=[served["ckpt"], served["onnx"]])
    name, data = a_test_image(served)
    torch_row = c.post("/predict", files={"files": (name, data)}).json()["results"][0]
    onnx_row = c.post("/predict", params={"model": "model"}, files={"files": (name, data)}).json()["results"][0]
    assert onnx_row["score"] == pytest.approx(torch_row["score"], abs=1e-3)
    assert c.post("/models/model/activate").json()["runtime"] == "onnxruntime"
    assert c.get("/models").json()["active"] == "model" and c.get("/health").json()["active_model"] == "model"
    assert c.post("/models/nope/activate").status_code == 404
    assert c.post("/predict", params={"model": "nope"}, files={"files": (name, data)}).status_code == 404


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a 1-bit side x side PNG of zeros, a few kB on disk."""
    raw = zlib.compress(b"".join(b"\x00" + bytes((side + 7) // 8) for _ in range(side)), 9)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("text", 415, "not a readable image"),
        ("empty", 400, "empty"),
        ("truncated", 400, "truncated"),
        ("bomb", 413, "more than the limit"),
        ("too_big", 413, "upload limit"),
        ("too_many", 413, "at most 3"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_one_line_reason(served, case, status, words):
    c = client(served, max_pixels=1_000_000, max_upload_bytes=200_000, max_files=3)
    good = png_bytes(np.full((64, 64, 3), 128, np.uint8))
    files = {
        "text": [("files", ("notes.png", b"this is not an image" * 10))],
        "empty": [("files", ("empty.png", b""))],
        "truncated": [
            ("files", ("cut.png", png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:300]))
        ],
        "bomb": [("files", ("bomb.png", bomb_png(4000)))],
        "too_big": [("files", ("big.bmp", b"BM" + bytes(300_000)))],
        "too_many": [("files", (f"{i}.png", good)) for i in range(4)],
    }[case]
    r = c.post("/predict", files=files)
    detail = r.json()["detail"]
    assert r.status_code == status and words in detail and "\n" not in detail
    if case in ("text", "empty", "truncated", "bomb", "too_big"):
        assert files[0][1][0] in detail  # names the file
    if case == "bomb":
        assert len(files[0][1][1]) < 20_000  # a few kB that would decode to 16 megapixels


def test_token_is_required_on_every_request_when_set(served):
    c = client(served, token="s3cret")
    assert c.get("/health").status_code == 401 and c.get("/").status_code == 401
    assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/?token=s3cret").status_code == 200  # the page, opened from a link
    name, data = a_test_image(served)
    assert c.post("/predict", files={"files": (name, data)}).status_code == 401


def test_folders_are_confined_to_the_data_root(served, tmp_path):
    c = client(served)
    category = served["category"].name
    listing = c.get("/folders", params={"path": f"{category}/test"}).json()
    assert set(listing["folders"]) >= {"good", "scratch"}
    body = c.post("/inspect/folder", json={"folder": f"{category}/test/good"}).json()
    assert len(body["results"]) == 3 and all(r["name"].startswith(f"{category}/test/good/") for r in body["results"])
    assert body["failed"] == []
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(outside / "x.png")
    link = served["root"] / "escape"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    for folder in ("../", f"{category}/../../", "escape", "/escape"):
        r = c.post("/inspect/folder", json={"folder": folder})
        assert r.status_code == 403 and "outside the data root" in r.json()["detail"], folder
    assert c.get("/folders", params={"path": "escape"}).status_code == 403
    assert c.post("/inspect/folder", json={"folder": "no/such"}).status_code == 404
    # ground_truth holds only the defect-type folders of masks: no image at its top, and folders are not searched
    masks_only = c.post("/inspect/folder", json={"folder": f"{category}/ground_truth"})
    assert masks_only.status_code == 404 and "holds no image" in masks_only.json()["detail"]
    closed = client(served, data_root=None)
    assert closed.post("/inspect/folder", json={"folder": category}).status_code == 403


def wait_for(c: TestClient, job_id: str, states: set[str], timeout: float = 240, until=lambda status: True) -> dict:
    """Poll the job until its state is one of ``states`` and ``until(status)`` holds (or it left ``running``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.get(f"/jobs/{job_id}").json()
        if status["state"] in states and (until(status) or status["state"] != "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states}: {status}")


@pytest.mark.slow
def test_a_training_job_runs_one_at_a_time_reports_progress_and_its_model_appears(served):
    with client(served, runs_dir=served["out"] / "jobs1") as c:
        category = served["category"].name
        r = c.post("/jobs", json={"folder": category, "minutes": 0.02, "backbone": "efficientnet_lite0", "tile": 32})
        assert r.status_code == 201, r.text
        job = r.json()
        busy = c.post("/jobs", json={"folder": category, "minutes": 0.02, "backbone": "efficientnet_lite0"})
        assert busy.status_code == 409 and job["id"] in busy.json()["detail"]
        assert c.get("/health").json()["training_job"] == job["id"]  # the API answers while it trains
        done = wait_for(c, job["id"], {"finished", "failed"})
        assert done["state"] == "finished", done
        assert done["step"] >= 1 and done["step"] == done["total_steps"] and done["losses"]
        assert done["model"] == job["id"]
        assert job["id"] in [m["name"] for m in c.get("/models").json()["models"]]
        (checkpoint,) = (served["out"] / "jobs1" / job["id"]).rglob("last.pt")
        assert load_checkpoint(checkpoint)["config"]["model"]["tile"] == 32  # the web app's Tiles field
        name, data = a_test_image(served)
        scored = c.post("/predict", params={"model": job["id"]}, files={"files": (name, data)})
        assert scored.status_code == 200 and np.isfinite(scored.json()["results"][0]["score"])
        assert [j["id"] for j in c.get("/jobs").json()["jobs"]] == [job["id"]]
        assert c.get("/jobs/nope").status_code == 404 and c.post("/jobs/nope/stop").status_code == 404
        assert c.post("/jobs", json={"folder": "../", "minutes": 1}).status_code == 403


@pytest.mark.slow
def test_a_stopped_job_stops_and_keeps_the_server_running(served):
    with client(served, runs_dir=served["out"] / "jobs2") as c:
        job = c.post("/jobs", json={"folder": served["category"].name, "minutes": 30,
                                    "backbone": "efficientnet_lite0"}).json()  # fmt: skip
        assert job["state"] == "running"
        # Stop once the first epoch is logged (its checkpoint is written before the log line): mid-run, with
        # 30 minutes of training left.
        first = wait_for(c, job["id"], {"running", "failed", "finished"}, until=lambda s: s["epoch"] >= 1)
        assert first["state"] == "running", first
        stopping = c.post(f"/jobs/{job['id']}/stop").json()
        # "stopped" only if the process ended and was collected between the signal and this answer
        assert stopping["state"] in ("stopping", "stopped"), stopping
        status = wait_for(c, job["id"], {"stopped", "failed", "finished"}, timeout=120)
        assert status["state"] == "stopped" and status["model"] is None
        assert c.get("/health").json()["training_job"] is None
        (checkpoint,) = (served["out"] / "jobs2" / job["id"]).rglob("last.pt")  # the last complete epoch's
        assert load_checkpoint(checkpoint)["epoch"] >= 1


def test_the_page_and_its_scripts_are_served(served):
    c = client(served)
    page = c.get("/")
    assert page.status_code == 200 and 'id="threshold"' in page.text and "static/app.js" in page.text
    assert "inspectFiles" in c.get("/static/app.js").text


def test_unknown_checkpoint_fails_before_the_server_starts(tmp_path):
    with pytest.raises(Exception, match="not found"):
        create_app(ServeSettings(models=[tmp_path / "missing.pt"]))


def test_decode_image_reads_what_read_image_reads(served):
    path = sorted((served["category"] / "test").rglob("*.png"))[0]
    assert np.array_equal(decode_image(Path(path).read_bytes(), path.name), read_image(path))


@pytest.mark.slow
def test_a_job_on_a_folder_without_images_fails_with_the_trainers_reason(served):
    empty = served["root"] / "empty_folder"
    empty.mkdir(exist_ok=True)
    with client(served, runs_dir=served["out"] / "jobs3") as c:
        job = c.post("/jobs", json={"folder": "empty_folder", "minutes": 1, "backbone": "efficientnet_lite0"}).json()
        status = wait_for(c, job["id"], {"failed", "finished", "stopped"}, timeout=120)
        assert status["state"] == "failed" and "dmdd: error:" in status["error"] and status["model"] is None


def test_cli_serve_runs_uvicorn_with_the_options_and_warns_when_open_without_a_token(served, monkeypatch, capsys):
    import uvicorn

    from dmdd.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("DMDD_SERVE_TOKEN", "from-env")
    assert main(["serve", str(served["ckpt"]), "--port", "8123", "--device", "cpu"]) == 0
    app, kw = calls[-1]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and app.state.server.settings.token == "from-env"
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("DMDD_SERVE_TOKEN")
    assert main(["serve", str(served["ckpt"]), "--host", "0.0.0.0", "--device", "cpu"]) == 0
    assert calls[-1][1]["host"] == "0.0.0.0" and "without --token" in capsys.readouterr().err


def test_cli_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    import sys

    from dmdd.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve"]) == 2
    assert "pip install 'dmdd[serve]'" in capsys.readouterr().err


def test_models_are_named_after_their_folder_or_by_name_and_a_clash_is_an_error(served, tmp_path):
    copy = tmp_path / "run" / "last.pt"  # another file whose folder is also called "run"
    copy.parent.mkdir()
    copy.write_bytes(served["ckpt"].read_bytes())
    with pytest.raises(DmddError, match="two models are named 'run'"):
        create_app(ServeSettings(models=[served["ckpt"], copy], device="cpu"))
    c = client(served, models=[served["ckpt"], f"copy={copy}"])
    assert [m["name"] for m in c.get("/models").json()["models"]] == ["run", "copy"]
