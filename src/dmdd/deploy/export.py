"""ONNX, OpenVINO and TorchScript export of the eval forward, each checked against eager PyTorch (docs/design.md §6).

The exported graph takes RGB images in [0, 1], shape (B, 3, S, S) float32, and normalises inside. Its outputs are
``pred_score`` (B,) and ``anomaly_map`` (B, 1, S, S). A JSON sidecar (``<file>.json``) holds the input size, the
calibrated thresholds and the input description, so :mod:`dmdd.deploy.inference` needs no training code.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmdd import __version__
from dmdd.errors import DmddError
from dmdd.evaluation.labelled import describe
from dmdd.models.dmdd import DMDD

ONNX_OPSET = 17  # ONNX Runtime >= 1.11, TensorRT 8.5+, OpenVINO 2022.3+ all run opset 17
# Largest difference to eager PyTorch, relative to the output's scale (max(1, max |output|)): the default map is a
# sum of standardised maps whose values reach ~100, where float32 rounding alone is ~1e-5 in absolute terms.
PARITY_TOLERANCE = 1e-4


class ExportError(DmddError):
    """An export failed or its output differs from eager PyTorch."""


class _EvalForward(nn.Module):
    """Eval forward returning a plain tuple (exporters want tuples, not NamedTuples)."""

    def __init__(self, model: DMDD) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.pred_score, out.anomaly_map


def _example(model: DMDD, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.cfg.image_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def metadata(model: DMDD, thresholds: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "dmdd_version": __version__,
        "backbone": model.cfg.backbone,
        "image_size": model.cfg.image_size,
        "resize": model.cfg.resize,
        "tile": model.cfg.tile,
        "tile_overlap": model.cfg.tile_overlap,
        "tile_scale": model.cfg.tile_scale,
        "input": "RGB float32 in [0, 1], shape (B, 3, S, S), brought to S x S with `resize` (squash, pad or crop, "
        "dmdd.data.io.to_square); normalisation happens inside the graph",
        "outputs": {"pred_score": "(B,)", "anomaly_map": "(B, 1, S, S)"},
        "thresholds": thresholds,
        "threshold_source": describe(thresholds),
    }


def _max_diff(
    reference: tuple[torch.Tensor, torch.Tensor], other: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """(max absolute difference, max difference relative to max(1, max |reference|)) over both outputs."""
    diffs = [(float(np.abs(r.numpy() - o).max()), max(1.0, float(np.abs(r.numpy()).max()))) for r, o in
             zip(reference, other)]  # fmt: skip
    return max(d for d, _ in diffs), max(d / s for d, s in diffs)


def _check_parity(model: DMDD, run, what: str, path: Path) -> tuple[float, float]:
    """Run ``run`` (numpy (B, 3, S, S) -> (scores, maps)) and the eager model on the same check images; raise
    :class:`ExportError` when they differ by more than ``PARITY_TOLERANCE`` of the output scale."""
    check = _example(model, batch=3, seed=1)
    diff, rel = _max_diff(_reference(model, check), run(check.numpy()))
    if rel > PARITY_TOLERANCE:
        raise ExportError(f"{what} output differs from PyTorch by {diff:.2e} ({rel:.2e} of the output scale, > "
                          f"{PARITY_TOLERANCE}); file kept at {path}")  # fmt: skip
    return diff, rel


@torch.inference_mode()
def _reference(model: DMDD, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out.pred_score.float(), out.anomaly_map.float()


def export_onnx(model: DMDD, path: str | Path, thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export to ONNX with a dynamic batch axis and check it with ONNX Runtime.

    Returns:
        A report with the output path and the max abs difference to eager PyTorch.

    Raises:
        ExportError: when the difference exceeds 1e-4 of the output scale.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    x = _example(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _EvalForward(model).eval(), (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["pred_score", "anomaly_map"],
            dynamic_axes={"images": {0: "batch"}, "pred_score": {0: "batch"}, "anomaly_map": {0: "batch"}},
        )  # fmt: skip
    meta = metadata(model, thresholds)
    proto = onnx.load(str(path))
    for key, value in {"dmdd": json.dumps(meta)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    from dmdd.deploy.inference import OnnxInferencer

    diff, rel = _check_parity(model, OnnxInferencer(path).run, "ONNX", path)
    return {"path": str(path), "format": "onnx", "opset": ONNX_OPSET, "max_abs_diff": diff, "max_rel_diff": rel}


def export_openvino(model: DMDD, path: str | Path, thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export to OpenVINO IR (``.xml`` + ``.bin``, fp32 weights) through the checked ONNX graph, and check it with
    OpenVINO's CPU runtime at fp32. Needs the optional ``openvino`` package (``pip install 'dmdd[openvino]'``).

    Raises:
        ExportError: OpenVINO missing, or the output differs from PyTorch by more than 1e-4 of its scale.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("OpenVINO export needs the openvino package: pip install 'dmdd[openvino]'") from exc
    path = Path(path).with_suffix(".xml")
    onnx_report = export_onnx(model, path.with_suffix(".onnx"), thresholds)  # writes the shared model.json too
    ov.save_model(ov.convert_model(onnx_report["path"]), str(path), compress_to_fp16=False)
    from dmdd.deploy.inference import OpenVinoInferencer

    diff, rel = _check_parity(model, OpenVinoInferencer(path).run, "OpenVINO", path)
    return {"path": str(path), "format": "openvino", "openvino": ov.__version__, "max_abs_diff": diff,
            "max_rel_diff": rel}  # fmt: skip


def export_torchscript(model: DMDD, path: str | Path, thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trace the eval forward to TorchScript and check it against eager PyTorch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_EvalForward(model).eval(), _example(model), check_trace=False)
    extra = {"dmdd.json": json.dumps(metadata(model, thresholds))}
    torch.jit.save(traced, str(path), _extra_files=extra)
    path.with_suffix(".json").write_text(json.dumps(metadata(model, thresholds), indent=2))
    loaded = torch.jit.load(str(path))

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            return tuple(t.numpy() for t in loaded(torch.from_numpy(images)))

    diff, rel = _check_parity(model, run, "TorchScript", path)
    return {"path": str(path), "format": "torchscript", "max_abs_diff": diff, "max_rel_diff": rel}
