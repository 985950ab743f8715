"""``dmdd serve``: an inspection web app and HTTP API (FastAPI) over the models of :mod:`dmdd.deploy.serve.models`.

Endpoints (the framework documents them at ``/docs``): ``GET /health``, ``GET /models``,
``POST /models/{name}/activate``, ``POST /predict`` (uploaded images), ``POST /inspect/folder`` (a folder under
``data_root``), ``GET /folders``, ``POST /calibrate`` (thresholds from labelled images), and training jobs:
``POST /jobs``, ``GET /jobs``, ``GET /jobs/{id}``, ``POST /jobs/{id}/stop``. The browser app is ``/``.

Example:
    >>> from dmdd.deploy.serve import ServeSettings, create_app
    >>> app = create_app(ServeSettings(models=["runs/dmdd/tire/last.pt"], data_root="data"))
"""

from __future__ import annotations

import base64
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import cv2
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from dmdd import __version__
from dmdd.data.io import IMAGE_SUFFIXES, MAX_DECODE_PIXELS, decode_image, list_images, read_image
from dmdd.deploy.serve.jobs import JobBusy, JobRunner, TrainingJob
from dmdd.deploy.serve.models import Registry, ServedModel
from dmdd.errors import DmddError, ImageReadError, ImageTooLargeError
from dmdd.evaluation.labelled import (
    describe,
    digest,
    labelled_thresholds,
    provenance,
    stored_held_out_scores,
    with_labelled,
)
from dmdd.evaluation.visualize import threshold_overlay

STATIC = Path(__file__).parent / "static"
MAP_HELP = "base64: overlay and mask PNGs in the JSON; png: the overlay itself (one image)"


@dataclass
class ServeSettings:
    """What ``dmdd serve`` is started with.

    Attributes:
        models: checkpoints (``last.pt``) or exported ``.onnx`` files to load, each optionally ``NAME=PATH``; the
            first is active.
        data_root: the only server-side tree the app may read folders from (inspection and training data); None
            turns folder access off.
        runs_dir: where training jobs write their run folders.
        token: when set, every request but the static script and style sheet needs ``Authorization: Bearer <token>``
            (or ``?token=``, for opening the page).
        max_upload_bytes: largest accepted file.
        max_pixels: largest accepted image (width x height, read from the header before decoding).
        max_files: most images per request.
        device: ``auto``, ``cpu``, ``cuda``...
        train_args: extra ``dmdd train`` arguments for jobs (e.g. ``["--threads", "1"]``).
    """

    models: list[str | Path] = field(default_factory=list)
    data_root: str | Path | None = None
    runs_dir: str | Path = "runs/serve"
    token: str | None = None
    max_upload_bytes: int = 25 * 2**20
    max_pixels: int = 50_000_000
    max_files: int = 64
    device: str = "auto"
    train_args: list[str] = field(default_factory=list)


class FolderRequest(BaseModel):
    folder: str = Field(description="folder under the server's data root, e.g. 'tire/test/cut'")
    limit: int = Field(500, ge=1, le=5000, description="most images to score, in sorted order")


class JobRequest(BaseModel):
    folder: str = Field(description="good training images under the data root: an MVTec category or a plain folder")
    minutes: float = Field(10.0, gt=0, le=24 * 60, description="training budget in minutes")
    backbone: str = Field("wide_resnet50_2", description="backbone, e.g. wide_resnet50_2 or efficientnet_lite0")
    image_size: int | None = Field(None, description="input size (multiple of 32); default 256")
    tile: int | None = Field(None, description="train on square tiles of this many pixels (camera-size images)")


