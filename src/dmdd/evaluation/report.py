"""Self-contained HTML report: metrics table, ROC and PRO curves, best and worst test images with heatmaps."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dmdd.data.io import read_image
from dmdd.evaluation import Predictions, metrics, metrics_markdown
from dmdd.evaluation.visualize import heatmap_panel


def _png_data_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves(p: Predictions) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = []
    labelled = p.pixel_labelled()
    masks, maps = p.masks[labelled], p.maps[labelled]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    if p.labels.min() == 0 and p.labels.max() == 1:
        fpr, tpr, _ = metrics.roc_curve(p.labels, p.scores)
        ax.plot(fpr, tpr, label=f"image (AUROC {metrics.auroc(p.labels, p.scores):.3f})")
    if masks.any():
        fpr, tpr, _ = metrics.roc_curve(masks, maps)
        step = max(1, fpr.size // 5000)
        ax.plot(fpr[::step], tpr[::step], label=f"pixel (AUROC {metrics.auroc(masks, maps):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")
    figures.append(("ROC curves", _figure_uri(fig)))
    plt.close(fig)
    if masks.any():
        fpr, pro = metrics.pro_curve(masks, maps)
        keep = fpr <= 0.3
        step = max(1, int(keep.sum()) // 5000)
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.plot(fpr[keep][::step], pro[keep][::step], color="tab:green")
        ax.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 0.3), ylim=(0, 1.02),
               title=f"PRO up to FPR 0.3 (AU-PRO {metrics.au_pro(masks, maps):.3f})")  # fmt: skip
        figures.append(("PRO curve", _figure_uri(fig)))
        plt.close(fig)
    return figures


def _gallery(p: Predictions, count: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(caption, data uri)]) for the best and worst test images."""
    vmin, vmax = float(p.maps.min()), float(np.quantile(p.maps, 0.999)) or 1.0
    anomalous, normal = np.flatnonzero(p.labels == 1), np.flatnonzero(p.labels == 0)
    groups = [
        ("Best detections (highest-scoring defective images)", anomalous[np.argsort(-p.scores[anomalous])][:count]),
        ("Worst misses (lowest-scoring defective images)", anomalous[np.argsort(p.scores[anomalous])][:count]),
        ("Worst false alarms (highest-scoring good images)", normal[np.argsort(-p.scores[normal])][:count]),
    ]
    out = []
    for title, indices in groups:
        tiles = []
        for i in indices:
            image = read_image(p.paths[i], p.maps.shape[-1], p.resize)
            panel = heatmap_panel(image, p.masks[i], p.maps[i], vmin, vmax)
            caption = f"{p.defect_types[i]} / {Path(p.paths[i]).name} — score {p.scores[i]:.4f}"
            tiles.append((caption, _png_data_uri(panel)))
        if tiles:
            out.append((title, tiles))
    return out


def _table_html(result: dict[str, Any]) -> str:
    md = metrics_markdown(result, "").strip().splitlines()[2:]
    rows = [[c.strip().replace("**", "") for c in line.strip("|").split("|")] for line in md if "---" not in line]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mask_note(result: dict[str, Any]) -> str:
    """Says plainly when pixel metrics rest on some or none of the defective images (masks missing)."""
    overall = result["overall"]
    with_masks, defective = overall.get("defective_with_masks"), overall.get("defective")
    if not defective or with_masks is None or with_masks == defective:
        return ""
    if with_masks == 0:
        return ("<p><b>Pixel metrics need masks:</b> none of the defective images has one, so only image-level "
                "metrics (I-AUROC, image F1-max, decisions) are shown.</p>")  # fmt: skip
    return (f"<p><b>Pixel metrics need masks:</b> {with_masks} of {defective} defective images have one; the pixel "
            "metrics use those images and the good ones.</p>")  # fmt: skip


def _operating_html(result: dict[str, Any]) -> str:
    """The decisions at the calibrated image threshold, when the evaluation had one."""
    op = result.get("operating_point")
    if not op:
        return "<p>No calibrated threshold was given: decisions are not shown.</p>"
    how = ("held-out good training images only, target false-alarm rate "
           f"{_fmt(100 * op['target_fpr'])} %" if op["mode"] == "normal"
           else "held-out good training images against synthetic anomalies")  # fmt: skip
    how = op.get("threshold_source", how) if op["mode"] == "labelled" else how
    rows = [("image threshold", _fmt(op["threshold"]) + f" (calibrated on {how})")]
    if op["false_alarm_rate"] is not None:
        rows.append(("false alarms on good images",
                     f"{100 * op['false_alarm_rate']:.1f} % of {op['good_images']}"))  # fmt: skip
    if op["detection_rate"] is not None:
        rows.append(("defective images flagged", f"{100 * op['detection_rate']:.1f} % of {op['defective_images']}"))
        rows += [(f"  {t}", f"{100 * r:.1f} %") for t, r in op["per_defect_type"].items()]
    if "best_detection_rate_at_same_false_alarms" in op:
        rows.append(("best the scores allow at that false-alarm rate",
                     f"{100 * op['best_detection_rate_at_same_false_alarms']:.1f} % flagged"))  # fmt: skip
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def write_report(
    path: str | Path,
    result: dict[str, Any],
    predictions: Predictions,
    title: str,
    details: dict[str, Any] | None = None,
    gallery_size: int = 4,
    figures: list[tuple[str, np.ndarray]] | None = None,
) -> Path:
    """Write one HTML file with every image embedded (``figures``: extra (caption, RGB image) pairs, e.g. the tile
    grid); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = "".join(f'<figure><img src="{uri}" alt="{t}"><figcaption>{t}</figcaption></figure>'
                     for t, uri in _curves(predictions))  # fmt: skip
    extra = "".join(f'<figure><img src="{_png_data_uri(im)}" alt="{html.escape(c)}" style="max-width: 100%">'
                    f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, im in figures or [])  # fmt: skip
    gallery = ""
    for group, tiles in _gallery(predictions, gallery_size):
        items = "".join(f'<figure><img src="{uri}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption>'
                        "</figure>" for c, uri in tiles)  # fmt: skip
        gallery += f"<h3>{html.escape(group)}</h3><div class=gallery>{items}</div>"
    info = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in (details or {}).items())  # fmt: skip
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
figcaption {{ font-size: 0.85em; color: #555; }}
.gallery img {{ width: 420px; image-rendering: pixelated; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Metrics in %. Each defect type is evaluated together with the good test images. Panels show
image | ground truth | anomaly map (green outline: ground truth).</p>
{_table_html(result)}
{_mask_note(result)}
<h2>Operating point</h2>{_operating_html(result)}
<h2>Curves</h2>{curves}{extra}
<h2>Gallery</h2>{gallery}
<h2>Run</h2><table>{info}</table>
</body></html>
"""
    path.write_text(page)
    return path