def _png_base64(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    return base64.b64encode(buf.tobytes()).decode("ascii")


class Server:
    """What the endpoints share: settings, loaded models, training jobs, the data root."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.registry = Registry(settings.device)
        for spec in settings.models:
            name, _, path = str(spec).rpartition("=")  # NAME=PATH names a model; PATH alone is named after it
            self.registry.add(path, name=name or None)
        self.data_root = Path(settings.data_root).resolve() if settings.data_root else None
        self.jobs = JobRunner(Path(settings.runs_dir).resolve(), self._job_done, settings.train_args)

    def _job_done(self, job: TrainingJob, checkpoint: Path) -> None:
        job.model_name = self.registry.add(checkpoint, name=job.id).name

    def model(self, name: str | None) -> ServedModel:
        try:
            return self.registry.get(name)
        except KeyError:
            raise HTTPException(404, f"no model {name!r} is loaded" if name else "no model is loaded") from None

    def job(self, job_id: str) -> TrainingJob:
        if job_id not in self.jobs.jobs:
            raise HTTPException(404, f"no training job {job_id!r}")
        return self.jobs.jobs[job_id]

    def folder(self, folder: str) -> Path:
        """A folder under the data root: no '..' and no symlink leads outside it."""
        path = self._under_root(folder, "folder")
        if not path.is_dir():
            raise HTTPException(404, f"folder {folder!r} not found under the data root")
        return path

    def file(self, relative: str) -> Path:
        """A file under the data root, confined as :meth:`folder`."""
        path = self._under_root(relative, "file")
        if not path.is_file():
            raise HTTPException(404, f"file {relative!r} not found under the data root")
        return path

    def _under_root(self, relative: str, what: str) -> Path:
        if self.data_root is None:
            raise HTTPException(403, f"server-side {what}s are off: start dmdd serve with --data-root")
        path = (self.data_root / relative.lstrip("/")).resolve()
        if not path.is_relative_to(self.data_root):
            raise HTTPException(403, f"{what} {relative!r} lies outside the data root")
        return path

    async def read_upload(self, upload: UploadFile, reduce_above: int = MAX_DECODE_PIXELS) -> np.ndarray:
        """An uploaded image as (H, W, 3) uint8 RGB, or a 4xx naming the file."""
        return (await self.read_upload_bytes(upload, reduce_above))[1]

    async def read_upload_bytes(self, upload: UploadFile, reduce_above: int = MAX_DECODE_PIXELS,
                                ) -> tuple[bytes, np.ndarray]:  # fmt: skip
        """(the file's bytes, the image), or a 4xx naming the file."""
        name, limit = upload.filename or "upload", self.settings.max_upload_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"{name}: larger than the upload limit of {limit} bytes")
        return data, self.decode(data, name, reduce_above)

    def decode(self, data: bytes, name: str, reduce_above: int = MAX_DECODE_PIXELS) -> np.ndarray:
        """Decode an image (a 4xx naming it otherwise); models on tiles keep more pixels (``reduce_above``)."""
        try:
            return decode_image(data, name, self.settings.max_pixels, reduce_above)
        except ImageTooLargeError as exc:
            raise HTTPException(413, f"{name}: {exc.reason}") from None
        except ImageReadError as exc:
            status = 415 if exc.reason.startswith("not a readable image") else 400
            raise HTTPException(status, f"{name}: {exc.reason}") from None


def thresholds(model: ServedModel, image_t: float | None, pixel_t: float | None) -> dict:
    """The request's thresholds, else the model's calibrated ones, and which decided."""
    return {"image_threshold": model.image_threshold if image_t is None else image_t,
            "pixel_threshold": model.pixel_threshold if pixel_t is None else pixel_t,
            "threshold_source": model.threshold_source if image_t is None else "given: ?threshold="}  # fmt: skip


def rows(model: ServedModel, named: list[tuple[str, np.ndarray]], used: dict, maps: bool) -> list[dict]:
    """One result per (name, image): score, decision, anomalous area, and the PNGs with ``maps``."""
    image_t, pixel_t = used["image_threshold"], used["pixel_threshold"]
    out = []
    for (name, image), scored in zip(named, model.score([im for _, im in named])):
        mask = scored.anomaly_map >= pixel_t if pixel_t is not None else None
        row = {"name": name, "score": scored.score,
               "anomalous": None if image_t is None else bool(scored.score >= image_t),
               "anomalous_area": None if mask is None else float(mask.mean()),
               "width": int(image.shape[1]), "height": int(image.shape[0])}  # fmt: skip
        if maps:
            row["overlay_png"] = _png_base64(threshold_overlay(image, scored.anomaly_map, pixel_t))
            if mask is not None:
                row["mask_png"] = _png_base64(mask.astype(np.uint8) * 255)
        out.append(row)
    return out


def get_server(request: Request) -> Server:
    return request.app.state.server


def authorize(request: Request) -> None:
    """With a token set, every request carries ``Authorization: Bearer <token>`` (or ``?token=`` for the page)."""
    token = get_server(request).settings.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


ServerDep = Annotated[Server, Depends(get_server)]
ImageThreshold = Annotated[float | None, Query(description="image threshold for this request (default: the model's)")]
PixelThreshold = Annotated[float | None, Query(description="pixel threshold for this request (default: the model's)")]
ModelName = Annotated[str | None, Query(description="a loaded model's name (default: the active one)")]
router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/health", summary="liveness, version, active model, running job")
def health(server: ServerDep) -> dict:
    running = server.jobs.running()
    return {"status": "ok", "version": __version__, "active_model": server.registry.active,
            "models": len(server.registry.models), "training_job": running.id if running else None}  # fmt: skip


@router.get("/models", summary="loaded models: backbone, image size, thresholds, training data")
def models(server: ServerDep) -> dict:
    return {"active": server.registry.active, "models": [m.info() for m in server.registry.models.values()]}


@router.post("/models/{name}/activate", summary="make a loaded model the active one")
def activate(name: str, server: ServerDep) -> dict:
    server.model(name)
    return server.registry.activate(name).info()


@router.post("/predict", summary="score uploaded images", response_model=None)
async def predict(
    server: ServerDep,
    files: Annotated[list[UploadFile], File(description="one or more images")],
    threshold: ImageThreshold = None,
    pixel_threshold: PixelThreshold = None,
    map: Annotated[Literal["none", "base64", "png"], Query(description=MAP_HELP)] = "none",
    model: ModelName = None,
) -> dict | Response:
    if len(files) > server.settings.max_files:
        raise HTTPException(413, f"{len(files)} files: at most {server.settings.max_files} per request")
    if map == "png" and len(files) != 1:
        raise HTTPException(400, "map=png returns one image: send exactly one file (or use map=base64)")
    chosen = server.model(model)
    named = [(f.filename or f"upload-{i}", await server.read_upload(f, chosen.reduce_above))
             for i, f in enumerate(files)]  # fmt: skip
    used = thresholds(chosen, threshold, pixel_threshold)
    body = {"model": chosen.name, **used, "results": rows(chosen, named, used, maps=map != "none")}
    if map == "png":
        row = body["results"][0]
        headers = {"X-Dmdd-Score": f"{row['score']:.6g}", "X-Dmdd-Anomalous": str(row["anomalous"]).lower(),
                   "X-Dmdd-Threshold": str(body["image_threshold"]),
                   "X-Dmdd-Threshold-Source": str(body["threshold_source"])}  # fmt: skip
        return Response(base64.b64decode(row["overlay_png"]), media_type="image/png", headers=headers)
    return body


@router.get("/folders", summary="sub-folders and image count of a folder under the data root")
def folders(
    server: ServerDep, path: Annotated[str, Query(description="folder under the data root ('' for the root)")] = ""
) -> dict:
    folder = server.folder(path)
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    images = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return {"path": str(folder.relative_to(server.data_root)), "folders": subs, "images": images}


@router.post("/inspect/folder", summary="score the images of a folder under the data root")
def inspect_folder(
    request: FolderRequest,
    server: ServerDep,
    threshold: ImageThreshold = None,
    pixel_threshold: PixelThreshold = None,
    map: Annotated[Literal["none", "base64"], Query(description="base64: overlay and mask PNGs")] = "none",
    model: ModelName = None,
) -> dict:
    folder, chosen, root = server.folder(request.folder), server.model(model), server.data_root
    paths = [p for p in list_images(folder) if p.resolve().is_relative_to(root)][: request.limit]
    if not paths:
        raise HTTPException(404, f"folder {request.folder!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    used = thresholds(chosen, threshold, pixel_threshold)
    results: list[dict] = []
    failed: list[dict] = []
    for start in range(0, len(paths), 8):  # batches of 8 keep memory flat on big folders
        named = []
        for path in paths[start : start + 8]:
            try:
                named.append((str(path.relative_to(root)), read_image(path, reduce_above=chosen.reduce_above)))
            except ImageReadError as exc:
                failed.append({"name": str(path.relative_to(root)), "error": exc.reason})
        results += rows(chosen, named, used, map == "base64") if named else []
    return {"model": chosen.name, **used, "results": results, "failed": failed}


@router.post("/calibrate", summary="thresholds from images labelled good / defective (uploads or data-root files)")
async def calibrate(
    server: ServerDep,
    good: Annotated[list[UploadFile], File(description="known good images")] = [],  # noqa: B006 - FastAPI form
    defective: Annotated[list[UploadFile], File(description="known defective images")] = [],  # noqa: B006
    good_paths: Annotated[list[str], Form(description="known good images under the data root")] = [],  # noqa: B006
    defective_paths: Annotated[list[str], Form(description="known defective images under the data root")] = [],  # noqa: B006
    rule: Annotated[str, Query(description="f1, fpr=X or recall-at-fpr=X (as dmdd calibrate --rule)")] = "f1",
    save: Annotated[bool, Query(description="store the thresholds in the model's checkpoint")] = False,
    model: ModelName = None,
) -> dict:
    """Score the labelled images, set the image threshold by ``rule`` (the code of ``dmdd calibrate``) and return
    every labelled score with the threshold and the cross-validated estimate; ``save=true`` stores it in the
    checkpoint (atomically) and the model decides with it from then on."""
    chosen = server.model(model)
    if save and chosen.runtime != "pytorch":
        raise HTTPException(400, f"{chosen.name} is an exported model: calibrate its checkpoint (dmdd calibrate) "
                                 "and export again")  # fmt: skip
    if len(good) + len(defective) + len(good_paths) + len(defective_paths) > server.settings.max_files * 4:
        raise HTTPException(413, f"at most {server.settings.max_files * 4} labelled images per calibration")
    named, labels, files = [], [], {}
    for label, uploads, paths in ((0, good, good_paths), (1, defective, defective_paths)):
        for i, upload in enumerate(uploads):
            data, image = await server.read_upload_bytes(upload, chosen.reduce_above)
            name = upload.filename or f"upload-{label}-{i}"
            named.append((name, image))
            files[f"upload:{name}"] = digest(data)
            labels.append(label)
        for relative in paths:
            path = server.file(relative)
            data = path.read_bytes()
            named.append((relative, server.decode(data, relative, chosen.reduce_above)))
            files[relative] = digest(data)
            labels.append(label)
    scores = np.array([s.score for s in chosen.score([im for _, im in named])]) if named else np.zeros(0)
    try:
        held = stored_held_out_scores(chosen.stored_thresholds()) if chosen.runtime == "pytorch" else None
        labelled = labelled_thresholds(scores, np.array(labels, int), rule, held_out=held)
    except DmddError as exc:
        raise HTTPException(400, str(exc)) from None
    labelled |= provenance(files, labels, 0, f"dmdd serve, model {chosen.name}")
    if save:
        chosen.set_thresholds(with_labelled(chosen.stored_thresholds(), labelled))
    return {"model": chosen.name, "rule": rule, "saved": save, "labelled": labelled,
            "scores": [{"name": n, "label": y, "score": float(s)} for (n, _), y, s in zip(named, labels, scores)],
            "threshold_source": describe(with_labelled(None, labelled)), **thresholds(chosen, None, None)}  # fmt: skip


@router.post("/jobs", status_code=201, summary="start training on a folder of good images (one job at a time)")
def start_job(request: JobRequest, server: ServerDep) -> dict:
    folder = server.folder(request.folder)
    try:
        return server.jobs.start(folder, request.minutes, request.backbone, request.image_size,
                                 request.tile).status()  # fmt: skip
    except JobBusy as exc:
        raise HTTPException(409, str(exc)) from None


@router.get("/jobs", summary="all training jobs of this server")
def list_jobs(server: ServerDep) -> dict:
    return {"jobs": [j.status() for j in server.jobs.jobs.values()]}


@router.get("/jobs/{job_id}", summary="a job's progress: steps, losses, ETA")
def job_status(job_id: str, server: ServerDep) -> dict:
    return server.job(job_id).status()


@router.post("/jobs/{job_id}/stop", summary="stop a job; its last complete checkpoint is kept")
def stop_job(job_id: str, server: ServerDep) -> dict:
    server.job(job_id)
    return server.jobs.stop(job_id).status()


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI application; models load here, so a bad path fails before the server starts."""
    server = Server(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.jobs.shutdown()  # a server that stops takes its training job with it (last checkpoint kept)

    app = FastAPI(title="dmdd", version=__version__, lifespan=lifespan, dependencies=[Depends(authorize)],
                  description="DMDD anomaly detection: score, inspect folders, train on good images")  # fmt: skip
    app.state.server = server
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
